"""GDL against an independent float64 computation (docs/methods.md, section 12): every gradient, the decisions and
the coefficients at M = 2 and 3, the switches, the window, other heads and the errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agm_fast
from agm_fast import methods

DT = torch.float64
IN_DIMS = [5, 6, 7]
FEAT_DIMS = [3, 4, 2]
C, B = 4, 10


def model(M, seed=0):
    torch.manual_seed(seed)
    encoders = [nn.Sequential(nn.Linear(i, d), nn.Tanh()).to(DT) for i, d in zip(IN_DIMS[:M], FEAT_DIMS[:M])]
    fusion = nn.Linear(sum(FEAT_DIMS[:M]), C).to(DT)
    with torch.no_grad():
        fusion.bias.uniform_(-1.0, 1.0)  # a bias large enough that its rule matters
    return encoders, fusion


def batch(M, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, i, generator=g, dtype=DT) for i in IN_DIMS[:M]]
    return xs, torch.randint(0, C, (B,), generator=g)


def expected(encoders, fusion, xs, y, alpha, clip, bias="full", keep=False):
    """The step by hand: separate losses, gradients by torch.autograd.grad, the clip written out."""
    M = len(encoders)
    hs = [e(x) for e, x in zip(encoders, xs)]
    W, b = fusion.weight, fusion.bias
    Ws = torch.split(W, FEAT_DIMS[:M], dim=1)
    fused = torch.cat([h.detach() for h in hs], 1) @ W.t() + b
    grads = dict(zip(("weight", "bias"), torch.autograd.grad(F.cross_entropy(fused, y), [W, b])))
    losses = []
    for m, enc in enumerate(encoders):
        out_m = hs[m] @ Ws[m].t() + {"full": b, "split": b / M, "none": 0.0 * b}[bias]
        loss_m = F.cross_entropy(out_m, y)
        losses.append(loss_m.detach())
        params = list(enc.parameters())
        gs = torch.autograd.grad(alpha * loss_m, params + [W, b])
        for j, g in enumerate(gs[: len(params)]):
            grads[f"enc{m}.{j}"] = g
        if keep:
            grads["weight"] = grads["weight"] + gs[-2]
            grads["bias"] = grads["bias"] + gs[-1]
    N = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    c = 1.0 if clip is None else min(1.0, clip / (N + 1e-6))
    return {k: g * c for k, g in grads.items()}, torch.stack(losses), N, c


def ours(encoders, fusion, xs, y, **kwargs):
    method = methods.create("gdl", encoders, fusion, **kwargs)
    out = method.forward(xs, y, 0)
    task = method.task_loss(out, y)
    (task + method.loss_term(task, out)).backward()
    coeffs = method.before_optimizer_step(out, y)
    grads = {"weight": fusion.weight.grad, "bias": fusion.bias.grad} if isinstance(fusion, nn.Linear) else {}
    for m, enc in enumerate(encoders):
        grads.update({f"enc{m}.{j}": p.grad for j, p in enumerate(enc.parameters())})
    return grads, method.decisions(), coeffs


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("clip", [40.0, 0.3, None])
@pytest.mark.parametrize("keep", [False, True])
def test_every_gradient_decision_and_coefficient_by_hand(M, clip, keep):
    encoders, fusion = model(M)
    xs, y = batch(M)
    alpha = 2.5
    want, losses, N, c = expected(copy.deepcopy(encoders), copy.deepcopy(fusion), xs, y, alpha, clip, keep=keep)
    got, dec, coeffs = ours(encoders, fusion, xs, y, alpha=alpha, clip_grad_norm=clip,
                            head_unimodal_grad="keep" if keep else "drop")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=lambda s, k=k: f"{k}: {s}")
    assert set(dec) == {"unimodal_loss", "grad_norm", "clip_coef"}
    torch.testing.assert_close(dec["unimodal_loss"], losses, rtol=1e-12, atol=0)
    assert dec["grad_norm"].item() == pytest.approx(N, rel=1e-12)
    assert dec["clip_coef"].item() == pytest.approx(c, rel=1e-12)
    if clip == 0.3:
        assert c < 1.0  # the clip binds in this case
    assert coeffs.dtype == torch.float32 and coeffs.shape == (M,)
    torch.testing.assert_close(coeffs, torch.full((M,), alpha * c, dtype=torch.float32))


@pytest.mark.parametrize("bias", ["split", "none"])
def test_bias_rules(bias):
    encoders, fusion = model(3)
    xs, y = batch(3)
    want, losses, _, _ = expected(copy.deepcopy(encoders), copy.deepcopy(fusion), xs, y, 4.0, 40.0, bias=bias)
    full, _, _, _ = expected(copy.deepcopy(encoders), copy.deepcopy(fusion), xs, y, 4.0, 40.0)
    got, dec, _ = ours(encoders, fusion, xs, y, bias=bias)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dec["unimodal_loss"], losses, rtol=1e-12, atol=0)
    # The rule changes the encoders' gradients (the bias shifts each unimodal softmax).
    assert not torch.allclose(got["enc0.0"], full["enc0.0"])


def test_concat_fusion_module_and_linear_head_agree():
    encoders, fusion = model(2)
    xs, y = batch(2)
    head = agm_fast.ConcatFusion(FEAT_DIMS[:2], C).to(DT)
    head.fc.load_state_dict(fusion.state_dict())
    e2 = copy.deepcopy(encoders)
    a, da, _ = ours(encoders, fusion, xs, y, clip_grad_norm=0.3)
    b, db, _ = ours(e2, head, xs, y, clip_grad_norm=0.3)
    for k in ("enc0.0", "enc0.1", "enc1.0", "enc1.1"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a["weight"], head.fc.weight.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(da["clip_coef"], db["clip_coef"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "sum"])
@pytest.mark.parametrize("keep", [False, True])
def test_other_heads_use_per_modality_logits(kind, keep):
    M = 3
    encoders, _ = model(M)
    torch.manual_seed(3)
    head = agm_fast.fusion.build_fusion(kind, FEAT_DIMS[:M], C).to(DT)
    xs, y = batch(M)
    ref_enc, ref_head = copy.deepcopy(encoders), copy.deepcopy(head)
    hs = [e(x) for e, x in zip(ref_enc, xs)]
    hp = list(ref_head.parameters())
    grads = list(torch.autograd.grad(F.cross_entropy(ref_head(*[h.detach() for h in hs]), y), hp))
    for m in range(M):
        if kind == "sum":
            out_m = ref_head.fcs[m](hs[m])  # the sum head: fc_m with its own bias
        else:
            out_m = ref_head(*[h if j == m else torch.zeros_like(h) for j, h in enumerate(hs)])
        params = list(ref_enc[m].parameters())
        gs = torch.autograd.grad(2.0 * F.cross_entropy(out_m, y), params + hp, allow_unused=True)
        for p, g in zip(params, gs):
            p.grad = g
        if keep:
            grads = [a if g is None else a + g for a, g in zip(grads, gs[len(params):])]
    got, _, _ = ours(encoders, head, xs, y, alpha=2.0, clip_grad_norm=None,
                     head_unimodal_grad="keep" if keep else "drop")
    for m in range(M):
        for j, p in enumerate(ref_enc[m].parameters()):
            torch.testing.assert_close(got[f"enc{m}.{j}"], p.grad, rtol=1e-10, atol=1e-12)
    for p, g in zip(head.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_outside_the_window_joint_training_and_no_decisions():
    encoders, fusion = model(2)
    xs, y = batch(2)
    method = methods.create("gdl", encoders, fusion, window=(1, 3))
    out = method.forward(xs, y, 0)
    assert out.logits.requires_grad and out.features[0].requires_grad
    task = method.task_loss(out, y)
    assert method.loss_term(task, out) is None
    task.backward()
    assert torch.equal(method.before_optimizer_step(out, y), torch.ones(2))
    assert method.decisions() == {}
    # Inside the window the task loss reaches the head only.
    method.forward(xs, y, 1)
    assert method.decisions() == {}
    out = method.forward(xs, y, 1)
    enc_params = [p for e in encoders for p in e.parameters()]
    gs = torch.autograd.grad(method.task_loss(out, y), enc_params + [fusion.weight], allow_unused=True)
    assert all(g is None for g in gs[:-1]) and gs[-1] is not None


def test_regression_uses_squared_error():
    encoders, fusion = model(2)
    xs, _ = batch(2)
    target = torch.randn(B, C, dtype=DT)
    method = methods.create("gdl", encoders, fusion, task="regression", alpha=1.5)
    out = method.forward(xs, target, 0)
    term = method.loss_term(method.task_loss(out, target), out)
    hs = [e(x) for e, x in zip(encoders, xs)]
    Ws = torch.split(fusion.weight, FEAT_DIMS[:2], dim=1)
    want = [((h @ w.t() + fusion.bias) - target).pow(2).mean() for h, w in zip(hs, Ws)]
    torch.testing.assert_close(method.decisions()["unimodal_loss"], torch.stack(want).detach())
    torch.testing.assert_close(term, 1.5 * sum(want))


def test_non_finite_gradients_stay_non_finite():
    encoders, fusion = model(2)
    xs, y = batch(2)
    method = methods.create("gdl", encoders, fusion)
    out = method.forward(xs, y, 0)
    task = method.task_loss(out, y)
    (task + method.loss_term(task, out)).backward()
    encoders[0][0].weight.grad[0, 0] = float("inf")
    method.before_optimizer_step(out, y)
    assert not torch.isfinite(encoders[0][0].weight.grad).all()
    assert not torch.isfinite(method.decisions()["grad_norm"])


def test_the_cli_flags_and_defaults():
    cls, _ = methods.get("gdl")
    assert cls.defaults() == {"alpha": 4.0, "clip_grad_norm": 40.0, "bias": "full", "head_unimodal_grad": "drop"}
    flags = {p.name: p.cli_flag for p in cls.HPARAMS}
    assert flags["head_unimodal_grad"] == "--head-unimodal-grad" and flags["clip_grad_norm"] == "--clip-grad-norm"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": -1.0}, "alpha: expected"),
        ({"alpha": float("nan")}, "alpha: expected"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm: expected"),
        ({"bias": "half"}, "bias: expected one of"),
        ({"head_unimodal_grad": "detach"}, "head_unimodal_grad: expected one of"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, match):
    encoders, fusion = model(2)
    with pytest.raises(ValueError, match=match):
        methods.create("gdl", encoders, fusion, **kwargs)


def test_a_bias_rule_on_a_head_that_is_not_concat_is_refused():
    encoders, _ = model(2)
    head = agm_fast.fusion.build_fusion("mlp", FEAT_DIMS[:2], C)
    with pytest.raises(ValueError, match="bias: expected 'full' for a MLPFusion head"):
        methods.create("gdl", encoders, head, bias="split")
    methods.create("gdl", encoders, head)  # the default is accepted
