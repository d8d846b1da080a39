"""What ``setup.py`` needs to decide about the C++/CUDA build, as plain functions it and the tests share.

- :func:`cuda_arch_list`: the ``TORCH_CUDA_ARCH_LIST`` to build for when none is set and no GPU is visible (a
  cluster login node, a CI runner): the architectures users run (Ampere, Ada, Hopper, Blackwell) that the toolkit
  can compile for, with PTX for the newest so that later GPUs can still JIT the kernels.
- :func:`cuda_version_problem`: one clear sentence when torch and the CUDA toolkit disagree on the CUDA major
  version (torch's own check would end in a traceback).
- :data:`NVCC_FLAGS` / :data:`CXX_FLAGS`: the flags agm_fast adds to torch's own extension flags; the CUDA compile
  gate (``tests/test_nvcc_gate.py``) compiles with exactly these.
- :data:`NO_TORCH_MESSAGE`: what a build without torch says (pip's build isolation hides the installed torch).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Iterable, List, Optional

# Compute capabilities users train on: A100 / A10-A40 / L4-L40 / H100-H200 / B200 / RTX 50xx.
USER_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")

# No --use_fast_math: the OGM-GE noise must match the CPU build up to float rounding.
NVCC_FLAGS = ["-O3"]
# -fno-math-errno lets the compiler vectorise sqrt in the noise loops. -ffp-contract=off: no fused multiply-add where
# the source has a multiply and an add, so that the noise is the same float32 arithmetic on every ISA (and on CUDA,
# where philox.h spells it with __fmul_rn / __fadd_rn). MSVC does not contract without /fp:contract.
CXX_FLAGS = ["/O2"] if sys.platform == "win32" else ["-O3", "-fno-math-errno", "-ffp-contract=off"]

NO_TORCH_MESSAGE = (
    "agm_fast: the C++ extension is built against the torch you will run it with, but this build environment has "
    "no torch (pip's build isolation hides the installed one, and agm_fast does not download a second torch of "
    "several GB to build against). Install torch first, then run: pip install --no-build-isolation . "
    "(or set AGM_FAST_NO_EXT=1 to install without the extension; everything then runs on the pure-PyTorch path)"
)


def _capability(arch: str) -> int:
    major, minor = arch.split(".")
    return int(major) * 10 + int(minor)


def toolkit_archs(nvcc: str) -> List[str]:
    """The compute capabilities ``nvcc --list-gpu-arch`` supports, as ``"8.0"``-style strings (empty on failure)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    archs = []
    for match in re.finditer(r"compute_(\d+)", out):
        cc = int(match.group(1))
        archs.append(f"{cc // 10}.{cc % 10}")
    return archs


def cuda_arch_list(supported: Iterable[str], wanted: Iterable[str] = USER_ARCHS) -> Optional[str]:
    """The ``TORCH_CUDA_ARCH_LIST`` for a build that sees no GPU.

    Args:
        supported: the architectures the toolkit compiles for (:func:`toolkit_archs`).
        wanted: the architectures to build (default :data:`USER_ARCHS`).

    Returns:
        e.g. ``"8.0;8.6;8.9;9.0;10.0;12.0+PTX"``: the wanted architectures the toolkit supports, ascending, with PTX
        for the newest; None when the toolkit supports none of them.
    """
    have = {_capability(a) for a in supported}
    chosen = sorted((a for a in set(wanted) if _capability(a) in have), key=_capability)
    if not chosen:
        return None
    return ";".join(chosen[:-1] + [chosen[-1] + "+PTX"])


def arch_list_for_build(env_value: Optional[str], gpu_visible: bool, supported: Iterable[str]) -> Optional[str]:
    """What setup.py sets ``TORCH_CUDA_ARCH_LIST`` to: nothing when the user set it or a GPU is visible (torch then
    builds for that GPU), else :func:`cuda_arch_list` of the toolkit's architectures.

    Raises:
        ValueError: no GPU is visible and the toolkit supports none of :data:`USER_ARCHS`.
    """
    if env_value or gpu_visible:
        return None
    archs = cuda_arch_list(supported)
    if archs is None:
        raise ValueError(
            f"the CUDA toolkit compiles for none of {', '.join(USER_ARCHS)} and no GPU is visible; set "
            "TORCH_CUDA_ARCH_LIST"
        )
    return archs


def cuda_version_problem(torch_cuda: Optional[str], toolkit_cuda: Optional[str]) -> Optional[str]:
    """One sentence when torch's CUDA and the toolkit's CUDA differ in their major version, else None."""
    if not torch_cuda or not toolkit_cuda:
        return None
    if torch_cuda.split(".")[0] == toolkit_cuda.split(".")[0]:
        return None
    return (
        f"agm_fast: torch was built with CUDA {torch_cuda} but the CUDA toolkit found (nvcc) is {toolkit_cuda}; "
        f"their major versions must match. Install a CUDA {torch_cuda.split('.')[0]}.x toolkit (or point CUDA_HOME "
        "at one), or install the torch build for your toolkit; AGM_FAST_NO_EXT=1 installs without the extension."
    )


def nvcc_version(nvcc: str) -> Optional[str]:
    """``"13.0"`` from ``nvcc --version``, or None."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def nvcc_path(cuda_home: Optional[str]) -> Optional[str]:
    """The nvcc of ``cuda_home``, if there is one."""
    if not cuda_home:
        return None
    path = os.path.join(cuda_home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")
    return path if os.path.exists(path) else None
