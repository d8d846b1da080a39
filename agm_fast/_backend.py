"""What is available (Triton, the Triton interpreter, the compiled extension) and which path an op runs.

Backends:
    ``torch``  the pure-PyTorch path of each op (``*_torch`` in :mod:`agm_fast.ops`; always available; the CPU default)
    ``triton`` the fused kernels of :mod:`agm_fast.kernels` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)
    ``ext``    the compiled extension ``agm_fast._C`` (CPU, and CUDA when it was built with CUDA)

``AGM_FAST_BACKEND=torch|triton|ext`` forces one backend for every op that has it.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

__all__ = ["backend_info", "get_ext", "has_ext", "has_triton", "triton_interpret", "select", "to_device"]

_BACKENDS = ("torch", "triton", "ext")

_ext = None
_ext_error: Optional[BaseException] = None
try:
    _ext = importlib.import_module("agm_fast._C")
except Exception as exc:  # the package works without the extension; the error is kept for get_ext()
    _ext_error = exc

_triton_error: Optional[BaseException] = None
try:
    import triton  # noqa: F401

    _has_triton = True
except Exception as exc:
    _has_triton = False
    _triton_error = exc


def has_ext() -> bool:
    """True when the compiled extension ``agm_fast._C`` imported."""
    return _ext is not None


def ext_has_cuda() -> bool:
    """True when the compiled extension carries its CUDA kernels."""
    return _ext is not None and bool(getattr(_ext, "with_cuda", lambda: False)())


def get_ext():
    """Return the compiled extension module, or raise the saved import error with how to build it."""
    if _ext is None:
        raise ImportError(
            "agm_fast._C (the C++ extension) is not available: "
            f"{type(_ext_error).__name__}: {_ext_error}. Build it against the installed torch with "
            "`pip install --no-build-isolation -e .` (a C++17 compiler is needed; nvcc for the CUDA part), "
            "and unset AGM_FAST_NO_EXT."
        ) from _ext_error
    return _ext


def has_triton() -> bool:
    """True when the ``triton`` package imports."""
    return _has_triton


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced() -> Optional[str]:
    """The backend named by ``AGM_FAST_BACKEND``, or None."""
    name = os.environ.get("AGM_FAST_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in _BACKENDS:
        raise ValueError(f"AGM_FAST_BACKEND: expected one of {_BACKENDS}, got {name!r}")
    return name


def _check_triton(device: torch.device) -> None:
    if not _has_triton:
        raise RuntimeError(f"the triton backend was asked for but triton does not import: {_triton_error}")
    if device.type == "cpu" and not triton_interpret():
        raise RuntimeError(
            "the triton backend was asked for on CPU tensors; Triton runs on CPU only in its interpreter: "
            "set TRITON_INTERPRET=1 before importing triton, or use AGM_FAST_BACKEND=torch"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the triton backend supports CUDA tensors (or CPU under the interpreter), got {device}")


def _check_ext(device: torch.device) -> None:
    get_ext()
    if device.type == "cuda" and not ext_has_cuda():
        raise RuntimeError("agm_fast._C was built without CUDA; rebuild it against a CUDA build of torch")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"agm_fast._C supports CPU and CUDA tensors, got {device}")


def select(device: torch.device, has: tuple = ("torch", "triton")) -> str:
    """Pick the backend an op runs on tensors of ``device``.

    Args:
        device: the device of the op's inputs.
        has: the backends this op implements, in order of preference on CUDA.

    Returns:
        One of ``"torch"``, ``"triton"``, ``"ext"``.
    """
    name = forced()
    if name is not None and name in has:
        if name == "triton":
            _check_triton(device)
        elif name == "ext":
            _check_ext(device)
        return name
    if device.type == "cuda":
        if "triton" in has and _has_triton:
            return "triton"
        if "ext" in has and ext_has_cuda():
            return "ext"
        return "torch"
    if device.type == "cpu" and "ext" in has and _ext is not None:
        return "ext"
    return "torch"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without making the host wait.

    A host-to-device copy from pageable memory synchronises with the stream; from pinned memory with
    ``non_blocking=True`` it does not.
    """
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def backend_info() -> dict:
    """Say what is available and why not.

    Returns:
        A dict with the torch version, whether CUDA is usable, whether Triton imports (and its error), whether the
        interpreter is on, whether ``agm_fast._C`` imported (and its error), whether it has CUDA kernels, and the
        backend forced by ``AGM_FAST_BACKEND``.
    """
    info = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "triton": _has_triton,
        "triton_error": None if _triton_error is None else f"{type(_triton_error).__name__}: {_triton_error}",
        "triton_interpret": triton_interpret(),
        "ext": _ext is not None,
        "ext_error": None if _ext_error is None else f"{type(_ext_error).__name__}: {_ext_error}",
        "ext_cuda": ext_has_cuda(),
        "forced_backend": os.environ.get("AGM_FAST_BACKEND") or None,
    }
    if _has_triton:
        import triton

        info["triton_version"] = triton.__version__
    return info
