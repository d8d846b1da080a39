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

Run: ``python -m agm_fast.benchmarks.bench_ogm_ge [--device cpu|cuda] [--quick]``.
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
from agm_fast.benchmarks.harness import RESULTS_DIR, append_jsonl, check_close, machine_line, print_table, time_fn
from torch import nn

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


def restore_grads(model: nn.Module, saved: Dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.grad = saved[name].clone()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_ge(model: nn.Module, saved: Dict[str, torch.Tensor], k: Dict[str, float]) -> Optional[str]:
    """None when the OGM-GE noise of every selected tensor has mean 0 and std ``std(g) + 1e-8`` within 6 sigma."""
    zs = []
    for prefix in ("audio", "visual"):
        names = [n for n, p in model.named_parameters() if n.startswith(prefix) and p.dim() == 4]
        for name in names:
            g0 = saved[name].double()
            noise = dict(model.named_parameters())[name].grad.double() - k[prefix] * g0
            sigma = g0.std().item() + 1e-8
            n = noise.numel()
            mean, std = noise.mean().item() / sigma, noise.std().item() / sigma
            if abs(mean) > 6 / math.sqrt(n) or abs(std - 1) > 6 / math.sqrt(2 * n) + 1e-6:
                return f"{name}: noise mean {mean:.3g} sigma, std {std:.5f} sigma over {n} elements"
            zs.append((noise / sigma).flatten().float())
    z = torch.cat(zs)
    if abs(z.mean().item()) > 6 / math.sqrt(z.numel()) or abs(z.std().item() - 1) > 6 / math.sqrt(2 * z.numel()):
        return f"pooled noise: mean {z.mean().item():.3g}, std {z.std().item():.5f} (expected 0 and 1)"
    untouched = [n for n, p in model.named_parameters() if p.dim() != 4 and not torch.equal(p.grad, saved[n])]
    if untouched:
        return f"non-conv gradients changed: {untouched[:3]}"
    return None


def _time_copy(numel: int, device: torch.device, timer: dict) -> Dict[str, float]:
    """A measured copy bandwidth over as many float32 elements as the gradients, for scale."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), **timer)


def _row(stage, provider, t, base_ms=None, nbytes=None, check="ok"):
    row = {"stage": stage, "provider": provider, "check": check}
    if t is not None:
        row.update(t)
        row["speedup"] = (base_ms / t["median_ms"]) if base_ms else 1.0
        if nbytes:
            row["MB"] = nbytes / 1e6
            row["GB/s"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
    return row


def run(device: torch.device, batch: int, classes: int, alpha: float, width: int, warmup: int, rep: int) -> List[dict]:
    """Check and time every provider; returns the table rows."""
    torch.manual_seed(0)
    rows: List[dict] = []
    timer = dict(device=device, warmup=warmup, rep=rep)

    # Scores + coefficients: the visual modality is made the stronger one so that both rules damp it.
    labels = torch.randint(0, classes, (batch,), device=device)
    out_a = torch.randn(batch, classes, device=device)
    out_v = torch.randn(batch, classes, device=device)
    out_v[torch.arange(batch, device=device), labels] += 2.0
    want = reference_style_coefficients(labels, out_a, out_v, alpha)
    got = agm_fast.calculate_coefficient(labels, out_a, out_v, alpha)
    err = check_close("calculate_coefficient", torch.stack(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    # The score stage is short: more repetitions for a stable median.
    score_timer = dict(timer, rep=10 * rep)
    t_base = time_fn(lambda: reference_style_coefficients(labels, out_a, out_v, alpha), **score_timer)
    rows.append(_row("score+coeff", "reference-style (per-sample .item())", t_base))
    if err is None:
        t = time_fn(lambda: agm_fast.calculate_coefficient(labels, out_a, out_v, alpha), **score_timer)
        rows.append(_row("score+coeff", "agm_fast.calculate_coefficient", t, t_base["median_ms"]))
    else:
        rows.append(_row("score+coeff", "agm_fast.calculate_coefficient", None, check=err))

    model = build_model(device, width)
    saved = fill_grads(model)
    k_a, k_v = want
    k = {"audio": k_a, "visual": k_v}
    conv = [p for prefix in ("audio", "visual") for p in select_conv_parameters(model, prefix)]
    group = [0] * len(select_conv_parameters(model, "audio")) + [1] * len(select_conv_parameters(model, "visual"))
    numel = sum(p.numel() for p in conv)
    elem = conv[0].element_size()
    coeffs = torch.tensor([k_a, k_v], dtype=torch.float32, device=device)

    t_copy = _time_copy(numel, device, timer)
    rows.append(_row("copy (bandwidth ref.)", "dst.copy_(src)", t_copy, t_copy["median_ms"], 2 * numel * elem))

    def raw_op(noise):
        grads = [p.grad for p in conv]
        functional.ogm_ge_(grads, group, coeffs, noise=noise, seed=0, offset=0)

    for mode, passes in (("OGM", 2), ("OGM_GE", 3)):
        nbytes = passes * numel * elem
        stage = f"modulate {mode}"
        restore_grads(model, saved)
        reference_style_modulation(model, k_a, k_v, mode)
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        t_base = time_fn(lambda: reference_style_modulation(model, k_a, k_v, mode), **timer)
        rows.append(_row(stage, "reference-style (per-tensor .std().item())", t_base, t_base["median_ms"], nbytes))
        providers = [
            ("agm_fast.update_model_with_OGM_GE", lambda: agm_fast.update_model_with_OGM_GE(model, k_a, k_v, mode)),
            ("functional.ogm_ge_ (gathered list)", lambda: raw_op(mode == "OGM_GE")),
        ]
        for name, fn in providers:
            restore_grads(model, saved)
            fn()
            _sync(device)
            if mode == "OGM":
                err = check_close(
                    name, [p.grad for _, p in model.named_parameters()], list(want_grads.values()), rtol=0, atol=0
                )
            else:
                err = _check_ge(model, saved, k)
            if err is not None:
                rows.append(_row(stage, name, None, check=err))
                continue
            restore_grads(model, saved)
            t = time_fn(fn, **timer)
            rows.append(_row(stage, name, t, t_base["median_ms"], nbytes))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns 0, or 1 when a provider failed its check.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m agm_fast.benchmarks.bench_ogm_ge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the score stage (default 64)")
    parser.add_argument("--classes", type=int, default=6, help="classes of the score stage (default 6, CREMA-D)")
    parser.add_argument("--alpha", type=float, default=0.8, help="modulation strength (default 0.8, CREMA-D)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per provider (default 2)")
    parser.add_argument("--rep", type=int, default=10, help="timed calls per provider (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the extension")
    parser.add_argument("--quick", action="store_true", help="quarter-width encoders and 3 repetitions")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    width, warmup, rep = (16, 1, 3) if args.quick else (64, args.warmup, args.rep)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected a positive count, got {args.threads}")
        torch.set_num_threads(args.threads)

    machine = machine_line(device)
    backend = _backend.select(device, has=("torch", "ext"))
    conv = sum(math.prod(s) for c in (1, 3) for _, s in resnet18_shapes(c, width) if len(s) == 4)
    # The machine may be shared: the load average says how much the timings were disturbed.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    info = f"ogm_ge_ backend: {backend} | modulated conv weights: {conv:,} (two encoders) | load average: {load}"
    print(machine)
    print(info)
    rows = run(device, args.batch, args.classes, args.alpha, width, warmup, rep)
    title = f"OGM-GE step, two ResNet-18 encoders (width {width}), batch {args.batch}, {args.classes} classes"
    table = print_table(title, rows, COLUMNS)
    failed = [r for r in rows if r["check"] != "ok"]
    if not args.no_save:
        records = [dict(r, backend=backend, width=width, threads=torch.get_num_threads(), load=load) for r in rows]
        append_jsonl("ogm_ge", records, machine)
        if not args.quick:
            suffix = "" if args.threads is None else f"-{args.threads}thread"
            path = os.path.join(RESULTS_DIR, f"{device.type}-ogm-ge{suffix}.md")
            with open(path, "w") as f:
                given = sys.argv[1:] if argv is None else list(argv)
                command = " ".join(["python -m agm_fast.benchmarks.bench_ogm_ge"] + given)
                f.write(f"{machine}\n\n{info}\n\ncommand: `{command}`\n\n{table}\n{NOTES}")
            print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
