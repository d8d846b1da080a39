"""Mixed precision and compiled training steps: autocast, GradScaler and torch.compile through AGM and OGM-GE."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import agm_fast

B, C = 16, 5
DIMS = (7, 4)


def _models(seed: int = 0):
    torch.manual_seed(seed)
    encoders = [nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 8)) for d in DIMS]
    fusion = agm_fast.ConcatFusion([8, 8], C)
    return encoders, fusion, [p for m in encoders + [fusion] for p in m.parameters()]


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=gen) for d in DIMS], torch.randint(0, C, (B,), generator=gen)


def test_bf16_autocast_agm_step_gives_float32_coefficients():
    xs, y = _batch()
    coeffs = {}
    for dtype in (None, torch.bfloat16):
        encoders, fusion, _ = _models()
        agm = agm_fast.AGM(encoders=encoders, fusion=fusion, alpha=1.5)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                res = agm(*xs, target=y)
                loss = nn.functional.cross_entropy(res.logits.float(), y)
            loss.backward()
        assert res.coeffs.dtype == torch.float32 and res.scores.dtype == torch.float32
        coeffs[dtype] = res.coeffs
    torch.testing.assert_close(coeffs[torch.bfloat16], coeffs[None], rtol=0.05, atol=0.05)


def test_grad_scaler_skips_an_inf_step_and_leaves_the_state_consistent():
    encoders, fusion, params = _models()
    agm = agm_fast.AGM(encoders=encoders, fusion=fusion, alpha=1.5)
    ogm = agm_fast.OGMGE(encoders, alpha=0.8, mode="OGM_GE", seed=3)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    xs, y = _batch()

    def step(inject_inf: bool):
        x0 = xs[0].clone()
        if inject_inf:
            x0[0, 0] = float("inf")
        res = agm(x0, xs[1], target=y)
        feats = [enc(x) for enc, x in zip(encoders, (x0, xs[1]))]
        loss = nn.functional.cross_entropy(res.logits, y) + nn.functional.cross_entropy(fusion(*feats), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        # The noise is added to the unscaled gradient: unscale first, then modulate, then step.
        scaler.unscale_(opt)
        ogm.step_from_features(y, fusion, [f.detach() for f in feats], epoch=0)
        scaler.step(opt)
        scaler.update()
        return res

    step(False)
    state = copy.deepcopy(agm.state_dict())
    before = [p.detach().clone() for p in params]
    scale = scaler.get_scale()
    res = step(True)
    assert res.coeffs.isnan().all() and res.scores.isnan().any()
    # The step was skipped: parameters untouched, scale reduced, AGM's running state as before the bad step.
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    assert scaler.get_scale() < scale
    # (The sampled-Shapley step counter in _extra_state counts calls, skipped or not, identically on every rank.)
    now = agm.state_dict()
    for key in ("coefficients.running", "coefficients.count", "coefficients.last_coeffs"):
        assert torch.equal(now[key], state[key]), key
    step(False)
    assert torch.isfinite(agm.state_dict()["coefficients.running"]).all()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("strategy", ["factorized", "batched"])
def test_compiled_agm_forward_equals_eager(strategy):
    xs, y = _batch()
    results = []
    for compiled in (False, True):
        encoders, fusion, params = _models()
        if strategy == "factorized":
            agm = agm_fast.AGM(encoders=encoders, fusion=fusion, alpha=1.5)
        else:

            class Model(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.encoders = nn.ModuleList(encoders)
                    self.fusion = fusion

                def forward(self, *inputs):
                    return self.fusion(*[e(x) for e, x in zip(self.encoders, inputs)])

            agm = agm_fast.AGM(Model(), num_modalities=2, alpha=1.5, strategy="batched")

        def forward_loss(a, b, target):
            res = agm(a, b, target=target)
            return nn.functional.cross_entropy(res.logits, target), res.coeffs

        fn = torch.compile(forward_loss, fullgraph=True, backend="aot_eager") if compiled else forward_loss
        opt = torch.optim.SGD(params, lr=0.1)
        out = []
        for _ in range(3):
            loss, coeffs = fn(*xs, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append((loss.detach(), coeffs.detach()))
        results.append((out, [p.detach().clone() for p in params]))
    for (a_loss, a_c), (b_loss, b_c) in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b_loss, a_loss)
        torch.testing.assert_close(b_c, a_c)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("head", ["concat", "mlp"])
def test_a_compiled_agm_step_compiles_once(head):
    # The step counter of the sampled estimators is left alone by the exact variants and the encoders' batch-norm scan
    # is made at construction: a compiled step that read or filled either would recompile at every step (and fall
    # back to eager after torch's recompile limit). One eager step decides the encoders' reuse, then one compile.
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(4, 8), nn.ReLU()) for _ in range(2)]
    fusion = agm_fast.ConcatFusion([8, 8], 3) if head == "concat" else agm_fast.MLPFusion([8, 8], 3, hidden=6)
    agm = agm_fast.AGM(encoders=encoders, fusion=fusion, alpha=1.0)

    def forward_loss(a, b, target):
        res = agm(a, b, target=target)
        return nn.functional.cross_entropy(res.logits, target), res.coeffs

    compiled = torch.compile(forward_loss, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    batches = [([torch.randn(5, 4, generator=gen) for _ in range(2)], torch.randint(0, 3, (5,), generator=gen))
               for _ in range(5)]
    forward_loss(*batches[0][0], batches[0][1])[0].backward()
    compiled(*batches[1][0], batches[1][1])[0].backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        for xs, y in batches[2:]:
            compiled(*xs, y)[0].backward()
    assert float(agm.coefficients.count) == 5
