"""Gradient accumulation with the reference semantics, for every method: an optimizer step over K micro-batches of
unequal size equals modulating each micro-batch's gradient with that micro-batch's own coefficients (and noise),
then summing. Methods that cannot split their modulation refuse accumulation with one error."""

import copy
import math

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast import methods

C, DIMS, SPLITS = 5, (7, 4), (5, 11)

# Options that make each method act from the first step on this tiny problem.
CASES = {
    "joint": {},
    "agm": {"alpha": 1.5},
    "ogm": {"alpha": 0.8},
    "ogm_ge": {"alpha": 0.8},
    "opm": {"warmup_epochs": 0, "p_exe": 1.0},
    "cggm": {"rho": 2.0, "lam": 0.2, "clip_grad_norm": None},
    "mslr": {"history": 1},
    "mses": {"patience": 0},
    "mlb": {"alpha": 0.8},
    # The clip acts once per optimizer step, on the summed gradient (test below), so the definition is without it.
    "gdl": {"clip_grad_norm": None},
}


def _parts():
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(d, 9), nn.ReLU(), nn.Linear(9, 8)) for d in DIMS]
    return encoders, agm_fast.ConcatFusion([8, 8], C)


def _build(name, **extra):
    encoders, fusion = _parts()
    method = methods.create(name, encoders, fusion, seed=3, **{**CASES.get(name, {}), **extra})
    # A method that asks for an epoch pass (PMR's prototypes) gets it, over data of the same shapes.
    methods.run_epoch_passes(method, 0, "start", _batches(seed=2), _batches(seed=2))
    params = [p for m in [*encoders, fusion] for p in m.parameters()]
    params += [p for g in method.param_groups(0.1) for p in g["params"]]
    return method, params


def _batches(steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    B = sum(SPLITS)
    return [([torch.randn(B, d, generator=gen) for d in DIMS], torch.randint(0, C, (B,), generator=gen))
            for _ in range(steps)]


def _micro(xs, y):
    starts = [0, SPLITS[0]]
    return [([x[s : s + n] for x in xs], y[s : s + n]) for s, n in zip(starts, SPLITS)]


def _accumulated(name, batches, declare=True):
    """Each step: K micro-batches through forward, loss (weighted by rows) and backward, then one modulation call."""
    method, params = _build(name)
    if declare:
        method.set_accumulation(len(SPLITS))
    out = []
    for xs, y in batches:
        for p in params:
            p.grad = None
        for mx, my in _micro(xs, y):
            step_out = method.forward(mx, my, 0)
            (method.loss(step_out, my) * (len(my) / len(y))).backward()
        method.before_optimizer_step()
        out.append([p.grad.clone() for p in params])
        with torch.no_grad():
            for p in params:
                p.sub_(0.1 * p.grad)
    return out


def _one_by_one(name, batches):
    """The definition: each micro-batch modulated alone (no accumulation), then the gradients summed."""
    method, params = _build(name)
    out = []
    for xs, y in batches:
        total = [torch.zeros_like(p) for p in params]
        for mx, my in _micro(xs, y):
            for p in params:
                p.grad = None
            step_out = method.forward(mx, my, 0)
            (method.loss(step_out, my) * (len(my) / len(y))).backward()
            method.before_optimizer_step(step_out, my)
            for t, p in zip(total, params):
                if p.grad is not None:
                    t.add_(p.grad)
        out.append(total)
        with torch.no_grad():
            for p, g in zip(params, total):
                p.sub_(0.1 * g)
    return out


@pytest.mark.parametrize("name", methods.available())
def test_accumulated_micro_batches_equal_each_modulated_alone_then_summed(name):
    if methods.get(name).cls.accumulation == "refused":
        with pytest.raises(ValueError, match=f"^steps: {name} cannot modulate micro-batches one by one"):
            _build(name)[0].set_accumulation(2)
        return
    batches = _batches()
    got, want = _accumulated(name, batches), _one_by_one(name, batches)
    for step, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}, step {step}, parameter {i}: {m}")


@pytest.mark.parametrize("name", ["ogm", "ogm_ge", "cggm", "mlb", "amss", "amss_plus"])
def test_without_declaring_accumulation_the_summed_gradient_is_modulated_once(name):
    # What the interface did before accumulation was declared: the coefficients of the last micro-batch applied to
    # the summed gradient. It differs, so the test above can fail.
    batches = _batches(1)
    got, want = _accumulated(name, batches, declare=False), _one_by_one(name, batches)
    assert max((a - b).abs().max().item() for a, b in zip(got[0], want[0])) > 1e-4


def test_gdl_clips_the_summed_gradient_once_per_step():
    # With a clip that binds, an accumulated step is one step on the whole batch (the clip on the summed gradient,
    # like torch's clip after accumulation), not the sum of the micro-batches clipped one by one.
    clip = {"clip_grad_norm": 0.5}
    method, params = _build("gdl", **clip)
    method.set_accumulation(len(SPLITS))
    whole, whole_params = _build("gdl", **clip)
    alone, alone_params = _build("gdl", **clip)
    for step, (xs, y) in enumerate(_batches()):
        for p in params + whole_params:
            p.grad = None
        for mx, my in _micro(xs, y):
            out = method.forward(mx, my, 0)
            (method.loss(out, my) * (len(my) / len(y))).backward()
        coeffs = method.before_optimizer_step()
        out = whole.forward(xs, y, 0)
        whole.loss(out, y).backward()
        want = whole.before_optimizer_step(out, y)
        assert float(whole.decisions()["clip_coef"]) < 0.9  # the clip binds
        torch.testing.assert_close(coeffs, want)
        for a, b in zip(params, whole_params):
            torch.testing.assert_close(a.grad, b.grad)
        if step == 0:
            clipped = [torch.zeros_like(p) for p in alone_params]
            for mx, my in _micro(xs, y):
                for p in alone_params:
                    p.grad = None
                out = alone.forward(mx, my, 0)
                (alone.loss(out, my) * (len(my) / len(y))).backward()
                alone.before_optimizer_step(out, my)
                for t, p in zip(clipped, alone_params):
                    t.add_(p.grad)
            assert max((a.grad - t).abs().max().item() for a, t in zip(params, clipped)) > 1e-4
        with torch.no_grad():
            for p in params + whole_params:
                p.sub_(0.1 * p.grad)


def test_micro_batch_coefficients_are_recorded_and_their_mean_returned():
    method, params = _build("ogm")
    method.set_accumulation(2)
    xs, y = _batches(1)[0]
    for mx, my in _micro(xs, y):
        out = method.forward(mx, my, 0)
        method.loss(out, my).backward()
    recorded = [c.clone() for c in method.micro_coefficients]
    coeffs = method.before_optimizer_step()
    assert len(recorded) == 2 and not torch.equal(recorded[0], recorded[1])
    torch.testing.assert_close(coeffs, (recorded[0] + recorded[1]) / 2)


def test_accumulation_is_refused_by_a_method_that_needs_the_whole_step():
    class Whole(methods.Method):
        pass

    encoders, fusion = _parts()
    with pytest.raises(ValueError, match="^steps: .* cannot modulate micro-batches one by one"):
        Whole(encoders, fusion).set_accumulation(2)
    with pytest.raises(ValueError, match="^steps: expected"):
        methods.create("ogm", encoders, fusion).set_accumulation(0)
    copy.deepcopy(Whole(encoders, fusion)).set_accumulation(1)


def test_mlb_accumulated_step_equals_each_micro_batch_scaled_by_its_own_k_by_hand():
    # Independent of the method's step: each micro-batch's gradient of CE(fused) + sum_m CE(head_m), weighted by its
    # rows, with encoder m, head m and the fusion weight's column block m multiplied by that micro-batch's
    # k_m = 1 + tanh(alpha (r_m - 1)), r_0 = s_1 / s_0, r_1 = 1 / r_0 (docs/methods.md, section 11), then summed.
    alpha = 0.8
    method, params = _build("mlb")
    encoders, fusion, heads = method.encoders, method.fusion, method.heads
    twin_enc, twin_fus, twin_heads = copy.deepcopy(list(encoders)), copy.deepcopy(fusion), copy.deepcopy(heads)
    method.set_accumulation(len(SPLITS))
    xs, y = _batches(1)[0]
    for p in params:
        p.grad = None
    for mx, my in _micro(xs, y):
        out = method.forward(mx, my, 0)
        (method.loss(out, my) * (len(my) / len(y))).backward()
    coeffs = method.before_optimizer_step()

    groups = [list(e.parameters()) + list(h.parameters()) for e, h in zip(twin_enc, twin_heads)]
    every = [q for g in groups for q in g] + list(twin_fus.parameters())
    total = {id(q): torch.zeros_like(q) for q in every}
    ks = []
    for mx, my in _micro(xs, y):
        feats = [e(x) for e, x in zip(twin_enc, mx)]
        logits = [h(f) for h, f in zip(twin_heads, feats)]
        loss = nn.functional.cross_entropy(twin_fus(*feats), my)
        for z in logits:
            loss = loss + nn.functional.cross_entropy(z, my)
        grads = torch.autograd.grad(loss * (len(my) / len(y)), every)
        s = [float(torch.softmax(z.detach(), 1)[torch.arange(len(my)), my].mean()) for z in logits]
        r0 = s[1] / s[0]
        k = [1 + math.tanh(alpha * (r - 1)) for r in (r0, 1 / r0)]
        ks.append(k)
        scale = {id(q): k[m] for m, g in enumerate(groups) for q in g}
        for q, g in zip(every, grads):
            if q is twin_fus.fc.weight:
                g = torch.cat([g[:, :8] * k[0], g[:, 8:] * k[1]], dim=1)
            total[id(q)] += g * scale.get(id(q), 1.0)
    assert abs(ks[0][0] - ks[1][0]) > 1e-3  # the micro-batches' k differ, so one k for both would fail
    torch.testing.assert_close(coeffs, torch.tensor(ks, dtype=torch.float32).mean(0))
    mine = [q for e, h in zip(encoders, heads) for q in [*e.parameters(), *h.parameters()]] + list(fusion.parameters())
    for i, (a, b) in enumerate(zip(mine, every)):
        torch.testing.assert_close(a.grad, total[id(b)], msg=lambda m: f"parameter {i}: {m}")
