"""MLB against an independent float64 computation from docs/methods.md (section 11)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agm_fast
from agm_fast import methods
from agm_fast.fusion import ConcatFusion, MLPFusion, SumFusion

DT = torch.float64
IN_DIMS = [5, 6, 7, 4]
FEAT = [3, 4, 2, 5]
C = 3


def model(M, fusion="concat", feat=None):
    torch.manual_seed(0)
    feat = feat or FEAT[:M]
    encoders = [nn.Sequential(nn.Linear(i, d), nn.Tanh(), nn.Linear(d, d)).to(DT) for i, d in zip(IN_DIMS, feat)]
    if fusion == "concat":
        head = ConcatFusion(feat, C)
    elif fusion == "linear":
        head = nn.Linear(sum(feat), C)
    elif fusion == "sum":
        head = SumFusion(feat, C)
    else:
        head = MLPFusion(feat, C, hidden=5)
    heads = [nn.Linear(d, C).to(DT) for d in feat]
    return encoders, head.to(DT), heads


def batch(M, B=10, seed=1, regression=False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, IN_DIMS[m], generator=g, dtype=DT) for m in range(M)]
    y = torch.randn(B, C, generator=g, dtype=DT) if regression else torch.randint(0, C, (B,), generator=g)
    return xs, y


def hand_k(logits, y, alpha, beta=None, regression=False):
    """s_m, r_m and k_m in Python floats."""
    M = len(logits)
    s = []
    for z in logits:
        z = z.detach().numpy()
        if regression:
            s.append(float(((z - y.numpy()) ** 2).mean()))
        else:
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            s.append(float(np.mean([p[i, int(y[i])] for i in range(len(y))])))
    r = []
    for m in range(M):
        others = sum(s[j] for j in range(M) if j != m) / (M - 1)
        r.append(s[m] / others if regression else others / s[m])
    k = []
    for rm in r:
        t = math.tanh(alpha * (rm - 1))
        k.append(1 + (beta - 1) * t if beta is not None and rm > 1 else 1 + t)
    return s, r, k


def hand_step(encoders, fusion, heads, xs, y, alpha=0.8, beta=None, scale=True, regression=False):
    """One multi-loss backward on copies, then each gradient multiplied by hand: name -> grad."""
    encoders, fusion, heads = copy.deepcopy(encoders), copy.deepcopy(fusion), copy.deepcopy(heads)
    loss_fn = F.mse_loss if regression else F.cross_entropy
    hs = [e(x) for e, x in zip(encoders, xs)]
    fused = fusion(torch.cat(hs, 1)) if isinstance(fusion, nn.Linear) else fusion(*hs)
    logits = [h(z) for h, z in zip(heads, hs)]
    (loss_fn(fused, y) + sum(loss_fn(z, y) for z in logits)).backward()
    s, r, k = hand_k(logits, y, alpha, beta, regression)
    M = len(encoders)
    grads = {}
    for m in range(M):
        f = k[m] if scale else 1.0
        for n, p in encoders[m].named_parameters():
            grads[f"enc{m}.{n}"] = p.grad * f
        for n, p in heads[m].named_parameters():
            grads[f"head{m}.{n}"] = p.grad * f
    for n, p in fusion.named_parameters():
        g = p.grad.clone()
        if scale and n.endswith("weight") and isinstance(fusion, (nn.Linear, ConcatFusion)):
            off = 0
            for m, hm in enumerate(hs):
                g[:, off:off + hm.shape[1]] *= k[m]
                off += hm.shape[1]
        elif scale and isinstance(fusion, SumFusion) and n.endswith("weight"):
            g *= k[int(n.split(".")[1])]
        grads[f"fusion.{n}"] = g
    return (s, r, k), grads


def our_step(encoders, fusion, heads, xs, y, epoch=0, **kwargs):
    method = methods.create("mlb", encoders, fusion, heads=heads, **kwargs)
    out = method.forward(xs, y, epoch)
    method.loss(out, y).backward()
    coeffs = method.before_optimizer_step(out, y)
    grads = {}
    for m in range(len(encoders)):
        grads.update({f"enc{m}.{n}": p.grad for n, p in encoders[m].named_parameters()})
        grads.update({f"head{m}.{n}": p.grad for n, p in heads[m].named_parameters()})
    grads.update({f"fusion.{n}": p.grad for n, p in fusion.named_parameters()})
    return method, coeffs, grads


def assert_grads(ours, hand):
    assert set(ours) == set(hand)
    for n in hand:
        torch.testing.assert_close(ours[n], hand[n], msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("fusion", ["concat", "linear", "sum"])
def test_coefficients_and_every_gradient_match_hand_computation(M, fusion):
    encoders, head, heads = model(M, fusion)
    xs, y = batch(M)
    (s, r, k), hand = hand_step(encoders, head, heads, xs, y, alpha=0.8)
    method, coeffs, ours = our_step(encoders, head, heads, xs, y, alpha=0.8)
    assert coeffs.dtype == torch.float32 and coeffs.shape == (M,)
    torch.testing.assert_close(coeffs, torch.tensor(k, dtype=torch.float32))
    dec = method.decisions()
    for key, want in (("scores", s), ("ratios", r), ("k", k)):
        torch.testing.assert_close(dec[key], torch.tensor(want, dtype=DT))
    assert_grads(ours, hand)
    # The weaker modality (lower score) is boosted, the stronger damped; for M = 2 the two sit on either side of 1.
    assert (dec["k"][dec["scores"].argmin()] > 1) and (dec["k"][dec["scores"].argmax()] < 1)


def test_other_fusion_heads_leave_the_fusion_unscaled():
    encoders, head, heads = model(2, "mlp")
    xs, y = batch(2)
    _, unscaled = hand_step(encoders, head, heads, xs, y, scale=False)
    (_, _, k), _ = hand_step(encoders, head, heads, xs, y)
    method, coeffs, ours = our_step(encoders, head, heads, xs, y)
    assert method.scaled_fusion == "none"
    for n, g in unscaled.items():
        m = None if n.startswith("fusion") else int(n[4] if n.startswith("head") else n[3])
        torch.testing.assert_close(ours[n], g if m is None else g * k[m], msg=n)


def test_beta_caps_the_boost():
    encoders, head, heads = model(3)
    xs, y = batch(3)
    (_, r, k), hand = hand_step(encoders, head, heads, xs, y, alpha=1.0, beta=1.5)
    assert any(rm > 1 for rm in r) and any(rm < 1 for rm in r)
    _, coeffs, ours = our_step(encoders, head, heads, xs, y, alpha=1.0, beta=1.5)
    torch.testing.assert_close(coeffs, torch.tensor(k, dtype=torch.float32))
    assert float(coeffs.max()) < 1.5
    assert_grads(ours, hand)


def test_multi_loss_only_adds_the_losses_and_scales_nothing():
    encoders, head, heads = model(2)
    xs, y = batch(2)
    (_, _, k), hand = hand_step(encoders, head, heads, xs, y, scale=False)
    method, coeffs, ours = our_step(encoders, head, heads, xs, y, multi_loss_only=True)
    assert torch.equal(coeffs, torch.ones(2))
    torch.testing.assert_close(method.decisions()["k"], torch.tensor(k, dtype=DT))
    assert_grads(ours, hand)


def test_regression_scores_are_errors_and_the_ratio_is_inverted():
    encoders, head, heads = model(3)
    xs, y = batch(3, regression=True)
    (s, r, k), hand = hand_step(encoders, head, heads, xs, y, regression=True)
    method, coeffs, ours = our_step(encoders, head, heads, xs, y, task="regression")
    torch.testing.assert_close(method.decisions()["scores"], torch.tensor(s, dtype=DT))
    torch.testing.assert_close(coeffs, torch.tensor(k, dtype=torch.float32))
    assert_grads(ours, hand)


def test_outside_the_window_it_is_joint_training():
    encoders, head, heads = model(2)
    xs, y = batch(2)
    joint_enc, joint_head = copy.deepcopy(encoders), copy.deepcopy(head)
    F.cross_entropy(joint_head(*[e(x) for e, x in zip(joint_enc, xs)]), y).backward()
    method, coeffs, ours = our_step(encoders, head, heads, xs, y, epoch=3, window=(0, 2))
    assert torch.equal(coeffs, torch.ones(2)) and method.decisions() == {}
    assert all(p.grad is None for h in heads for p in h.parameters())
    for (n, p), q in zip(head.named_parameters(), joint_head.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    for e, je in zip(encoders, joint_enc):
        for p, q in zip(e.parameters(), je.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_default_heads_are_owned_trained_and_saved():
    encoders, head, _ = model(2)
    method = methods.create("mlb", encoders, head)
    assert [h.in_features for h in method.heads] == FEAT[:2] and method.heads[0].weight.dtype == DT
    groups = method.param_groups(0.1)
    assert groups[0]["lr"] == 0.1 and len(groups[0]["params"]) == 4
    xs, y = batch(2)
    out = method.forward(xs, y, 0)
    method.loss(out, y).backward()
    method.before_optimizer_step()
    assert all(p.grad is not None for p in method.heads.parameters())
    state = method.state_dict()
    other = methods.create("mlb", encoders, head)
    other.load_state_dict(state)
    for a, b in zip(method.heads.parameters(), other.heads.parameters()):
        assert torch.equal(a, b)


def test_without_the_loss_term_the_heads_still_score_the_step():
    encoders, head, heads = model(2)
    xs, y = batch(2)
    method = methods.create("mlb", encoders, head, heads=heads)
    out = method.forward(xs, y, 0)
    method.task_loss(out, y).backward()
    with torch.no_grad():
        logits = [h(e(x)) for h, e, x in zip(heads, encoders, xs)]
    _, _, k = hand_k(logits, y, 0.8)
    torch.testing.assert_close(method.before_optimizer_step(), torch.tensor(k, dtype=torch.float32))


def test_non_finite_gradients_stay_non_finite():
    encoders, head, heads = model(2)
    xs, y = batch(2)
    method = methods.create("mlb", encoders, head, heads=heads)
    out = method.forward(xs, y, 0)
    method.loss(out, y).backward()
    encoders[0][0].weight.grad[0, 0] = float("inf")
    head.fc.weight.grad[0, 0] = float("nan")
    method.before_optimizer_step()
    assert torch.isinf(encoders[0][0].weight.grad[0, 0]) and torch.isnan(head.fc.weight.grad[0, 0])


def test_training_with_the_one_loop():
    encoders, head, heads = model(3)
    method = methods.create("mlb", encoders, head, heads=heads, alpha=1.0)
    params = [p for e in encoders for p in e.parameters()] + list(head.parameters())
    opt = torch.optim.Adam([{"params": params}] + method.param_groups(1e-3), lr=1e-3)
    for step in range(3):
        res = methods.training_step(method, *batch(3, seed=step), 0, opt)
        assert res.coeffs.shape == (3,) and torch.isfinite(res.coeffs).all()
    assert "mlb" in methods.available() and methods.get("mlb")[0].defaults()["alpha"] == 0.8


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"alpha": float("nan")}, ValueError, "alpha: expected"),
        ({"alpha": -0.1}, ValueError, "alpha: expected"),
        ({"alpha": "1"}, TypeError, "alpha: expected"),
        ({"beta": 0.0}, ValueError, "beta: expected"),
        ({"beta": float("inf")}, ValueError, "beta: expected"),
        ({"multi_loss_only": 1}, TypeError, "multi_loss_only: expected"),
        ({"heads": [nn.Linear(3, C)]}, ValueError, "heads: expected 2 modules"),
        ({"heads": nn.Linear(3, C)}, TypeError, "heads: expected a list"),
        ({"heads": [nn.Linear(3, C), "x"]}, TypeError, r"heads\[1\]: expected an nn.Module"),
    ],
)
def test_errors_name_the_argument(kwargs, error, match):
    encoders, head, _ = model(2)
    with pytest.raises(error, match=match):
        methods.create("mlb", encoders, head, **kwargs)


def test_errors_on_missing_sizes_and_foreign_outputs():
    encoders, _, _ = model(2)
    # A head without .dims and no feature_dims: the default heads take their sizes from the first features.
    lazy = methods.create("mlb", encoders, nn.Linear(sum(FEAT[:2]), C).to(DT))
    opt = torch.optim.SGD([p for e in encoders for p in e.parameters()] + lazy.param_groups(0.1)[0]["params"], lr=0.1)
    methods.training_step(lazy, *batch(2), 0, opt)
    assert [tuple(h.weight.shape) for h in lazy.heads] == [(C, d) for d in FEAT[:2]]
    assert all(h.weight.grad is not None and h.weight.dtype == DT for h in lazy.heads)
    method = methods.create("mlb", encoders, nn.Linear(sum(FEAT[:2]), C).to(DT), feature_dims=FEAT[:2])
    xs, y = batch(2)
    out = method.forward(xs, y, 0)
    method.forward(xs, y, 0)
    with pytest.raises(ValueError, match="out: expected the StepOutput of the last forward"):
        method.loss_term(method.task_loss(out, y), out)
    with pytest.raises(ValueError, match="logits: expected at least two"):
        agm_fast.methods.mlb.core.mlb_scores([torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long))
