"""Whole AGM training step (forward, scores, coefficients, backward, optimizer step) against the reference style.

Models:
    resnet2-concat       two small ResNet-style conv encoders with BatchNorm (M = 2), concat (nn.Linear) head
    resnet2-mlp          the same encoders, MLP head over the concatenated features
    transformer3-concat  three small Transformer encoders with dropout (M = 3), concat head
    resnet18-crema-concat / resnet18-crema-mlp
                         GPU sizes: two ResNet-18 encoders on CREMA-D-shaped inputs (audio 1x257x188, visual
                         3x224x224), batch 64, 6 classes (the default cases with --device cuda)
    transformer3-urfunny-concat
                         GPU sizes: three Transformer encoders (8 layers, d=768, sequence 50; UR-Funny-shaped
                         text/audio/video widths 300/81/371), batch 64, 2 classes
    vit2-concat / vit2-mlp / vit3-concat
                         two or three ViT encoders as timm builds them by default (pre-norm blocks, LayerNorm,
                         drop_rate=0, drop_path_rate=0; timm's VisionTransformer when timm imports, else the same
                         architecture built here): mode-invariant encoders, whose masked passes reuse the full pass
    bert2-concat         two BERT-like token encoders (embeddings, post-norm Transformer layers, dropout 0.1): the
                         mode-dependent counter-case

Providers:
    baseline          benchmarks/baselines/agm_reference_style.py: 2^M - 1 full model passes, per-sample score loop
                      with .item(), Python-float coefficients, backward hooks
    batched           agm_fast.AGM(model, strategy="batched"): every masked pass stacked into one model call
    factorized        agm_fast.AGM(encoders=..., fusion=...): each encoder once per mode, closed form for a concat head
    factorized-recompute
                      factorized with mode_invariant=False: an eval-mode pass per encoder for the masked subsets even
                      where the encoder computes the same in both modes (what factorized did before the reuse)
    factorized-ckpt   factorized with checkpoint_masked=True: the eval-mode masked passes' activations are recomputed in
                      the backward instead of kept
    factorized-train  factorized with masked_mode="train" (masked passes share the train-mode features; a documented
                      deviation, so it is checked for finiteness only, not against the baseline)
    joint             plain training without AGM (the cost floor)

Every AGM provider is checked against the baseline (coefficients and parameter gradients of one step from the same
weights and dropout seed) before it is timed; a provider that fails is not timed. The encoder-pass columns count
the encoder calls of one step and the samples they process in units of the batch size B (a muted encoder's single
zero sample adds 1/B).

``--sweep`` instead: the cost against M (2, 3, 4, 6, 8) of M MLP encoders (256 -> 256 -> 128, LayerNorm; invariant,
or with Dropout 0.1), batch 64, 10 classes, under four heads (ConcatFusion, MLPFusion with 256 hidden, GatedFusion with
128, and a 2-layer Transformer over the M modality tokens that declares its split): exact AGM (the default factorized
strategy), sampled AGM (16 permutations), stratified AGM (2 rounds) and, while it fits, the sequential strategy,
each over joint training, timed interleaved, in the thread's CPU time. Exact AGM is checked against the sequential
strategy up to M = 6 first.

Run: ``python -m agm_fast.benchmarks.bench_agm_step [--device cuda] [--quick] [--threads N] [--markdown FILE]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from agm_fast.benchmarks.baselines.agm_reference_style import ReferenceAGMState, ReferenceGradMod, reference_agm_step
from agm_fast.benchmarks.harness import (
    Outcome,
    bench_main,
    bench_parser,
    check_close,
    peak_memory,
    print_table,
    time_interleaved,
)
from torch import Tensor, nn

import agm_fast

PROVIDERS = (
    "baseline", "batched", "factorized", "factorized-recompute", "factorized-ckpt", "factorized-train", "joint"
)
CPU_CASES = ("resnet2-concat", "resnet2-mlp", "transformer3-concat", "vit2-concat", "vit2-mlp", "vit3-concat",
             "bert2-concat")
GPU_CASES = ("resnet18-crema-concat", "resnet18-crema-mlp", "transformer3-urfunny-concat")
CASES = CPU_CASES + GPU_CASES
ALPHA = 1.5


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class ConvEncoder(nn.Module):
    """Small ResNet: stem, three basic blocks (widths w, 2w, 4w), global average pool -> ``[B, 4w]``."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(
            BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2)
        )
        self.out_dim = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class ResNet18Encoder(nn.Module):
    """ResNet-18 trunk (7x7 stem, max pool, four stages of two basic blocks, widths 64..512), average pool ->
    ``[B, 512]``."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class TokenEncoder(nn.Module):
    """Linear projection, a Transformer encoder with dropout, mean pool over tokens -> ``[B, d_model]``."""

    def __init__(self, d_in: int, d_model: int, layers: int, heads: int = 4, ffn: Optional[int] = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn or 2 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out_dim = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.proj(x)).mean(dim=1)


class _ViTBlock(nn.Module):
    """Pre-norm Transformer block as timm's ViT builds it (LayerNorm, attention, LayerNorm, GELU MLP), no dropout."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """A ViT with timm's defaults (no dropout, no stochastic depth): timm's VisionTransformer when timm imports,
    else the same architecture (patch embedding, class token, pre-norm blocks, final LayerNorm) -> ``[B, dim]``."""

    def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.out_dim = dim
        try:
            from timm.models.vision_transformer import VisionTransformer

            self.vit = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                                         num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
            self.source = "timm"
        except ImportError:
            self.vit = None
            self.source = "built-in"
            self.patch = nn.Conv2d(3, dim, patch, patch)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
            self.blocks = nn.Sequential(*[_ViTBlock(dim, heads) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        if self.vit is not None:
            return self.vit(x)
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.norm(self.blocks(tokens))[:, 0]


class BertEncoder(nn.Module):
    """BERT-like: token and position embeddings, LayerNorm, post-norm Transformer layers with dropout 0.1, the first
    token's feature -> ``[B, dim]``."""

    def __init__(self, vocab: int, length: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.1)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out_dim = dim

    def forward(self, ids: Tensor) -> Tensor:
        return self.encoder(self.drop(self.norm(self.tok(ids) + self.pos)))[:, 0]


class MLPHead(nn.Module):
    """``fusion(*features)``: Linear-ReLU-Linear over the concatenated features."""

    def __init__(self, d_in: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, *features: Tensor) -> Tensor:
        return self.net(torch.cat(features, dim=1))


class JointModel(nn.Module):
    """``model(*inputs) = fusion(enc_0(x_0), ..., enc_{M-1}(x_{M-1}))`` (an nn.Linear fusion takes the concat)."""

    def __init__(self, encoders: Sequence[nn.Module], fusion: nn.Module) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion

    def forward(self, *inputs: Tensor) -> Tensor:
        feats = [enc(x) for enc, x in zip(self.encoders, inputs)]
        if isinstance(self.fusion, nn.Linear):
            return self.fusion(torch.cat(feats, dim=1))
        return self.fusion(*feats)


def make_case(name: str, quick: bool, device: torch.device, seed: int = 0) -> Dict[str, object]:
    """Build one benchmark model with its batch: ``{"model", "inputs", "labels", "M", "B"}``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = 10
    if name.startswith("resnet18-crema"):
        B, num_classes = (4 if quick else 64), 6
        encoders = [ResNet18Encoder(1), ResNet18Encoder(3)]
        inputs = [torch.randn(B, 1, 257, 188, generator=gen), torch.randn(B, 3, 224, 224, generator=gen)]
    elif name.startswith("transformer3-urfunny"):
        B, T, num_classes = (4 if quick else 64), 50, 2
        dims = (300, 81, 371)
        encoders = [TokenEncoder(d, 768, 8, heads=12, ffn=3072) for d in dims]
        inputs = [torch.randn(B, T, d, generator=gen) for d in dims]
    elif name.startswith("resnet2"):
        B, side, width = (8, 8, 4) if quick else (32, 16, 24)
        encoders = [ConvEncoder(1, width), ConvEncoder(3, width)]
        inputs = [torch.randn(B, 1, side, side, generator=gen), torch.randn(B, 3, side, side, generator=gen)]
    elif name.startswith("vit"):
        M = int(name[3])
        B, img, patch, dim, depth, heads = (4, 16, 8, 32, 1, 2) if quick else (32, 32, 8, 128, 4, 4)
        encoders = [ViTEncoder(img, patch, dim, depth, heads) for _ in range(M)]
        inputs = [torch.randn(B, 3, img, img, generator=gen) for _ in range(M)]
    elif name.startswith("bert"):
        M = int(name[4])
        B, length, dim, layers, heads = (4, 8, 32, 1, 2) if quick else (32, 32, 128, 4, 4)
        encoders = [BertEncoder(1000, length, dim, layers, heads) for _ in range(M)]
        inputs = [torch.randint(1, 1000, (B, length), generator=gen) for _ in range(M)]
    elif name.startswith("transformer3"):
        B, T, d_model, layers = (8, 6, 16, 1) if quick else (48, 8, 256, 2)
        dims = (20, 32, 48)
        encoders = [TokenEncoder(d, d_model, layers) for d in dims]
        inputs = [torch.randn(B, T, d, generator=gen) for d in dims]
    else:
        raise ValueError(f"unknown case {name!r}; choose from {CASES}")
    feat = sum(e.out_dim for e in encoders)
    fusion = MLPHead(feat, 64, num_classes) if name.endswith("mlp") else nn.Linear(feat, num_classes)
    model = JointModel(encoders, fusion).to(device)
    labels = torch.randint(0, num_classes, (B,), generator=gen)
    return {
        "model": model,
        "inputs": [x.to(device) for x in inputs],
        "labels": labels.to(device),
        "M": len(encoders),
        "B": B,
    }


def make_provider(name: str, model: JointModel, M: int) -> Callable[..., Optional[List[float]]]:
    """A training-step function ``step(inputs, labels, optimizer, apply=True) -> coeffs or None`` on ``model``.

    With ``apply=False`` the gradients are left in place (zeroed first) and the optimizer is not stepped.
    """
    ce = nn.functional.cross_entropy
    if name == "baseline":
        wrapper = ReferenceGradMod(model, M)
        state = ReferenceAGMState(M, ALPHA)

        def step(inputs, labels, optimizer, apply=True):
            optimizer.zero_grad()
            coeffs, _, _ = reference_agm_step(wrapper, state, inputs, labels, optimizer if apply else None)
            return coeffs

        return step
    if name == "joint":

        def step(inputs, labels, optimizer, apply=True):
            optimizer.zero_grad()
            ce(model(*inputs), labels).backward()
            if apply:
                optimizer.step()
            return None

        return step
    if name == "batched":
        agm = agm_fast.AGM(model, num_modalities=M, alpha=ALPHA, strategy="batched")
    elif name == "factorized":
        agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, alpha=ALPHA)
    elif name == "factorized-recompute":
        agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, alpha=ALPHA, mode_invariant=False)
    elif name == "factorized-ckpt":
        agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, alpha=ALPHA, checkpoint_masked=True)
    elif name == "factorized-train":
        agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, alpha=ALPHA, masked_mode="train")
    else:
        raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")

    def step(inputs, labels, optimizer, apply=True):
        res = agm(*inputs, target=labels)
        optimizer.zero_grad()
        ce(res.logits, labels).backward()
        if apply:
            optimizer.step()
        return res.coeffs

    step.agm = agm
    return step


def _count_encoder_passes(model: JointModel, fn: Callable[[], object], batch: int):
    calls, samples = [0], [0]

    def hook(module, args):
        calls[0] += 1
        samples[0] += args[0].shape[0]

    handles = [enc.register_forward_pre_hook(hook) for enc in model.encoders]
    try:
        out = fn()
    finally:
        for h in handles:
            h.remove()
    return out, calls[0], samples[0] / batch


def run_case(case_name: str, device: torch.device, quick: bool, providers: Sequence[str], rep: int) -> List[Dict]:
    """Check every provider against the baseline, then time the ones that pass; returns the table rows."""
    case = make_case(case_name, quick, device)
    base_model, inputs, labels, M, B = case["model"], case["inputs"], case["labels"], case["M"], case["B"]
    rows = []
    timed = {}
    want = None
    # The baseline always runs first: every other provider is checked against it.
    for prov in ["baseline"] + [p for p in providers if p != "baseline"]:
        model = copy.deepcopy(base_model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        step = make_provider(prov, model, M)
        torch.manual_seed(1)
        coeffs, calls, samples = _count_encoder_passes(model, lambda: step(inputs, labels, opt, apply=False), B)
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        if prov == "baseline":
            want = (torch.tensor(coeffs, dtype=torch.float32), grads)
            check = "reference"
        elif prov == "joint":
            check = "finite (not AGM)" if all(torch.isfinite(g).all() for g in grads) else "NON-FINITE"
        elif prov == "factorized-train":
            ok = torch.isfinite(coeffs).all() and all(torch.isfinite(g).all() for g in grads)
            check = "finite (deviation)" if ok else "NON-FINITE"
        else:
            err = check_close(f"{prov} coeffs", coeffs.cpu(), want[0], rtol=1e-4, atol=1e-5)
            err = err or check_close(
                f"{prov} grads", [g.cpu() for g in grads], [g.cpu() for g in want[1]], rtol=1e-3, atol=1e-5
            )
            check = "ok" if err is None else err
        row = {"case": case_name, "provider": prov, "M": M, "B": B, "enc_calls": calls,
               "enc_samples_xB": round(samples, 3), "check": check}
        agm = getattr(step, "agm", None)
        if agm is not None and agm.strategy == "factorized":
            encs = agm.describe().get("encoders", [])
            row["reuse"] = f"{sum(1 for e in encs if e['reuses_full_pass'])}/{len(encs)}"
        # Peak memory of one more step (forward and backward) above what the model and optimizer already hold; every
        # provider starts without gradients, so the gradients' own allocation counts alike.
        opt.zero_grad(set_to_none=True)
        row["peak_MB"] = peak_memory(lambda: step(inputs, labels, opt, apply=False), device) / 2**20
        rows.append(row)
        if check in ("ok", "reference", "finite (deviation)", "finite (not AGM)"):
            # The timed steps start from the checked state; the optimizer steps on, as in training.
            timed[prov] = lambda step=step, opt=opt: step(inputs, labels, opt)
    # Two untimed steps of each provider first; on CPU the providers then take turns, one step each per round.
    times = time_interleaved(timed, device, warmup=2, rep=rep)
    for r in rows:
        r.update(times.get(r["provider"], {}))
    base = times.get("baseline")
    joint = times.get("joint")
    joint_mem = next((r["peak_MB"] for r in rows if r["provider"] == "joint"), None)
    for r in rows:
        if joint_mem:
            r["mem_vs_joint"] = r["peak_MB"] / joint_mem
        if "median_ms" not in r:
            continue
        if base is not None:
            r["speedup_vs_baseline"] = base["median_ms"] / r["median_ms"]
        if joint is not None:
            r["ratio_vs_joint"] = r["median_ms"] / joint["median_ms"]
    return rows


LEGEND = (
    "speedup_vs_baseline = baseline median / provider median (higher is faster); ratio_vs_joint = provider median / "
    "median of plain joint training without AGM (1.0 = the cost of training without AGM). enc_calls = encoder "
    "forward calls per step; enc_samples_xB = samples through the encoders per step, in units of the batch size B "
    "(a muted encoder's single zero sample adds 1/B). Providers are timed interleaved, one step each per round, in "
    "one run; the ratios are the result, absolute times only mean something on the machine named above. "
    "factorized-train (masked_mode='train') is a documented deviation and is checked for finiteness only. "
    "reuse = encoders whose masked passes reuse the full pass (mode-invariant, decided by the scan and the first-step "
    "check; factorized-recompute turns it off). peak_MB = peak memory of one step above what the model and optimizer "
    "hold (CPU: the profiler's memory view; CUDA: max_memory_allocated); mem_vs_joint = that over joint's."
)

COLUMNS = ("provider", "median_ms", "p20_ms", "p80_ms", "speedup_vs_baseline", "ratio_vs_joint", "peak_MB",
           "mem_vs_joint", "enc_calls", "enc_samples_xB", "reuse", "check")


class TokenTransformerHead(nn.Module):
    """Each modality's feature projected to one token (plus a learned position), a 2-layer Transformer encoder over
    the M tokens (dropout 0.1), mean pool, a linear output; its split is the token projections side by side."""

    def __init__(self, dims: Sequence[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.width = width
        self.proj = nn.ModuleList(nn.Linear(d, width) for d in dims)
        self.pos = nn.Parameter(torch.randn(len(dims), width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(width, num_classes)

    def _tail(self, z: Tensor) -> Tensor:
        tokens = z.view(z.shape[0], -1, self.width) + self.pos
        return self.out(self.encoder(tokens).mean(dim=1))

    def forward(self, *features: Tensor) -> Tensor:
        return self._tail(torch.cat([p(h) for p, h in zip(self.proj, features)], dim=1))

    def split_head(self, *features: Tensor) -> agm_fast.HeadSplit:
        pieces = [nn.functional.linear(h, p.weight) for p, h in zip(self.proj, features)]
        return agm_fast.HeadSplit(pieces, torch.cat([p.bias for p in self.proj]), self._tail, "concat")


def mlp_encoder(dropout: float) -> nn.Module:
    """256 -> 256 -> 128 with LayerNorm and GELU (and Dropout when ``dropout`` > 0)."""
    layers = [nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(256, 128), nn.LayerNorm(128))


SWEEP_MS = (2, 3, 4, 6, 8)
SWEEP_HEADS = ("concat", "mlp", "gated", "tokens")


def sweep_head(name: str, M: int, num_classes: int) -> nn.Module:
    dims = [128] * M
    if name == "concat":
        return agm_fast.ConcatFusion(dims, num_classes)
    if name == "mlp":
        return agm_fast.MLPFusion(dims, num_classes, hidden=256)
    if name == "gated":
        return agm_fast.GatedFusion(dims, num_classes, hidden=128)
    return TokenTransformerHead(dims, num_classes)


def run_sweep_case(M: int, head: str, dropout: float, rep: int, seq_max: int, quick: bool) -> Dict[str, object]:
    """One row of the sweep: ratios over joint (median and the p20-p80 range of the per-round ratios)."""
    B, C = (8 if quick else 64), 10
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base = JointModel([mlp_encoder(dropout) for _ in range(M)], sweep_head(head, M, C))
    inputs = [torch.randn(B, 256, generator=gen) for _ in range(M)]
    labels = torch.randint(0, C, (B,), generator=gen)
    ce = nn.functional.cross_entropy
    steps, agms = {}, {}
    kinds = {"joint": None, "exact": {}, "sampled": {"shapley": "sampled", "num_permutations": 16},
             "stratified": {"shapley": "stratified", "rounds": 2}}
    if M <= seq_max:
        kinds["sequential"] = {"strategy": "sequential"}
    for kind, kw in kinds.items():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if kw is None:
            def step(model=model, opt=opt):
                opt.zero_grad()
                ce(model(*inputs), labels).backward()
                opt.step()
        else:
            if kw.get("strategy") == "sequential":
                agm = agm_fast.AGM(model, num_modalities=M, alpha=ALPHA, **kw)
            else:
                agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, alpha=ALPHA, **kw)
            agms[kind] = (agm, model)

            def step(agm=agm, opt=opt):
                res = agm(*inputs, target=labels)
                opt.zero_grad()
                ce(res.logits, labels).backward()
                opt.step()
        steps[kind] = step
    check = _sweep_check(base, inputs, labels, M)
    samples: Dict[str, List[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()
        fn()
    for _ in range(rep):
        for k, fn in steps.items():
            t0 = time.thread_time()
            fn()
            samples[k].append((time.thread_time() - t0) * 1e3)
    row = {"M": M, "head": head, "encoders": "dropout" if dropout else "invariant", "B": B,
           "joint_ms": statistics.median(samples["joint"]), "check": check,
           "split": agms["exact"][0]._split_head, "closed_form": agms["exact"][0]._linear_head}
    for k in steps:
        if k == "joint":
            continue
        ratios = sorted(a / j for a, j in zip(samples[k], samples["joint"]))
        row[f"{k}_x"] = statistics.median(samples[k]) / row["joint_ms"]
        row[f"{k}_range"] = f"{ratios[len(ratios) // 5]:.2f}-{ratios[(4 * len(ratios)) // 5 - 1]:.2f}"
    return row


def _sweep_check(base: nn.Module, inputs: List[Tensor], labels: Tensor, M: int) -> str:
    """Exact AGM (factorized) against the sequential strategy in float64: one step's coefficients and gradients, from
    the same weights and dropout seed; the largest relative error (norm) over the coefficients and every gradient."""
    if M > 6:
        return "not checked (sequential too slow)"
    out = []
    inputs = [x.double() for x in inputs]
    for strategy in ("factorized", "sequential"):
        model = copy.deepcopy(base).double()
        if strategy == "sequential":
            agm = agm_fast.AGM(model, num_modalities=M, alpha=ALPHA, strategy=strategy)
        else:
            agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, alpha=ALPHA)
        torch.manual_seed(1)
        res = agm(*inputs, target=labels)
        nn.functional.cross_entropy(res.logits, labels).backward()
        out.append([res.coeffs] + [p.grad for p in model.parameters()])
    err = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(*out))
    return f"rel err {err:.1e}"


SWEEP_COLUMNS = ("M", "head", "encoders", "split", "joint_ms", "exact_x", "exact_range", "sampled_x", "sampled_range",
                 "stratified_x", "stratified_range", "sequential_x", "sequential_range", "check")


def _sweep(args: argparse.Namespace, device: torch.device, machine: str) -> Outcome:
    rep = args.rep if args.rep is not None else (2 if args.quick else 7)
    text = [machine, "", f"command: {args.command}", ""]
    if hasattr(os, "getloadavg"):
        text += [f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", ""]
    text += [
        "Times are the thread's CPU time (time.thread_time, 1 thread): on a shared machine it leaves out the time the "
        "process waits for a core, which wall-clock time does not. x = provider median / joint median over the same "
        "rounds (joint, exact, sampled and sequential take turns, one step each per round); range = 20th-80th "
        "percentile of the per-round ratios. exact = the default "
        "factorized strategy; split = the head's first layer runs once per modality (False: the concat head's closed "
        "form). check = exact AGM against the sequential strategy, one step (largest relative error of the "
        "coefficients and every gradient, float64).", ""]
    rows = []
    for M in args.ms:
        for head in args.heads:
            for dropout in (0.0, 0.1):
                row = run_sweep_case(M, head, dropout, rep, args.seq_max, args.quick)
                print(row, flush=True)
                rows.append(row)
    text.append(print_table(f"AGM step against joint, by M (B={rows[0]['B']})", rows, SWEEP_COLUMNS))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(text))
    return Outcome(records=rows, failed=False)


def _bench(args: argparse.Namespace, device: torch.device, machine: str) -> Outcome:
    if args.sweep:
        return _sweep(args, device, machine)
    rep = args.rep if args.rep is not None else (3 if args.quick else 15)
    cases = args.cases or list(GPU_CASES if device.type == "cuda" else CPU_CASES)
    text = [machine, "", f"command: {args.command}", ""]
    if hasattr(os, "getloadavg"):
        text += [f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", ""]
    text += [LEGEND, ""]
    try:
        import timm  # noqa: F401

        text += ["ViT encoders: timm's VisionTransformer (pretrained=False).", ""]
    except ImportError:
        text += ["ViT encoders: built here with timm's architecture and defaults (timm does not import here).", ""]
    records = []
    failed = False
    for case_name in cases:
        rows = run_case(case_name, device, args.quick, args.providers, rep)
        M, B = rows[0]["M"], rows[0]["B"]
        title = f"AGM training step: {case_name} (M={M}, B={B}{', quick' if args.quick else ''})"
        text.append(print_table(title, rows, COLUMNS))
        records.extend(dict(r, quick=args.quick) for r in rows)
        failed = failed or any("median_ms" not in r for r in rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(text))
    return Outcome(records=records, failed=failed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 when every provider passed its check, 1 otherwise, 2 when ``--out`` is not writable.
    """
    parser = bench_parser("bench_agm_step", __doc__, quick="tiny sizes (a smoke run)")
    parser.add_argument(
        "--cases", nargs="+", default=None, choices=CASES, help="default: the small models on CPU, GPU sizes on cuda"
    )
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--rep", type=int, default=None, help="timed steps per provider (CPU; default 15, quick 3)")
    parser.add_argument("--markdown", default=None, help="also write the printed tables to this file")
    parser.add_argument("--sweep", action="store_true", help="the cost-vs-M table (CPU) instead of the cases")
    parser.add_argument("--ms", nargs="+", type=int, default=list(SWEEP_MS), help="sweep: the M values")
    parser.add_argument("--heads", nargs="+", default=list(SWEEP_HEADS), choices=SWEEP_HEADS, help="sweep: heads")
    parser.add_argument("--seq-max", type=int, default=4, help="sweep: time the sequential strategy up to this M")
    return bench_main("bench_agm_step", parser, argv, _bench)


if __name__ == "__main__":
    raise SystemExit(main())
