"""Benchmark of the OGM scores and coefficients ``agm_fast::ogm_scores`` on per-modality logits ``[M, B, C]``.

Providers, each checked against the first before it is timed: the eager PyTorch composition of
:func:`agm_fast.reference.ogm_scores_ref` (the baseline), ``torch.compile`` of it, and the custom op (Triton kernels
on CUDA). Shapes: B in {64, 512, 4096}, C in {6, 101, 309}, M in {2, 3, 4, 6}.

The step reads the logits once: the table gives their size and the time that read takes at the measured
device-to-device copy bandwidth (``floor_ms``); ``x_floor`` is the measured median over that floor.

Needs a CUDA GPU (without one it says so and exits 0). Run: ``python -m agm_fast.benchmarks.bench_ogm_scores``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
from agm_fast.benchmarks.harness import RESULTS_DIR, append_jsonl, check_close, machine_line, print_table, time_fn

from agm_fast import _backend, ops
from agm_fast import reference as ref

COLUMNS = ["B", "C", "M", "provider", "median_ms", "p20_ms", "p80_ms", "speedup", "MB", "floor_ms", "x_floor", "check"]
ALPHA = 0.8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth in bytes per second (read + write counted), measured with ``copy_``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (t["median_ms"] * 1e-3)


def _ogm_ref(logits, labels):
    return ref.ogm_scores_ref(logits, labels, ALPHA, False)


def _ogm_ops(logits, labels):
    return ops.ogm_scores(logits, labels, ALPHA, False)


def _row(B, C, M, provider, t=None, base_ms=None, nbytes=None, bandwidth=None, check="ok") -> Dict:
    row = {"B": B, "C": C, "M": M, "provider": provider, "check": check}
    if t is not None:
        row.update(t)
        row["speedup"] = base_ms / t["median_ms"] if base_ms else 1.0
        row["MB"] = nbytes / 1e6
        row["floor_ms"] = nbytes / bandwidth * 1e3
        row["x_floor"] = t["median_ms"] / row["floor_ms"]
    return row


def run(device, sizes, dtype, bandwidth) -> List[Dict]:
    """Check and time every provider on every shape; returns the table rows."""
    rows: List[Dict] = []
    compiled = torch.compile(_ogm_ref)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
    for B, C, M in sizes:
        torch.manual_seed(0)
        logits = torch.randn(M, B, C, device=device).to(dtype)
        labels = torch.randint(0, C, (B,), device=device)
        nbytes = logits.numel() * logits.element_size()
        want = _ogm_ref(logits, labels)
        t_base = time_fn(lambda: _ogm_ref(logits, labels), device)
        rows.append(_row(B, C, M, "eager reference.py", t_base, t_base["median_ms"], nbytes, bandwidth))
        for name, fn in (("torch.compile(reference)", compiled), ("agm_fast ops", _ogm_ops)):
            try:
                err = check_close(name, fn(logits, labels), want, rtol=rtol, atol=atol)
            except Exception as exc:  # a provider that cannot run is reported, not timed
                err = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if err is not None:
                rows.append(_row(B, C, M, name, check=err))
                continue
            t = time_fn(lambda: fn(logits, labels), device)
            rows.append(_row(B, C, M, name, t, t_base["median_ms"], nbytes, bandwidth))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns 0 (also when no GPU is available), or 1 when a provider failed its check.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m agm_fast.benchmarks.bench_ogm_scores", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda", help="the CUDA device to run on (default cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the logits")
    parser.add_argument("--quick", action="store_true", help="B 512, C 101, M in {2, 4} only")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("bench_ogm_scores needs a CUDA GPU (it times the Triton kernels); none is available, nothing to do.")
        return 0
    if args.quick:
        sizes = [(512, 101, 2), (512, 101, 4)]
    else:
        sizes = list(itertools.product((64, 512, 4096), (6, 101, 309), (2, 3, 4, 6)))
    dtype = DTYPES[args.dtype]

    machine = machine_line(device)
    backend = _backend.select(device)
    bandwidth = copy_bandwidth(device)
    print(machine)
    print(f"ogm_scores backend: {backend} | logits {args.dtype} | copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = run(device, sizes, dtype, bandwidth)
    table = print_table(f"OGM scores and coefficients on logits [M, B, C], {args.dtype}, alpha {ALPHA}", rows, COLUMNS)
    failed = [r for r in rows if r["check"] != "ok"]
    if not args.no_save:
        append_jsonl("ogm_scores", [dict(r, backend=backend, dtype=args.dtype) for r in rows], machine)
        if not args.quick:
            path = os.path.join(RESULTS_DIR, f"cuda-ogm-scores-{args.dtype}.md")
            with open(path, "w") as f:
                f.write(
                    f"{machine}\n\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; command: python -m "
                    f"agm_fast.benchmarks.bench_ogm_scores --dtype {args.dtype}\n\n{table}"
                )
            print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
