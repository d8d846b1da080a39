"""Benchmark of one CGGM training step, ``agm_fast.CGGM`` vs the reference style, on small multimodal models.

A step is: zero_grad, forward, task loss plus the previous step's direction term, backward, the heads' forward,
backward and step, the metrics and coefficients, the encoder-gradient scaling, and the optimizer step. Providers:

- ``reference-style``: :class:`agm_fast.benchmarks.baselines.cggm_reference_style.ReferenceStyleCGGM` (host round
  trip per modality for the accuracies, Python-float coefficients, Python scans over ``named_parameters()``);
- ``agm_fast.CGGM``: ``loss_term()``, ``observe()``, ``scale_gradients_()`` (no host synchronisation, one
  multi-tensor multiply per modality);
- ``plain``: the same model trained without CGGM, for the overhead of the method (not a CGGM provider: its maths
  differs, so it has no check).

Stages: ``step`` times the whole training step; ``cggm only`` times the CGGM work alone (with ten times the
repetitions), repeated on one step's features and gradients: for the reference style everything between the main
backward and the main optimizer step, for ``agm_fast.CGGM`` ``loss_term()`` + ``observe()`` +
``scale_gradients_()``.

Models: those of ``bench_agm_step`` with a concat Linear fusion head: two small ResNet encoders with BatchNorm
(``resnet2-concat``, M = 2) and three small Transformer encoders with dropout (``transformer3-concat``, M = 3), at
its batch size (32; 8 with ``--quick``). Before timing, both CGGM providers run three steps from the
same initial state and the same dropout seeds; the parameters, the heads and the coefficients must agree.

Run: ``python -m agm_fast.benchmarks.bench_cggm_step [--device cpu|cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as Fn
from agm_fast.benchmarks.baselines.cggm_reference_style import ReferenceStyleCGGM
from agm_fast.benchmarks.bench_agm_step import make_case
from agm_fast.benchmarks.harness import Outcome, bench_main, bench_parser, check_close, print_table, time_interleaved
from torch import Tensor, nn

import agm_fast

CASES = ("resnet2-concat", "transformer3-concat")
COLUMNS = ["model", "stage", "provider", "median_ms", "p20_ms", "p80_ms", "speedup", "vs_plain", "check"]

LR = 1e-3
RHO = 1.3
LAM = 0.1


class WithFeatures(nn.Module):
    """A ``JointModel`` of the AGM benchmark with a concat Linear fusion, returning ``(logits, features)``."""

    def __init__(self, joint: nn.Module):
        super().__init__()
        if not isinstance(joint.fusion, nn.Linear):
            raise ValueError("CGGM's benchmark needs the concat (nn.Linear) fusion cases")
        self.encoders = joint.encoders
        self.out = joint.fusion

    def forward(self, *xs: Tensor) -> Tuple[Tensor, List[Tensor]]:
        hs = [enc(x) for enc, x in zip(self.encoders, xs)]
        return self.out(torch.cat(hs, dim=1)), hs


def build(name: str, quick: bool, device: torch.device):
    """``(model, inputs, labels, feature_dims)`` of one case of ``bench_agm_step`` (same models, same batch)."""
    case = make_case(name, quick, device)
    model = WithFeatures(case["model"])
    dims = [enc.out_dim for enc in model.encoders]
    return model, case["inputs"], case["labels"], dims


def providers(model: nn.Module, dims: Sequence[int], num_classes: int):
    """Three independent copies of the model, each with its optimizer(s) and a step function."""
    M = len(dims)
    ours_model = copy.deepcopy(model)
    cggm = agm_fast.CGGM(
        list(ours_model.encoders), ours_model.out, dims, num_classes, rho=RHO, lam=LAM, head_lr=LR / 2
    )
    ours_opt = torch.optim.Adam(ours_model.parameters(), lr=LR)

    ref_model = copy.deepcopy(model)
    ref_heads = copy.deepcopy(cggm.heads)
    offsets = [sum(dims[:m]) for m in range(M)]
    ref = ReferenceStyleCGGM(
        ref_model,
        ref_heads,
        [f"encoders.{m}." for m in range(M)],
        "out.weight",
        [slice(o, o + d) for o, d in zip(offsets, dims)],
        RHO,
        LAM,
        torch.optim.Adam(ref_heads.parameters(), lr=LR / 2),
    )
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=LR)

    plain_model = copy.deepcopy(model)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=LR)

    def ours_step(inputs, labels):
        ours_opt.zero_grad()
        logits, hs = ours_model(*inputs)
        loss = Fn.cross_entropy(logits, labels) + cggm.loss_term()
        loss.backward()
        cggm.observe(hs, labels)
        cggm.scale_gradients_()
        ours_opt.step()

    def ref_step(inputs, labels):
        ref.step(ref_opt, inputs, labels)

    def plain_step(inputs, labels):
        plain_opt.zero_grad()
        logits, _ = plain_model(*inputs)
        Fn.cross_entropy(logits, labels).backward()
        plain_opt.step()

    def ours_method(hs, labels):
        cggm.loss_term()
        cggm.observe(hs, labels)
        cggm.scale_gradients_()

    def ref_method(hs, labels):
        ref.after_backward(hs, labels)

    state = {
        "ours": (ours_step, lambda: list(ours_model.parameters()) + list(cggm.heads.parameters()), lambda: cggm.coeffs),
        "reference-style": (
            ref_step,
            lambda: list(ref_model.parameters()) + list(ref_heads.parameters()),
            lambda: torch.tensor(ref.coeffs, dtype=torch.float64),
        ),
        "plain": (plain_step, None, None),
        # The CGGM work alone, on one step's features and gradients (see method_inputs).
        "ours/method": (ours_method, ours_model),
        "reference-style/method": (ref_method, ref_model),
    }
    return state


def method_inputs(model: nn.Module, inputs: Sequence[Tensor], labels: Tensor) -> List[Tensor]:
    """One forward and backward of ``model``, so that its gradients exist; returns the encoder features."""
    model.zero_grad()
    logits, hs = model(*inputs)
    Fn.cross_entropy(logits, labels).backward()
    return [h.detach() for h in hs]


def check(state: Dict[str, tuple], inputs: Sequence[Tensor], labels: Tensor, steps: int = 3) -> Optional[str]:
    """Run both CGGM providers for ``steps`` steps with the same dropout seeds; None when they agree."""
    for name in ("reference-style", "ours"):
        step = state[name][0]
        for i in range(steps):
            torch.manual_seed(100 + i)
            step(inputs, labels)
    ours_params, ref_params = state["ours"][1](), state["reference-style"][1]()
    msg = check_close("parameters", [p.detach() for p in ours_params], [p.detach() for p in ref_params])
    if msg is None:
        msg = check_close("coefficients", state["ours"][2](), state["reference-style"][2](), rtol=1e-9, atol=1e-12)
    return msg


def run(device: torch.device, quick: bool, warmup: int, rep: int, models: Sequence[str]) -> List[Dict[str, object]]:
    """Check and time every provider on every model; returns the table rows."""
    rows = []
    for name in models:
        model, inputs, labels, dims = build(name, quick, device)
        state = providers(model, dims, 10)
        err = check(state, inputs, labels)
        # A provider that fails its check is not timed.
        timed = ["reference-style", "ours", "plain"] if err is None else ["plain"]
        fns = {k: (lambda step=state[k][0]: step(inputs, labels)) for k in timed}
        if err is None:
            for k in ("reference-style/method", "ours/method"):
                fn, owner = state[k]
                hs = method_inputs(owner, inputs, labels)
                fns[k] = lambda fn=fn, hs=hs: fn(hs, labels)
        step_fns = {k: v for k, v in fns.items() if "/" not in k}
        method_fns = {k: v for k, v in fns.items() if "/" in k}
        times = time_interleaved(step_fns, device, warmup, rep)
        # The CGGM work alone takes a few milliseconds: ten times the samples steady its quantiles.
        times.update(time_interleaved(method_fns, device, warmup, 10 * rep))
        stages = (
            ("step", ("reference-style", "ours", "plain")),
            ("cggm only", ("reference-style/method", "ours/method")),
        )
        for stage, keys in stages:
            stage_rows = []
            for key in keys:
                provider = key.split("/")[0]
                row = {"model": name, "stage": stage, "provider": "agm_fast.CGGM" if provider == "ours" else provider}
                row["check"] = "n/a (no CGGM)" if provider == "plain" else ("ok" if err is None else err)
                row.update(times.get(key, {}))
                stage_rows.append(row)
            base = times.get(keys[0], {}).get("median_ms")
            plain = times.get("plain", {}).get("median_ms") if stage == "step" else None
            for row in stage_rows:
                if "median_ms" in row:
                    if base:
                        row["speedup"] = base / row["median_ms"]
                    if plain:
                        row["vs_plain"] = row["median_ms"] / plain
            rows += stage_rows
    return rows


def _bench(args: argparse.Namespace, device: torch.device, machine: str) -> Outcome:
    warmup, rep = (1, 3) if args.quick else (args.warmup, args.rep)
    # On a shared CPU the load says how much the absolute times mean; the ratios come from interleaved steps.
    load = f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else ""
    rows = run(device, args.quick, warmup, rep, CASES)
    title = "CGGM training step (forward, backward, heads, scaling, Adam), bench_agm_step's models, 10 classes"
    table = print_table(title, rows, COLUMNS)
    text = (
        f"{machine}\n\ncommand: {args.command}\n\n{load}\n\n"
        "speedup: reference-style median / provider median (one run); vs_plain: provider median / "
        "the median of the same model trained without CGGM. The reference style makes M + 1 host "
        "round trips per step (labels and one argmax per modality) and scans named_parameters() "
        "against every encoder prefix; agm_fast.CGGM makes none and scales each encoder's gradients "
        f"with one multi-tensor multiply.\n\n{table}"
    )
    return Outcome(
        records=[dict(r, quick=args.quick) for r in rows],
        failed=any(r["check"] not in ("ok", "n/a (no CGGM)") for r in rows),
        markdown=None if args.quick else (f"{device.type}-cggm-step.md", text),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0, 1 when a provider failed its check, 2 when ``--out`` is not writable.
    """
    parser = bench_parser("bench_cggm_step", __doc__, quick="the AGM benchmark's quick models, 3 repetitions")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per provider (default 3)")
    parser.add_argument("--rep", type=int, default=20, help="timed steps per provider (default 20)")
    return bench_main("bench_cggm_step", parser, argv, _bench)


if __name__ == "__main__":
    sys.exit(main())
