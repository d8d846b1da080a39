"""MMPareto against an independent float64 computation from docs/methods.md (section 9)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agm_fast import methods
from agm_fast.methods.mmpareto import pareto_weights

DT = torch.float64
IN_DIMS = [5, 6, 7, 4]
FEAT = 4
C, B = 3, 10


class Model(nn.Module):
    def __init__(self, M, seed=0, flip=None):
        super().__init__()
        torch.manual_seed(seed)
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, FEAT)) for d in IN_DIMS[:M]
        )
        self.fusion = nn.Linear(FEAT * M, C)
        self.heads = nn.ModuleList(nn.Linear(FEAT, C) for _ in range(M))
        if flip is not None:
            # A head that argues against the fusion: its encoder's two gradients point apart.
            with torch.no_grad():
                self.heads[flip].weight.mul_(-3.0)
        self.to(DT)


def batch(M, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g, dtype=DT) for d in IN_DIMS[:M]], torch.randint(0, C, (B,), generator=g)


def expected(model, xs, y, scale=1.5, rescale="tensor"):
    """Each gradient taken on its own, the weights from the closed form, the combination tensor by tensor."""
    feats = [e(x) for e, x in zip(model.encoders, xs)]
    l_mm = F.cross_entropy(model.fusion(torch.cat(feats, 1)), y)
    l_u = [F.cross_entropy(h(f), y) for h, f in zip(model.heads, feats)]
    grads, cos, weight = {}, [], []
    for m, enc in enumerate(model.encoders):
        ps = list(enc.parameters())
        gm = torch.autograd.grad(l_mm, ps, retain_graph=True)
        gu = torch.autograd.grad(l_u[m], ps, retain_graph=True)
        fm, fu = torch.cat([g.flatten() for g in gm]), torch.cat([g.flatten() for g in gu])
        a, b, c = float(fm @ fm), float(fm @ fu), float(fu @ fu)
        cs = b / math.sqrt(a * c)
        w = 0.5 if cs > 0 else (0.999 if b >= a else 0.001 if b >= c else (c - b) / (a + c - 2 * b))
        cos.append(cs)
        weight.append(w)
        hs = [2 * w * x + 2 * (1 - w) * z for x, z in zip(gm, gu)]
        sums = [x + z for x, z in zip(gm, gu)]
        if rescale == "encoder":
            r = math.sqrt(sum(float(s.square().sum()) for s in sums)) / math.sqrt(sum(float(h.square().sum())
                                                                                  for h in hs))
            ratios = [r] * len(hs)
        else:
            ratios = [float(s.norm() / h.norm()) for s, h in zip(sums, hs)]
        for p, h, r in zip(ps, hs, ratios):
            grads[p] = scale * (max(r, 1.0) if rescale != "none" else 1.0) * h
    for p, g in zip(model.fusion.parameters(), torch.autograd.grad(l_mm, list(model.fusion.parameters()),
                                                                    retain_graph=True)):
        grads[p] = g
    for m, h in enumerate(model.heads):
        for p, g in zip(h.parameters(), torch.autograd.grad(l_u[m], list(h.parameters()), retain_graph=True)):
            grads[p] = g
    return grads, torch.tensor(cos, dtype=DT), torch.tensor(weight, dtype=DT)


def run(model, xs, y, epoch=0, **kw):
    method = methods.create("mmpareto", list(model.encoders), model.fusion, heads=list(model.heads), **kw)
    model.zero_grad(set_to_none=True)
    out = method.forward(xs, y, epoch)
    method.loss(out, y).backward()
    return method, method.before_optimizer_step(out, y)


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("seed,flip,scale,rescale", [
    (0, None, 1.5, "tensor"), (0, 1, 1.5, "tensor"), (2, 0, 1.5, "tensor"), (1, None, 1.0, "tensor"),
    (0, 1, 1.0, "tensor"), (0, 1, 1.5, "encoder"), (2, 0, 2.0, "none"),
])
def test_every_gradient_and_decision_matches_the_closed_form(M, seed, flip, scale, rescale):
    model = Model(M, seed, flip)
    xs, y = batch(M, seed + 1)
    grads, cos, weight = expected(copy.deepcopy(model), xs, y, scale, rescale)
    method, coeffs = run(model, xs, y, encoder_scale=scale, rescale=rescale)
    dec = method.decisions()
    assert coeffs.dtype == torch.float32 and coeffs.shape == (M,)
    torch.testing.assert_close(dec["cos"], cos.float())
    torch.testing.assert_close(dec["weight"], weight.float())
    torch.testing.assert_close(coeffs, weight.float())
    assert torch.equal(dec["pareto"], cos <= 0)
    params = [p for mod in (*model.encoders, model.fusion, *model.heads) for p in mod.parameters()]
    exp_model = list(grads)
    assert len(exp_model) == len(params)
    for p, q in zip(params, exp_model):
        torch.testing.assert_close(p.grad, grads[q])


def test_the_constructed_batches_exercise_both_branches_and_the_one_sided_rescale():
    branches = set()
    partial = False
    for M, seed, flip in [(2, 0, None), (2, 0, 1), (3, 2, 0)]:
        model = Model(M, seed, flip)
        xs, y = batch(M, seed + 1)
        dec = run(model, xs, y)[0].decisions()
        branches.update(dec["pareto"].tolist())
        # In the min-norm branch some tensors are raised to ||g_mm + g_u|| and others are not.
        partial |= bool(((dec["rescaled"] > 0) & (dec["rescaled"] < 1) & dec["pareto"]).any())
    assert branches == {True, False} and partial


def test_pareto_weights_by_hand():
    t = lambda *v: torch.tensor(v, dtype=DT)  # noqa: E731
    cos, w, p = pareto_weights(t(1.0, 1.0, 0.0, 1.0, 4.0), t(-0.5, 0.5, 0.0, 0.0, -1.0), t(4.0, 1.0, 3.0, 0.0, 1.0))
    torch.testing.assert_close(cos, t(-0.25, 0.5, 0.0, 0.0, -0.5))
    # (c - b) / (a + c - 2b); cos > 0: 1/2; a = b = 0: 0.999; c = b = 0: 0.001
    torch.testing.assert_close(w, t(4.5 / 6, 0.5, 0.999, 0.001, 2.0 / 7))
    assert p.tolist() == [True, False, True, True, True]
    # A NaN inner product takes the min-norm branch and its weight is NaN: the step stays non-finite.
    cos, w, p = pareto_weights(t(float("nan")), t(float("nan")), t(1.0))
    assert p.item() and math.isnan(w.item())


def test_outside_the_window_it_is_joint_training_and_the_heads_are_idle():
    model = Model(2, flip=1)
    xs, y = batch(2)
    joint = copy.deepcopy(model)
    F.cross_entropy(joint.fusion(torch.cat([e(x) for e, x in zip(joint.encoders, xs)], 1)), y).backward()
    method, coeffs = run(model, xs, y, epoch=3, window=(0, 2))
    assert torch.equal(coeffs, torch.ones(2)) and method.decisions() == {}
    for p, q in zip(model.parameters(), joint.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    assert all(p.grad is None for p in model.heads.parameters())


def test_the_hook_takes_the_unimodal_gradients_itself_when_loss_term_was_skipped():
    model = Model(3, flip=0)
    xs, y = batch(3)
    ref_model = copy.deepcopy(model)
    run(ref_model, xs, y)
    method = methods.create("mmpareto", list(model.encoders), model.fusion, heads=list(model.heads))
    out = method.forward(xs, y, 0)
    method.task_loss(out, y).backward(retain_graph=True)
    method.before_optimizer_step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # Once the graph is freed the gradients cannot be taken: a clear error, not a silent joint step.
    out = method.forward(xs, y, 0)
    method.task_loss(out, y).backward()
    with pytest.raises(RuntimeError, match="before_optimizer_step: no unimodal gradients"):
        method.before_optimizer_step()


def test_non_finite_gradients_stay_non_finite():
    model = Model(2)
    xs, y = batch(2)
    method = methods.create("mmpareto", list(model.encoders), model.fusion, heads=list(model.heads))
    out = method.forward(xs, y, 0)
    method.loss(out, y).backward()
    model.encoders[0][0].weight.grad[0, 0] = float("inf")
    method.before_optimizer_step(out, y)
    assert not torch.isfinite(model.encoders[0][0].weight.grad).all()
    assert torch.isfinite(model.encoders[1][0].weight.grad).all()


def test_default_heads_are_owned_trained_and_saved():
    from agm_fast.fusion import ConcatFusion

    encs = [nn.Linear(5, 4), nn.Linear(6, 3)]
    method = methods.create("mmpareto", encs, ConcatFusion([4, 3], 7))
    assert [(h.in_features, h.out_features) for h in method.heads] == [(4, 7), (3, 7)]
    assert {id(p) for g in method.param_groups(0.1) for p in g["params"]} == {id(p) for p in
                                                                             method.heads.parameters()}
    other = methods.create("mmpareto", encs, ConcatFusion([4, 3], 7), num_classes=7)
    other.load_state_dict(method.state_dict())
    for p, q in zip(method.heads.parameters(), other.heads.parameters()):
        assert torch.equal(p, q)


def test_errors_name_the_argument():
    model = Model(2)
    enc, fus = list(model.encoders), model.fusion
    with pytest.raises(ValueError, match="encoder_scale"):
        methods.create("mmpareto", enc, fus, heads=list(model.heads), encoder_scale=0.0)
    with pytest.raises(ValueError, match="rescale"):
        methods.create("mmpareto", enc, fus, heads=list(model.heads), rescale="global")
    with pytest.raises(ValueError, match="heads: expected 2 modules"):
        methods.create("mmpareto", enc, fus, heads=list(model.heads)[:1])
    with pytest.raises(TypeError, match="heads: expected a list"):
        methods.create("mmpareto", enc, fus, heads=model.heads[0])
    with pytest.raises(ValueError, match="num_classes, feature_dims: apply to the default heads"):
        methods.create("mmpareto", enc, fus, heads=list(model.heads), num_classes=3)
    with pytest.raises(ValueError, match="num_classes: expected a positive int"):
        methods.create("mmpareto", enc, fus, feature_dims=[4, 4], num_classes=0)
    # Without sizes the default heads are lazy: they take them from the first features.
    assert all(isinstance(h, nn.LazyLinear) for h in methods.create("mmpareto", enc, fus).heads)
