"""Benchmark of the fused AGM step on stacked subset logits ``F [S, B, C]`` (``agm_fast::shapley_scores``).

Two stages, each with three providers checked against the first before they are timed:

- ``scores``: psi, the scores, the running-mean update and the coefficients of one step;
- ``step fwd+bwd``: that, plus the loss logits of ``shapley_combine``, a cross-entropy and the gradient of F.

Providers: the eager PyTorch composition of the ops' ``*_torch`` paths (the baseline), ``torch.compile`` of that
composition, and the custom ops (Triton kernels on CUDA). Shapes: B in {64, 512, 4096}, C in {6, 101, 309},
M in {2, 3, 4, 6} (S = 2^M - 1 subsets, the reference's Shapley variant).

The logits are what the step must move: the table gives their size (``scores``: F read once; ``fwd+bwd``: F read
and dF written once) and the time that traffic takes at the measured device-to-device copy bandwidth
(``floor_ms``); ``x_floor`` is the measured median over that floor.

Needs a CUDA GPU (without one it says so and exits 0). Run: ``python -m agm_fast.benchmarks.bench_shapley``.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as nnf
from agm_fast.benchmarks.harness import add_traffic, kernel_bench_main, run_providers

from agm_fast.coalitions import shapley_weights, subset_masks
from agm_fast.ops.shapley import (
    agm_scores_torch,
    shapley_combine_op,
    shapley_combine_torch,
    shapley_outputs_torch,
    shapley_scores_op,
    shapley_scores_torch,
)

COLUMNS = [
    "B", "C", "M", "stage", "provider", "median_ms", "p20_ms", "p80_ms", "speedup", "MB", "floor_ms", "x_floor", "check"
]
ALPHA = 1.5
CAP = 10.0


def _scores_torch(F, W, labels, running, count, prev):
    return shapley_scores_torch(F, W, labels, running, count, prev, ALPHA, CAP, True)


def _scores_ops(F, W, labels, running, count, prev):
    return shapley_scores_op(F, W, labels, running, count, prev, ALPHA, CAP, True, False, False)


def _step_torch(F, W, labels, running, count, prev):
    psi, scores, running_new, count_new, coeffs = _scores_torch(F, W, labels, running, count, prev)
    out = shapley_combine_torch(F, W, coeffs, F.shape[0] - 1)
    return nnf.cross_entropy(out.float(), labels), scores, running_new, coeffs


def _step_ops(F, W, labels, running, count, prev):
    psi, scores, running_new, count_new, coeffs = _scores_ops(F, W, labels, running, count, prev)
    out = shapley_combine_op(F, W, coeffs, F.shape[0] - 1)
    return nnf.cross_entropy(out.float(), labels), scores, running_new, coeffs


def _with_grad(step: Callable) -> Callable:
    """The whole training-side work of a step: its forward and the gradient of F."""

    def run(F, *args):
        loss, *state = step(F, *args)
        (dF,) = torch.autograd.grad(loss, F)
        return [loss, *state, dF]

    return run


def _inputs(B: int, C: int, M: int, dtype: torch.dtype, device: torch.device):
    masks = subset_masks(M)
    W = shapley_weights(M, masks, torch.float32).to(device)
    F = torch.randn(len(masks), B, C, device=device).to(dtype)
    labels = torch.randint(0, C, (B,), device=device)
    # Running means near this step's scores, as in training: the coefficients stay moderate.
    scores = agm_scores_torch(shapley_outputs_torch(F, W), labels)
    running = scores + 0.1 * torch.randn(M, device=device)
    count = torch.full((), 10.0, device=device)
    prev = torch.ones(M, device=device)
    return F, W, labels, running, count, prev


def run(device, sizes, dtype, bandwidth) -> List[Dict]:
    """Check and time every provider on every shape; returns the table rows."""
    rows: List[Dict] = []
    compiled = {
        "scores": torch.compile(_scores_torch),
        "step fwd+bwd": _with_grad(torch.compile(_step_torch)),
    }
    stages = {
        "scores": (_scores_torch, _scores_ops, 1),
        "step fwd+bwd": (_with_grad(_step_torch), _with_grad(_step_ops), 2),
    }
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    for B, C, M in sizes:
        torch.manual_seed(0)
        F, W, labels, running, count, prev = _inputs(B, C, M, dtype, device)
        for stage, (baseline, ours, passes) in stages.items():
            Fs = F.detach().requires_grad_(stage != "scores")
            stage_rows = run_providers(
                ("eager torch path", baseline),
                [("torch.compile(reference)", compiled[stage]), ("agm_fast ops", ours)],
                (Fs, W, labels, running, count, prev),
                device=device,
                fields={"B": B, "C": C, "M": M, "stage": stage},
                rtol=rtol,
                atol=atol,
            )
            add_traffic(stage_rows, passes * F.numel() * F.element_size(), bandwidth)
            rows += stage_rows
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 (also when no GPU is available), 1 when a provider failed its check, 2 when ``--out`` is not writable.
    """
    return kernel_bench_main(
        "bench_shapley",
        __doc__,
        argv,
        op="shapley_scores",
        run=run,
        title=lambda dtype: f"AGM step on subset logits F [S, B, C], {dtype}, alpha {ALPHA}, cap {CAP}",
        columns=COLUMNS,
        markdown="cuda-shapley",
    )


if __name__ == "__main__":
    sys.exit(main())
