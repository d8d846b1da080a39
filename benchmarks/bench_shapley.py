"""Benchmark of the fused AGM step on stacked subset logits ``F [S, B, C]`` (``agm_fast::shapley_scores``).

Two stages, each with three providers checked against the first before they are timed:

- ``scores``: psi, the scores, the running-mean update and the coefficients of one step;
- ``step fwd+bwd``: that, plus the loss logits of ``shapley_combine``, a cross-entropy and the gradient of F.

Providers: the eager PyTorch composition of :mod:`agm_fast.reference` (the baseline), ``torch.compile`` of that
composition, and the custom ops (Triton kernels on CUDA). Shapes: B in {64, 512, 4096}, C in {6, 101, 309},
M in {2, 3, 4, 6} (S = 2^M - 1 subsets, the reference's Shapley variant).

The logits are what the step must move: the table gives their size (``scores``: F read once; ``fwd+bwd``: F read
and dF written once) and the time that traffic takes at the measured device-to-device copy bandwidth
(``floor_ms``); ``x_floor`` is the measured median over that floor.

Needs a CUDA GPU (without one it says so and exits 0). Run: ``python -m agm_fast.benchmarks.bench_shapley``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as nnf
from agm_fast.benchmarks.harness import RESULTS_DIR, append_jsonl, check_close, machine_line, print_table, time_fn

from agm_fast import _backend, ops
from agm_fast import reference as ref

COLUMNS = [
    "B", "C", "M", "stage", "provider", "median_ms", "p20_ms", "p80_ms", "speedup", "MB", "floor_ms", "x_floor", "check"
]
ALPHA = 1.5
CAP = 10.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth in bytes per second (read + write counted), measured with ``copy_``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (t["median_ms"] * 1e-3)


def _scores_ref(F, W, labels, running, count, prev):
    return ref.shapley_scores_ref(F, W, labels, running, count, prev, ALPHA, CAP, True)


def _scores_ops(F, W, labels, running, count, prev):
    return ops.shapley_scores(F, W, labels, running, count, prev, ALPHA, CAP, True, False, False)


def _step_ref(F, W, labels, running, count, prev):
    psi, scores, running_new, count_new, coeffs = _scores_ref(F, W, labels, running, count, prev)
    out = ref.shapley_combine_ref(F, W, coeffs, F.shape[0] - 1)
    return nnf.cross_entropy(out.float(), labels), scores, running_new, coeffs


def _step_ops(F, W, labels, running, count, prev):
    psi, scores, running_new, count_new, coeffs = _scores_ops(F, W, labels, running, count, prev)
    out = ops.shapley_combine(F, W, coeffs, F.shape[0] - 1)
    return nnf.cross_entropy(out.float(), labels), scores, running_new, coeffs


def _with_grad(step: Callable) -> Callable:
    """The whole training-side work of a step: its forward and the gradient of F."""

    def run(F, *args):
        loss, *state = step(F, *args)
        (dF,) = torch.autograd.grad(loss, F)
        return [loss, *state, dF]

    return run


def _inputs(B: int, C: int, M: int, dtype: torch.dtype, device: torch.device):
    masks = ref.subset_masks(M)
    W = ref.shapley_weights(M, masks, torch.float32).to(device)
    F = torch.randn(len(masks), B, C, device=device).to(dtype)
    labels = torch.randint(0, C, (B,), device=device)
    # Running means near this step's scores, as in training: the coefficients stay moderate.
    scores = ref.agm_scores_ref(ref.shapley_ref(F, W), labels)
    running = scores + 0.1 * torch.randn(M, device=device)
    count = torch.full((), 10.0, device=device)
    prev = torch.ones(M, device=device)
    return F, W, labels, running, count, prev


def _row(B, C, M, stage, provider, t=None, base_ms=None, nbytes=None, bandwidth=None, check="ok") -> Dict:
    row = {"B": B, "C": C, "M": M, "stage": stage, "provider": provider, "check": check}
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
    compiled = {
        "scores": torch.compile(_scores_ref),
        "step fwd+bwd": _with_grad(torch.compile(_step_ref)),
    }
    stages = {
        "scores": (_scores_ref, _scores_ops, 1),
        "step fwd+bwd": (_with_grad(_step_ref), _with_grad(_step_ops), 2),
    }
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    for B, C, M in sizes:
        torch.manual_seed(0)
        F, W, labels, running, count, prev = _inputs(B, C, M, dtype, device)
        for stage, (baseline, ours, passes) in stages.items():
            Fs = F.detach().requires_grad_(stage != "scores")
            args = (Fs, W, labels, running, count, prev)
            nbytes = passes * F.numel() * F.element_size()
            want = baseline(*args)
            t_base = time_fn(lambda: baseline(*args), device)
            rows.append(_row(B, C, M, stage, "eager reference.py", t_base, t_base["median_ms"], nbytes, bandwidth))
            for name, fn in (("torch.compile(reference)", compiled[stage]), ("agm_fast ops", ours)):
                try:
                    err = check_close(name, fn(*args), want, rtol=rtol, atol=atol)
                except Exception as exc:  # a provider that cannot run is reported, not timed
                    err = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if err is not None:
                    rows.append(_row(B, C, M, stage, name, check=err))
                    continue
                t = time_fn(lambda: fn(*args), device)
                rows.append(_row(B, C, M, stage, name, t, t_base["median_ms"], nbytes, bandwidth))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns 0 (also when no GPU is available), or 1 when a provider failed its check.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m agm_fast.benchmarks.bench_shapley", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda", help="the CUDA device to run on (default cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the logits")
    parser.add_argument("--quick", action="store_true", help="B 512, C 101, M in {2, 4} only")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("bench_shapley needs a CUDA GPU (it times the Triton kernels); none is available, nothing to do.")
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
    print(f"shapley_scores backend: {backend} | logits {args.dtype} | copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = run(device, sizes, dtype, bandwidth)
    title = f"AGM step on subset logits F [S, B, C], {args.dtype}, alpha {ALPHA}, cap {CAP}"
    table = print_table(title, rows, COLUMNS)
    failed = [r for r in rows if r["check"] != "ok"]
    if not args.no_save:
        append_jsonl("shapley", [dict(r, backend=backend, dtype=args.dtype) for r in rows], machine)
        if not args.quick:
            path = os.path.join(RESULTS_DIR, f"cuda-shapley-{args.dtype}.md")
            with open(path, "w") as f:
                f.write(
                    f"{machine}\n\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; command: python -m "
                    f"agm_fast.benchmarks.bench_shapley --dtype {args.dtype}\n\n{table}"
                )
            print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
