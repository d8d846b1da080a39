"""Compile every Triton kernel configuration that the launchers of ``agm_fast.kernels`` choose, with Triton's real
compiler and no GPU, and report registers, shared memory and spills per configuration.

How the configurations are found: every module of ``agm_fast.kernels`` that declares ``gate_cases()`` names its
launches over a grid of shapes that reaches the edges (B from 1 to 8192, C from 1 to 4096, M from 2 to 8, D from 1
to 10^6, float32, bfloat16 and float16, ``kernels/_common.py``) on ``meta`` tensors; each is driven with every
``@triton.jit`` kernel replaced by a recorder. The recorder keeps what the
launcher passed (argument types, block sizes, flags, ``num_warps``), so the block sizes come from the launchers'
own code. Each distinct configuration is then compiled for every requested architecture with ``triton.compile``,
and ``ptxas -v`` on its PTX gives the registers and spills.

Run it in a process where ``TRITON_INTERPRET`` is not set (the interpreter replaces the kernels):
``python tests/gates/triton_gate.py --arch 80 --arch 90`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import agm_fast.kernels  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Every kernel module; each declares the launches its gate covers (gate_cases()). A module with a @triton.jit kernel
# and no gate_cases() is reported as ungated (the test fails on it), so a new kernel cannot skip the gate.
_ALL = tuple(
    importlib.import_module(f"agm_fast.kernels.{info.name}")
    for info in pkgutil.iter_modules(agm_fast.kernels.__path__)
    if not info.name.startswith("_")
)
MODULES = tuple(m for m in _ALL if hasattr(m, "gate_cases"))
UNGATED = sorted(
    m.__name__ for m in _ALL
    if not hasattr(m, "gate_cases") and any(isinstance(v, JITFunction) for v in vars(m).values())
)
TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the call instead of launching."""

    def __init__(self, kernel: JITFunction, calls: list):
        self.kernel = kernel
        self.calls = calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def recording():
    calls: list = []
    saved = []
    for mod in MODULES:
        for name, value in list(vars(mod).items()):
            if isinstance(value, JITFunction):
                saved.append((mod, name, value))
                setattr(mod, name, _Recorder(value, calls))
    try:
        yield calls
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(value).__name__}")


def configuration(kernel: JITFunction, args: tuple, kwargs: dict) -> dict:
    """The launch configuration: argument types (pointer dtypes, 32- or 64-bit integers), the constexprs the launcher
    chose (block sizes, flags) and its options (``num_warps``). Triton's own value specialisations (an integer
    argument equal to 1, divisibility by 16) are left general: they vary with the data, not with the launcher."""
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name] if param.name in values else param.default
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _arg_type(value)
    return {"kernel": kernel.__name__, "signature": signature, "constexprs": constexprs, "options": options}


def drive_launchers():
    """Call every launcher over the grid each kernel module declares (``gate_cases()``); returns the distinct
    configurations with the (kernel, case) that chose them."""
    found = {}
    kernels = {}
    with recording() as calls:
        for mod in MODULES:
            for case, fn, args, kwargs in mod.gate_cases():
                start = len(calls)
                fn(*args, **kwargs)
                for kernel, a, kw in calls[start:]:
                    cfg = configuration(kernel, a, kw)
                    key = json.dumps(cfg, sort_keys=True, default=str)
                    if key not in found:
                        found[key] = dict(cfg, case=case)
                        kernels[key] = kernel
    return [(kernels[k], cfg) for k, cfg in found.items()]


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _usage(log: str) -> dict:
    """Registers and spills from the ``ptxas -v`` log of the compile itself (``TRITON_DUMP_PTXAS_LOG=1``)."""
    regs = [int(m) for m in _PTXAS_USAGE.findall(log)]
    spills = [(int(a), int(b)) for a, b in _PTXAS_SPILLS.findall(log)]
    if not regs:
        raise RuntimeError(f"no ptxas register report in the compile log: {log[-500:]!r}")
    return {
        "registers": max(regs),
        "spill_stores": sum(a for a, _ in spills),
        "spill_loads": sum(b for _, b in spills),
    }


def compile_one(kernel: JITFunction, cfg: dict, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    src = ASTSource(fn=kernel, signature=cfg["signature"], constexprs=cfg["constexprs"])
    out = dict(cfg, arch=arch)
    log = io.StringIO()
    try:
        # Triton prints ptxas's -v report of this very compile (same flags as the cubin it ships).
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg["options"])
    except Exception as exc:
        out.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
        return out
    out.update(ok=bool(compiled.asm.get("cubin")), shared_bytes=int(compiled.metadata.shared))
    out.update(_usage(log.getvalue()))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _compile_job(job):
    index, arch = job
    kernel, cfg = _JOBS[index]
    return compile_one(kernel, cfg, arch)


_JOBS: list = []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 or 90 (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable; default all)")
    args = parser.parse_args(argv)
    archs = args.arch or [80, 90]
    if "nvidia" not in triton.backends.backends:
        print(json.dumps({"skipped": "this triton has no CUDA backend"}))
        return 0
    t0 = time.perf_counter()
    configs = [(k, c) for k, c in drive_launchers() if not args.kernel or c["kernel"] in args.kernel]
    _JOBS[:] = configs
    jobs = [(i, arch) for i in range(len(configs)) for arch in archs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile_job, jobs))
    print(json.dumps({
        "archs": archs,
        "modules": sorted(m.__name__ for m in MODULES),
        "ungated": UNGATED,
        "kernels": sorted({cfg["kernel"] for _, cfg in configs}),
        "configurations": len(configs),
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
