"""CMakeLists.txt: csrc/ builds as a libtorch library against the installed torch, the library's op gives the
reference's numbers, and the CUDA sources compile with nvcc when it is present (a compile check on a CPU torch)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from agm_fast.ops.ogm_ge import ogm_ge_torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _nvcc():
    """The CUDA compiler CMake would find, or None."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _run(cmd, cwd=None):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    build = tmp_path_factory.mktemp("cmake-build")
    _run(["cmake", "-S", ROOT, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"])
    _run(["cmake", "--build", build, "-j2"])
    return build


def test_library_builds_and_runs(build_dir, tmp_path):
    (lib,) = [p for p in build_dir.glob("libagm_fast.*") if p.suffix in (".so", ".dylib")]
    grads = [torch.randn(1000), torch.randn(7, 3).bfloat16(), torch.randn(1)]
    group, coeffs = [0, 1, 1], torch.tensor([0.5, 2.0])
    torch.save({"grads": grads, "group": group, "coeffs": coeffs}, tmp_path / "inputs.pt")
    # A fresh process: importing agm_fast would register the same op from agm_fast._C.
    script = textwrap.dedent(
        f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = {{}}
        for noise in (False, True):
            grads = [g.clone() for g in inputs["grads"]]
            torch.ops.agm_fast._ogm_ge_impl(grads, inputs["group"], inputs["coeffs"], noise, 3, 5)
            out[noise] = grads
        torch.save(out, {str(tmp_path / "outputs.pt")!r})
        """
    )
    _run([sys.executable, "-c", script], cwd=tmp_path)
    out = torch.load(tmp_path / "outputs.pt")
    for noise in (False, True):
        want = [g.clone() for g in grads]
        ogm_ge_torch(want, group, coeffs, noise, 3, 5)
        for got, w in zip(out[noise], want):
            assert got.dtype == w.dtype
            if noise:
                torch.testing.assert_close(got.float(), w.float(), rtol=2**-7, atol=1e-5)
            else:
                torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_cuda_sources_compile(build_dir):
    if _nvcc() is None:
        pytest.skip("no CUDA compiler (nvcc) found: the CUDA sources are not compiled")
    objects = list(build_dir.glob("CMakeFiles/**/ogm_ge.cu.o"))
    assert objects and all(o.stat().st_size > 0 for o in objects), "csrc/cuda/ogm_ge.cu was not compiled"
