"""Benchmark of the OGM scores and coefficients ``agm_fast::ogm_scores`` on per-modality logits ``[M, B, C]``.

Providers, each checked against the first before it is timed: the eager PyTorch composition of
:func:`ogm_scores_torch` (the baseline), ``torch.compile`` of it, and the custom op (Triton kernels
on CUDA). Shapes: B in {64, 512, 4096}, C in {6, 101, 309}, M in {2, 3, 4, 6}.

The step reads the logits once: the table gives their size and the time that read takes at the measured
device-to-device copy bandwidth (``floor_ms``); ``x_floor`` is the measured median over that floor.

Needs a CUDA GPU (without one it says so and exits 0). Run: ``python -m agm_fast.benchmarks.bench_ogm_scores``.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import torch
from agm_fast.benchmarks.harness import add_traffic, kernel_bench_main, run_providers

from agm_fast.ops.ogm_scores import ogm_scores_op, ogm_scores_torch

COLUMNS = ["B", "C", "M", "provider", "median_ms", "p20_ms", "p80_ms", "speedup", "MB", "floor_ms", "x_floor", "check"]
ALPHA = 0.8


def _ogm_torch(logits, labels):
    return ogm_scores_torch(logits, labels, ALPHA, False)


def _ogm_ops(logits, labels):
    return ogm_scores_op(logits, labels, ALPHA, False)


def run(device, sizes, dtype, bandwidth) -> List[Dict]:
    """Check and time every provider on every shape; returns the table rows."""
    rows: List[Dict] = []
    compiled = torch.compile(_ogm_torch)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
    for B, C, M in sizes:
        torch.manual_seed(0)
        logits = torch.randn(M, B, C, device=device).to(dtype)
        labels = torch.randint(0, C, (B,), device=device)
        shape_rows = run_providers(
            ("eager torch path", _ogm_torch),
            [("torch.compile(reference)", compiled), ("agm_fast ops", _ogm_ops)],
            (logits, labels),
            device=device,
            fields={"B": B, "C": C, "M": M},
            rtol=rtol,
            atol=atol,
        )
        add_traffic(shape_rows, logits.numel() * logits.element_size(), bandwidth)
        rows += shape_rows
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 (also when no GPU is available), 1 when a provider failed its check, 2 when ``--out`` is not writable.
    """
    return kernel_bench_main(
        "bench_ogm_scores",
        __doc__,
        argv,
        op="ogm_scores",
        run=run,
        title=lambda dtype: f"OGM scores and coefficients on logits [M, B, C], {dtype}, alpha {ALPHA}",
        columns=COLUMNS,
        markdown="cuda-ogm-scores",
    )


if __name__ == "__main__":
    sys.exit(main())
