"""Benchmark of one OGM-GE step on the gradients of two ResNet-18 encoders, ours vs the reference style.

Two stages, timed separately in one run:

- score + coefficient: ``agm_fast.calculate_coefficient`` (one op on the device, no host synchronisation) vs the
  reference-style per-sample Python loop with one ``.item()`` per sample;
- in-place modulation of the conv weights (the reference's selection, about 11M parameters per encoder):
  ``agm_fast.update_model_with_OGM_GE`` and the raw ``functional.ogm_ge_`` op on a gathered gradient list vs the
  reference-style per-parameter loop with one ``.std().item()`` per tensor.

Every provider is checked before it is timed: OGM mode must equal the baseline; OGM-GE noise is checked
statistically (per-tensor mean 0 and std ``std(g) + 1e-8``). Bytes are the minimum the maths moves (OGM: read and
write each gradient once; OGM-GE: one more read for the std), and a measured copy bandwidth is printed for scale.

A third part, on CPU, sweeps the gradient size (``--sizes``, in millions of elements, cut into tensors of at most
the largest ResNet-18 conv weight) at 1 and 2 threads (``--sweep-threads``), the three taking turns: the
reference-style per-parameter loop, ``torch._foreach_mul_`` (one read and one write, the bandwidth yardstick) and
``functional.ogm_ge_`` (a read for the moments, then a read and a write); ``OGMGE.step`` against the whole
reference-style step (scores, coefficients, modulation) on the ResNet-18 pair is in the first table.

Run: ``python -m agm_fast.benchmarks.bench_ogm_ge [--device cpu|cuda] [--quick] [--sizes 1,10,200]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from agm_fast.benchmarks.baselines.ogm_ge_reference_style import (
    reference_style_coefficients,
    reference_style_modulation,
    select_conv_parameters,
)
from agm_fast.benchmarks.harness import (
    Outcome,
    add_traffic,
    bench_main,
    bench_parser,
    check_close,
    print_table,
    run_providers,
    time_fn,
    time_interleaved,
)
from torch import Tensor, nn

import agm_fast
from agm_fast import _backend, functional

NOTES = (
    "speedup: baseline median / provider median, both measured in this run. MB: the bytes the maths has to move "
    "(OGM: read + write each gradient; OGM-GE: one more read for the std; copy: read + write), the same for every "
    "provider of a stage; GB/s = MB / median. OGM is checked bitwise against the baseline before timing, OGM-GE "
    "statistically (per-tensor noise mean 0 and std std(g) + 1e-8 within 6 sigma).\n"
)

COLUMNS = ["stage", "provider", "median_ms", "p20_ms", "p80_ms", "speedup", "MB", "GB/s", "check"]


def resnet18_shapes(in_channels: int, width: int = 64) -> List[Tuple[str, Tuple[int, ...]]]:
    """Parameter names and shapes of a torchvision-style ResNet-18 trunk without its classifier.

    Args:
        in_channels: channels of the input (1 for the reference's audio spectrogram, 3 for video frames).
        width: channels of the first stage (64 in ResNet-18; smaller for a quick run).

    Returns:
        ``(name, shape)`` pairs in ``named_parameters()`` order: 20 conv weights and their BatchNorm affine pairs.
    """
    shapes = [("conv1.weight", (width, in_channels, 7, 7)), ("bn1.weight", (width,)), ("bn1.bias", (width,))]
    cin = width
    for stage in range(4):
        cout = width * 2**stage
        for block in range(2):
            prefix = f"layer{stage + 1}.{block}"
            stride_change = block == 0 and stage > 0
            shapes += [
                (f"{prefix}.conv1.weight", (cout, cin, 3, 3)),
                (f"{prefix}.bn1.weight", (cout,)),
                (f"{prefix}.bn1.bias", (cout,)),
                (f"{prefix}.conv2.weight", (cout, cout, 3, 3)),
                (f"{prefix}.bn2.weight", (cout,)),
                (f"{prefix}.bn2.bias", (cout,)),
            ]
            if stride_change:
                shapes += [
                    (f"{prefix}.downsample.0.weight", (cout, cin, 1, 1)),
                    (f"{prefix}.downsample.1.weight", (cout,)),
                    (f"{prefix}.downsample.1.bias", (cout,)),
                ]
            cin = cout
    return shapes


def _module_with(shapes: Sequence[Tuple[str, Tuple[int, ...]]], device: torch.device) -> nn.Module:
    root = nn.Module()
    for name, shape in shapes:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.empty(shape, device=device)))
    return root


def build_model(device: torch.device, width: int = 64) -> nn.Module:
    """A two-encoder model (``audio_net``: 1 input channel, ``visual_net``: 3) with ResNet-18 parameter shapes."""
    model = nn.Module()
    model.add_module("audio_net", _module_with(resnet18_shapes(1, width), device))
    model.add_module("visual_net", _module_with(resnet18_shapes(3, width), device))
    return model


def fill_grads(model: nn.Module, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Give every parameter a random gradient (a different scale per tensor); returns a copy of them."""
    gen = torch.Generator().manual_seed(seed)
    saved = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        scale = 10 ** (-4 + 3 * torch.rand((), generator=gen).item())
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.device)
        saved[name] = p.grad.clone()
    return saved


def restore_grads(model: nn.Module, saved: Dict[str, Tensor]) -> None:
    """Put copies of the ``saved`` gradients back on ``model``'s parameters."""
    for name, p in model.named_parameters():
        p.grad = saved[name].clone()


def _check_ge(grads: Dict[str, Tensor], saved: Dict[str, Tensor], k: Dict[str, float]) -> Optional[str]:
    """None when the OGM-GE noise of every selected tensor has mean 0 and std ``std(g) + 1e-8`` within 6 sigma."""
    zs = []
    for prefix in ("audio", "visual"):
        names = [n for n, g in grads.items() if n.startswith(prefix) and g.dim() == 4]
        for name in names:
            g0 = saved[name].double()
            noise = grads[name].double() - k[prefix] * g0
            sigma = g0.std().item() + 1e-8
            n = noise.numel()
            mean, std = noise.mean().item() / sigma, noise.std().item() / sigma
            if abs(mean) > 6 / math.sqrt(n) or abs(std - 1) > 6 / math.sqrt(2 * n) + 1e-6:
                return f"{name}: noise mean {mean:.3g} sigma, std {std:.5f} sigma over {n} elements"
            zs.append((noise / sigma).flatten().float())
    z = torch.cat(zs)
    if abs(z.mean().item()) > 6 / math.sqrt(z.numel()) or abs(z.std().item() - 1) > 6 / math.sqrt(2 * z.numel()):
        return f"pooled noise: mean {z.mean().item():.3g}, std {z.std().item():.5f} (expected 0 and 1)"
    untouched = [n for n, g in grads.items() if g.dim() != 4 and not torch.equal(g, saved[n])]
    if untouched:
        return f"non-conv gradients changed: {untouched[:3]}"
    return None


def run(device: torch.device, batch: int, classes: int, alpha: float, width: int, warmup: int, rep: int) -> List[dict]:
    """Check and time every provider; returns the table rows."""
    torch.manual_seed(0)
    timer = dict(warmup=warmup, rep=rep)

    # Scores + coefficients: the visual modality is made the stronger one so that both rules damp it.
    labels = torch.randint(0, classes, (batch,), device=device)
    out_a = torch.randn(batch, classes, device=device)
    out_v = torch.randn(batch, classes, device=device)
    out_v[torch.arange(batch, device=device), labels] += 2.0
    rows = run_providers(
        ("reference-style (per-sample .item())", reference_style_coefficients),
        [("agm_fast.calculate_coefficient", agm_fast.calculate_coefficient)],
        (labels, out_a, out_v, alpha),
        device=device,
        fields={"stage": "score+coeff"},
        rtol=1e-5,
        atol=1e-6,
        # The score stage is short: more repetitions for a stable median.
        timer=dict(timer, rep=10 * rep),
    )

    model = build_model(device, width)
    saved = fill_grads(model)
    k_a, k_v = reference_style_coefficients(labels, out_a, out_v, alpha)
    k = {"audio": k_a, "visual": k_v}
    conv = [p for prefix in ("audio", "visual") for p in select_conv_parameters(model, prefix)]
    group = [0] * len(select_conv_parameters(model, "audio")) + [1] * len(select_conv_parameters(model, "visual"))
    numel = sum(p.numel() for p in conv)
    elem = conv[0].element_size()
    coeffs = torch.tensor([k_a, k_v], dtype=torch.float32, device=device)

    # A measured copy over as many float32 elements as the gradients, for scale.
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_row = dict(stage="copy (bandwidth ref.)", provider="dst.copy_(src)", check="ok", speedup=1.0)
    copy_row.update(time_fn(lambda: dst.copy_(src), device, **timer))
    add_traffic([copy_row], 2 * numel * elem)
    rows.append(copy_row)

    def raw_op(noise):
        grads = [p.grad for p in conv]
        functional.ogm_ge_(grads, group, coeffs, noise=noise, seed=0, offset=0)

    def grads_after(_):
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    def check_ogm(name, got, want):
        return check_close(name, list(got.values()), list(want.values()), rtol=0, atol=0)

    def check_ogm_ge(name, got, want):
        return _check_ge(got, saved, k)

    for mode, passes in (("OGM", 2), ("OGM_GE", 3)):
        stage_rows = run_providers(
            ("reference-style (per-tensor .std().item())", lambda: reference_style_modulation(model, k_a, k_v, mode)),
            [
                ("agm_fast.update_model_with_OGM_GE", lambda: agm_fast.update_model_with_OGM_GE(model, k_a, k_v, mode)),
                ("functional.ogm_ge_ (gathered list)", lambda: raw_op(mode == "OGM_GE")),
            ],
            device=device,
            fields={"stage": f"modulate {mode}"},
            # OGM is deterministic and checked bitwise; the OGM-GE noise statistically.
            check=check_ogm if mode == "OGM" else check_ogm_ge,
            collect=grads_after,
            prepare=lambda: restore_grads(model, saved),
            timer=timer,
        )
        add_traffic(stage_rows, passes * numel * elem)
        rows += stage_rows
    # The whole step: OGMGE.step (scores, coefficients and modulation on the device) vs the reference style.
    ogm = agm_fast.OGMGE([model.audio_net, model.visual_net], alpha=alpha, mode="OGM_GE", conv_only=True)

    def reference_step():
        ka, kv = reference_style_coefficients(labels, out_a, out_v, alpha)
        reference_style_modulation(model, ka, kv, "OGM_GE")

    restore_grads(model, saved)
    ogm.step(labels, out_a, out_v, epoch=0)
    problem = _check_ge(grads_after(None), saved, k)
    step_rows = [
        dict(stage="OGM-GE step", provider="reference-style (scores .item() loop + per-tensor loop)", check="ok"),
        dict(stage="OGM-GE step", provider="agm_fast.OGMGE.step", check=problem or "ok"),
    ]
    if problem is None:
        restore_grads(model, saved)
        times = time_interleaved(
            {"ref": reference_step, "ours": lambda: ogm.step(labels, out_a, out_v, epoch=0)},
            device,
            warmup=warmup,
            rep=rep,
        )
        step_rows[0].update(times["ref"], speedup=1.0)
        step_rows[1].update(times["ours"], speedup=times["ref"]["median_ms"] / times["ours"]["median_ms"])
    add_traffic(step_rows, 3 * numel * elem)
    rows += step_rows
    return rows


SWEEP_COLUMNS = [
    "threads",
    "elements",
    "tensors",
    "reference_ms",
    "foreach_mul_ms",
    "ogm_ge_ms",
    "ogm_ge / foreach_mul",
    "reference / ogm_ge",
    "ogm_ge ns/el",
    "check",
]
# The largest conv weight of ResNet-18 (512 x 512 x 3 x 3): the sweep's tensor size.
SWEEP_TENSOR = 512 * 512 * 9


def _reference_loop(grads: List[Tensor], k: float) -> None:
    """The reference's per-parameter update on a list: one ``.std().item()`` and a fresh noise tensor per tensor."""
    for i, g in enumerate(grads):
        sigma = g.std().item() + 1e-8
        grads[i] = g * k + torch.zeros_like(g).normal_(0.0, sigma)


def run_sweep(sizes_m: Sequence[float], threads: Sequence[int], warmup: int, rep: int) -> List[dict]:
    """Time the reference loop, ``_foreach_mul_`` and ``ogm_ge_`` on CPU gradients of each total size.

    Args:
        sizes_m: total gradient elements, in millions.
        threads: torch CPU thread counts to run each size at.
        warmup: untimed calls of each provider per size and thread count.
        rep: rounds in which the three take turns.

    Returns:
        One row per size and thread count.
    """
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    rows = []
    k = 0.5
    coeffs = torch.tensor([k])
    before = torch.get_num_threads()
    for size in sizes_m:
        numel = int(round(size * 1e6))
        parts = [SWEEP_TENSOR] * (numel // SWEEP_TENSOR) + ([numel % SWEEP_TENSOR] if numel % SWEEP_TENSOR else [])
        grads = [torch.randn(n, generator=gen) for n in parts]
        ref_grads = [g.clone() for g in grads]
        # The op's noise on the first tensor: mean 0 and std std(g) + 1e-8 within 6 sigma.
        g0 = grads[0][: min(parts[0], 1 << 20)].clone()
        out = [g0.clone()]
        functional.ogm_ge_(out, [0], coeffs, seed=0, offset=0)
        z = (out[0].double() - k * g0.double()) / (g0.double().std() + 1e-8)
        ok = abs(z.mean().item()) < 6 / math.sqrt(z.numel()) and abs(z.std().item() - 1) < 6 / math.sqrt(2 * z.numel())
        group = [0] * len(grads)
        try:
            for t in threads:
                torch.set_num_threads(t)
                times = time_interleaved(
                    {
                        "reference": lambda: _reference_loop(ref_grads, k),
                        "foreach_mul": lambda: torch._foreach_mul_(grads, k),
                        "ogm_ge": lambda: functional.ogm_ge_(grads, group, coeffs, seed=0, offset=0),
                    },
                    device,
                    warmup=warmup,
                    rep=rep,
                )
                ref_ms, mul_ms, ours_ms = (times[p]["median_ms"] for p in ("reference", "foreach_mul", "ogm_ge"))
                rows.append(
                    {
                        "threads": t,
                        "elements": f"{numel / 1e6:g}M",
                        "tensors": len(parts),
                        "reference_ms": ref_ms,
                        "foreach_mul_ms": mul_ms,
                        "ogm_ge_ms": ours_ms,
                        "ogm_ge / foreach_mul": ours_ms / mul_ms,
                        "reference / ogm_ge": ref_ms / ours_ms,
                        "ogm_ge ns/el": ours_ms * 1e6 / numel,
                        "check": "ok" if ok else "noise statistics off",
                    }
                )
        finally:
            torch.set_num_threads(before)
    return rows


def _bench(args: argparse.Namespace, device: torch.device, machine: str) -> Outcome:
    width, warmup, rep = (16, 1, 3) if args.quick else (64, args.warmup, args.rep)
    backend = _backend.select(device, has=("torch", "ext"))
    conv = sum(math.prod(s) for c in (1, 3) for _, s in resnet18_shapes(c, width) if len(s) == 4)
    # The machine may be shared: the load average says how much the timings were disturbed.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    info = f"ogm_ge_ backend: {backend} | modulated conv weights: {conv:,} (two encoders) | load average: {load}"
    print(info)
    if backend == "ext" and device.type == "cpu":
        info += f" | CPU noise pass: {_backend.get_ext().cpu_capability()}"
    rows = run(device, args.batch, args.classes, args.alpha, width, warmup, rep)
    title = f"OGM-GE step, two ResNet-18 encoders (width {width}), batch {args.batch}, {args.classes} classes"
    table = print_table(title, rows, COLUMNS)
    sweep_rows = []
    if device.type == "cpu" and args.sizes:
        sizes = [0.25, 1.0] if args.quick else [float(x) for x in args.sizes.split(",")]
        threads = [int(x) for x in args.sweep_threads.split(",")]
        sweep_rows = run_sweep(sizes, threads, warmup=1, rep=3 if args.quick else args.sweep_rep)
        sweep_title = "Size sweep on CPU (float32, one modality, k = 0.5): the three take turns, median of the rounds"
        table += "\n" + print_table(sweep_title, sweep_rows, SWEEP_COLUMNS)
        rows += [dict(r, stage="sweep") for r in sweep_rows]
    suffix = "" if args.threads is None else f"-{args.threads}thread"
    text = f"{machine}\n\n{info}\n\ncommand: `{args.command}`\n\n{table}\n{NOTES}"
    return Outcome(
        records=[dict(r, backend=backend, width=width, threads=torch.get_num_threads(), load=load) for r in rows],
        failed=any(r.get("check", "ok") != "ok" for r in rows),
        markdown=None if args.quick else (f"{device.type}-ogm-ge{suffix}.md", text),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0, 1 when a provider failed its check, 2 when ``--out`` is not writable.
    """
    parser = bench_parser("bench_ogm_ge", __doc__, quick="quarter-width encoders and 3 repetitions")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the score stage (default 64)")
    parser.add_argument("--classes", type=int, default=6, help="classes of the score stage (default 6, CREMA-D)")
    parser.add_argument("--alpha", type=float, default=0.8, help="modulation strength (default 0.8, CREMA-D)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per provider (default 2)")
    parser.add_argument("--rep", type=int, default=10, help="timed calls per provider (default 10)")
    parser.add_argument(
        "--sizes",
        default="1,10,22.3,50,100,200",
        help="CPU size sweep: total gradient elements in millions, comma-separated ('' skips it)",
    )
    parser.add_argument("--sweep-threads", default="1,2", help="thread counts of the size sweep (default 1,2)")
    parser.add_argument("--sweep-rep", type=int, default=7, help="rounds of the size sweep (default 7)")
    return bench_main("bench_ogm_ge", parser, argv, _bench)


if __name__ == "__main__":
    sys.exit(main())
