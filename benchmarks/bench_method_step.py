"""One training step of every registered method against a plain joint step, measured interleaved in one run.

Each method trains the same model (M MLP encoders of ``--depth`` LayerNorm layers of width ``--width``, a concat
head) on the same batch through :func:`agm_fast.methods.training_step`; joint training is the cost floor. On CPU the
methods take turns step by step (:func:`agm_fast.benchmarks.harness.time_interleaved`), so a load change on the
machine hits every method alike and the ratios to joint stay meaningful. Options that make a method act from the
first step (a warm-up of 0, an always-executing OPM) are set, so that every timed step does the method's work.
Methods with a reference-style baseline (``benchmarks/baselines``: the released loop's way of computing the same step)
get a second row, ``<name> (reference-style)``, on the same model and batch; GDL gets one without its gradient clip.

Run: ``python -m agm_fast.benchmarks.bench_method_step [--device cpu|cuda] [--quick] [--methods a,b]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import torch
from agm_fast.benchmarks.harness import Outcome, bench_main, bench_parser, print_table, time_interleaved
from torch import nn

import agm_fast
from agm_fast import methods

COLUMNS = ["M", "method", "median_ms", "p20_ms", "p80_ms", "vs_joint"]

# Settings under which each method does its work in every step of the benchmark (epoch 0).
ACTIVE = {
    "opm": {"warmup_epochs": 0, "p_exe": 1.0},
    "mslr": {"history": 1},
    "mses": {"patience": 0},
}


def encoder(d_in: int, width: int, depth: int) -> nn.Module:
    layers: List[nn.Module] = [nn.Linear(d_in, width), nn.LayerNorm(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers)


# Second rows that separate a method's cost from a part of it that joint training could have too (GDL's clip).
VARIANTS = {"gdl": ("gdl (clip_grad_norm=None)", {"clip_grad_norm": None})}


def make_step(name: str, M: int, width: int, depth: int, batch: int, classes: int, device: torch.device,
              **options):
    """A closure that runs one training step of method ``name`` (with ``options``) on a fixed batch."""
    torch.manual_seed(0)
    encoders = [encoder(width, width, depth).to(device) for _ in range(M)]
    fusion = agm_fast.ConcatFusion([width] * M, classes).to(device)
    method = methods.create(name, encoders, fusion, **{**ACTIVE.get(name, {}), **options}).to(device)
    params = [p for m in [*encoders, fusion] for p in m.parameters()]
    optimizer = torch.optim.SGD([{"params": params}] + method.param_groups(1e-3), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, width, generator=gen).to(device) for _ in range(M)]
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)

    # A method that asks for an epoch pass (PMR's prototypes) gets it once, untimed, on the benchmark's batch.
    methods.run_epoch_passes(method, 0, "start", [(xs, y)], [(xs, y)])

    def step():
        return methods.training_step(method, xs, y, 0, optimizer)

    return step


def _reference_mmpareto(M: int, width: int, depth: int, batch: int, classes: int, device: torch.device):
    from agm_fast.benchmarks.baselines.mmpareto_reference_style import ReferenceStyleMMPareto

    torch.manual_seed(0)
    encoders = [encoder(width, width, depth).to(device) for _ in range(M)]
    fusion = agm_fast.ConcatFusion([width] * M, classes).to(device)
    heads = [nn.Linear(width, classes).to(device) for _ in range(M)]
    params = [p for m in [*encoders, fusion, *heads] for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    reference = ReferenceStyleMMPareto(encoders, fusion, heads)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, width, generator=gen).to(device) for _ in range(M)]
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return lambda: reference.step(optimizer, xs, y)


def _reference_inforeg(M: int, width: int, depth: int, batch: int, classes: int, device: torch.device):
    from agm_fast.benchmarks.baselines.inforeg_reference_style import ReferenceStyleInfoReg

    torch.manual_seed(0)
    encoders = [encoder(width, width, depth).to(device) for _ in range(M)]
    fusion = agm_fast.ConcatFusion([width] * M, classes).to(device)
    params = [p for m in [*encoders, fusion] for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    reference = ReferenceStyleInfoReg(encoders, fusion, [0.95] + [0.1] * (M - 1))
    reference.begin_epoch()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, width, generator=gen).to(device) for _ in range(M)]
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return lambda: reference.step(optimizer, xs, y)


# Reference-style steps (benchmarks/baselines), timed beside the methods.
REFERENCE_STYLE = {"mmpareto": _reference_mmpareto, "inforeg": _reference_inforeg}


def run(args: argparse.Namespace, device: torch.device, machine: str) -> Outcome:
    names = args.methods.split(",") if args.methods else list(methods.available())
    unknown = [n for n in names if n not in methods.available()]
    if unknown:
        raise SystemExit(f"--methods: expected registered names {methods.available()}, got {unknown}")
    if "joint" not in names:
        names = ["joint"] + names
    width, depth, batch = (64, 2, 16) if args.quick else (args.width, args.depth, args.batch)
    warmup, rep = (1, 3) if args.quick else (3, args.rep)
    records: List[Dict[str, object]] = []
    text = [f"# Training step of every method against joint training\n\n{machine}\n\n`{args.command}`\n"]
    for M in args.modalities:
        steps = {n: make_step(n, M, width, depth, batch, 10, device) for n in names}
        for n in names:
            if n in VARIANTS:
                label, options = VARIANTS[n]
                steps[label] = make_step(n, M, width, depth, batch, 10, device, **options)
        for n in names:
            if n in REFERENCE_STYLE:
                steps[f"{n} (reference-style)"] = REFERENCE_STYLE[n](M, width, depth, batch, 10, device)
        times = time_interleaved(steps, device, warmup=warmup, rep=rep)
        rows = []
        for n in steps:
            t = times[n]
            rows.append({"M": M, "method": n, **{k: round(v, 3) for k, v in t.items()},
                         "vs_joint": round(t["median_ms"] / times["joint"]["median_ms"], 2)})
        title = f"M={M}: {depth}-layer MLP encoders of width {width}, batch {batch}, concat head"
        text.append(print_table(title, rows, COLUMNS))
        records += rows
    return Outcome(records, False, None if args.quick else ("cpu-method-step.md", "\n".join(text) + "\n"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark (see the module docstring)."""
    parser = bench_parser("bench_method_step", __doc__)
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: every registered)")
    parser.add_argument("--modalities", type=lambda t: [int(v) for v in t.split(",")], default=[2, 3],
                        help="comma-separated M values (default 2,3)")
    parser.add_argument("--width", type=int, default=512, help="encoder width (default 512)")
    parser.add_argument("--depth", type=int, default=4, help="encoder layers (default 4)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--rep", type=int, default=30, help="timed rounds (default 30)")
    return bench_main("bench_method_step", parser, argv, run)


if __name__ == "__main__":
    sys.exit(main())
