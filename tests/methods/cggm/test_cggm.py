"""CGGM against hand computation in float64 (docs/methods.md, section 4)."""

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agm_fast

DT = torch.float64
IN_DIMS = [5, 6, 7, 4]
FEAT_DIMS = [3, 4, 2, 5]
C = 3


class Model(nn.Module):
    """M small encoders and a concat Linear fusion head."""

    def __init__(self, M, concat=True):
        super().__init__()
        dims = FEAT_DIMS[:M] if concat else [4] * M
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(i, d), nn.Tanh()) for i, d in zip(IN_DIMS, dims))
        self.out = nn.Linear(sum(dims) if concat else 4, C)
        self.concat = concat
        self.dims = dims

    def forward(self, xs):
        hs = [enc(x) for enc, x in zip(self.encoders, xs)]
        fused = torch.cat(hs, dim=1) if self.concat else torch.stack(hs).sum(0)
        return self.out(fused), hs


def batches(M, steps, B=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        xs = [torch.randn(B, IN_DIMS[m], generator=g, dtype=DT) for m in range(M)]
        y = torch.randint(0, C, (B,), generator=g)
        out.append((xs, y))
    return out


def hand_cos(a, w):
    return float(a @ w / (np.linalg.norm(a) * np.linalg.norm(w)))


@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("concat", [True, False])
def test_weights_mode_matches_hand_computation(M, concat):
    torch.manual_seed(0)
    rho, lam, lr, head_lr = 1.3, 0.1, 0.1, 0.5
    model = Model(M, concat).to(DT)
    cggm = agm_fast.CGGM(
        list(model.encoders), model.out, model.dims, C, rho=rho, lam=lam,
        head_optimizer=torch.optim.SGD, head_lr=head_lr,
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    # The hand copy: numpy heads and plain SGD, Python floats for every CGGM quantity.
    hmodel = copy.deepcopy(model)
    heads = [(h.weight.detach().numpy().copy(), h.bias.detach().numpy().copy()) for h in cggm.heads]
    prev = [0.0] * M
    pending = None
    offs = np.cumsum([0] + model.dims) if concat else [0] * (M + 1)
    seen_b = []
    for step, (xs, y) in enumerate(batches(M, 5)):
        # ours
        opt.zero_grad()
        logits, hs = model(xs)
        term = cggm.loss_term()
        (F.cross_entropy(logits, y) + term).backward()
        B = cggm.observe(hs, y)
        cggm.scale_gradients_()

        # hand
        hmodel.zero_grad()
        hl, hhs = hmodel(xs)
        F.cross_entropy(hl, y).backward()
        W = hmodel.out.weight.detach().numpy()
        extra = np.zeros_like(W)
        l_gm = 0.0
        if pending is not None:
            pB, pa, pw = pending
            cos = []
            for m in range(M):
                sl = slice(offs[m], offs[m] + model.dims[m]) if concat else slice(0, 4)
                a, w = pa[m].ravel(), pw[:, sl].ravel()
                c = hand_cos(a, w)
                cos.append(c)
                na, nw = np.linalg.norm(a), np.linalg.norm(w)
                dw = -(pB[m] / M) * (a / (na * nw) - c * w / nw**2)
                extra[:, sl] += lam * dw.reshape(C, -1)
            l_gm = (sum(abs(b) for b in pB) - sum(b * c for b, c in zip(pB, cos))) / M
        torch.testing.assert_close(float(term.detach()), lam * l_gm, rtol=1e-10, atol=1e-12)
        acc, new_heads, snaps = [], [], []
        for m in range(M):
            f = hhs[m].detach().numpy()
            Wh, bh = heads[m]
            out = f @ Wh.T + bh
            acc.append(float(np.mean(out.argmax(1) == y.numpy())))
            snaps.append(Wh.copy())
            p = np.exp(out - out.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(y)), y.numpy()] -= 1
            p /= len(y)
            new_heads.append((Wh - head_lr * p.T @ f, bh - head_lr * p.sum(0)))
        heads = new_heads
        d = [a - b for a, b in zip(acc, prev)]
        S = sum(d) + 1e-8
        hB = [(S - dm) / S for dm in d]
        prev = acc
        pending = (hB, snaps, W.copy())
        seen_b.append(hB)

        torch.testing.assert_close(cggm.metric, torch.tensor(acc, dtype=DT), rtol=0, atol=0)
        torch.testing.assert_close(B, torch.tensor(hB, dtype=DT), rtol=1e-12, atol=1e-12)
        for m in range(M):
            for p, hp in zip(model.encoders[m].parameters(), hmodel.encoders[m].parameters()):
                torch.testing.assert_close(p.grad, hp.grad * (rho * hB[m]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.out.weight.grad, hmodel.out.weight.grad + torch.from_numpy(extra))
        torch.testing.assert_close(model.out.bias.grad, hmodel.out.bias.grad)
        for m in range(M):
            torch.testing.assert_close(cggm.heads[m].weight.detach(), torch.from_numpy(heads[m][0]))
            torch.testing.assert_close(cggm.heads[m].bias.detach(), torch.from_numpy(heads[m][1]))

        opt.step()
        with torch.no_grad():
            for p, hp in zip(model.parameters(), hmodel.parameters()):
                hp.copy_(p)
    # The sequence exercised non-trivial coefficients, not only B = 1.
    assert any(abs(b - 1) > 1e-3 for bs in seen_b for b in bs)


def test_weights_mode_gradient_reaches_only_the_fusion_weight():
    model = Model(3).to(DT)
    cggm = agm_fast.CGGM(list(model.encoders), model.out, model.dims, C, head_lr=0.1)
    xs, y = batches(3, 1)[0]
    logits, hs = model(xs)
    assert float(cggm.loss_term()) == 0.0
    cggm.observe(hs, y)
    term = cggm.loss_term()
    candidates = list(model.parameters()) + list(cggm.heads.parameters())
    grads = torch.autograd.grad(term, candidates, allow_unused=True)
    reached = [(p is model.out.weight, g) for p, g in zip(candidates, grads) if g is not None]
    assert len(reached) == 1 and reached[0][0]
    assert reached[0][1].abs().sum() > 0


def test_gradient_mode_value_and_second_order_gradient():
    torch.manual_seed(0)
    M, lam = 2, 0.2
    model = Model(M).to(DT)
    cggm = agm_fast.CGGM(
        list(model.encoders), model.out, model.dims, C, lam=lam, direction="gradient", head_lr=0.1,
        head_optimizer=torch.optim.SGD,
    )
    (xs0, y0), (xs, y) = batches(M, 2)
    logits, hs = model(xs0)
    assert float(cggm.loss_term(F.cross_entropy(logits, y0)).detach()) == 0.0
    cggm.observe(hs, y0)
    B = cggm.coeffs.tolist()
    head_grads = [g.clone() for g in cggm._pending["head"]]

    names = [n for n, _ in model.named_parameters()]

    def l_gm_value(params):
        params = [p.detach().requires_grad_() for p in params]
        lg, _ = torch.func.functional_call(model, dict(zip(names, params)), (xs,))
        (gW,) = torch.autograd.grad(F.cross_entropy(lg, y), params[names.index("out.weight")])
        offs = np.cumsum([0] + model.dims)
        cos = [
            hand_cos(head_grads[m].numpy().ravel(), gW[:, offs[m] : offs[m + 1]].numpy().ravel()) for m in range(M)
        ]
        return (sum(abs(b) for b in B) - sum(b * c for b, c in zip(B, cos))) / M

    logits, _ = model(xs)
    term = cggm.loss_term(F.cross_entropy(logits, y))
    params = [p.detach().clone() for p in model.parameters()]
    torch.testing.assert_close(float(term.detach()), lam * l_gm_value(params), rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(term, list(model.parameters()))
    # The direction term back-propagates through the fusion weight's gradient: the encoders get gradient too.
    assert all(g.abs().sum() > 0 for g in grads)
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
    eps = 1e-6
    plus = l_gm_value([p + eps * d for p, d in zip(params, v)])
    minus = l_gm_value([p - eps * d for p, d in zip(params, v)])
    fd = lam * (plus - minus) / (2 * eps)
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, v))
    assert abs(fd - analytic) <= 1e-7 * max(1.0, abs(fd))


def test_gradient_mode_head_gradients_are_the_observe_step_gradients():
    model = Model(2).to(DT)
    cggm = agm_fast.CGGM(list(model.encoders), model.out, model.dims, C, direction="gradient", head_lr=0.1)
    xs, y = batches(2, 1)[0]
    _, hs = model(xs)
    heads = copy.deepcopy(cggm.heads)
    cggm.observe(hs, y)
    for h, f, saved in zip(heads, hs, cggm._pending["head"]):
        (gw,) = torch.autograd.grad(F.cross_entropy(h(f.detach()), y), h.weight)
        torch.testing.assert_close(saved, gw)


class Schedule:
    """A metric callable that returns scheduled values, per call in modality order."""

    def __init__(self, values):
        self.values = [v for row in values for v in row]
        self.i = 0

    def __call__(self, out, labels):
        v = self.values[self.i]
        self.i += 1
        return torch.tensor(v, dtype=DT)


def _scheduled(values, bound=None, M=2):
    model = Model(M).to(DT)
    cggm = agm_fast.CGGM(
        list(model.encoders), model.out, model.dims, C, rho=1.0, metric=Schedule(values), bound=bound, head_lr=0.1
    )
    out = []
    for xs, y in batches(M, len(values)):
        model.zero_grad()
        logits, hs = model(xs)
        F.cross_entropy(logits, y).backward()
        raw = [p.grad.clone() for p in model.encoders[1].parameters()]
        out.append((cggm.observe(hs, y).tolist(), raw, [p.grad for p in model.encoders[1].parameters()], cggm))
        cggm.scale_gradients_()
    return out


def test_S_zero_all_unchanged_gives_B_one():
    res = _scheduled([[0.5, 0.25], [0.5, 0.25]])
    assert res[0][0] == [(0.75 + 1e-8 - 0.5) / (0.75 + 1e-8), (0.75 + 1e-8 - 0.25) / (0.75 + 1e-8)]
    assert res[1][0] == [1.0, 1.0]


def test_S_zero_cancelling_changes_documented_and_bounded():
    values = [[0.5, 0.5], [0.75, 0.25]]
    res = _scheduled(values)
    S = (0.25 + -0.25) + 1e-8
    want = [(S - 0.25) / S, (S + 0.25) / S]
    torch.testing.assert_close(torch.tensor(res[1][0], dtype=DT), torch.tensor(want, dtype=DT), rtol=1e-6, atol=0)
    assert want[0] < -1e6 and want[1] > 1e6
    bounded = _scheduled(values, bound=2.0)
    assert bounded[1][0] == [-2.0, 2.0]
    # The bounded coefficient is what scales the encoder gradients (rho = 1 here).
    for raw, scaled in zip(bounded[1][1], bounded[1][2]):
        torch.testing.assert_close(scaled, 2.0 * raw)


def test_negative_S_reverses_a_gradient():
    values = [[0.5, 0.5], [0.6, 0.2]]
    res = _scheduled(values)
    d = [0.6 - 0.5, 0.2 - 0.5]
    S = sum(d) + 1e-8
    want = [(S - d[0]) / S, (S - d[1]) / S]
    assert S < 0 and want[1] < 0
    torch.testing.assert_close(torch.tensor(res[1][0], dtype=DT), torch.tensor(want, dtype=DT), rtol=1e-12, atol=0)
    for raw, scaled in zip(res[1][1], res[1][2]):
        torch.testing.assert_close(scaled, want[1] * raw)
    assert _scheduled(values, bound=0.25)[1][0] == [0.25, -0.25]


def test_regression_sign_accuracy_and_custom_metric():
    model = Model(2).to(DT)
    model.out = nn.Linear(sum(model.dims), 1).to(DT)
    cggm = agm_fast.CGGM(list(model.encoders), model.out, model.dims, 1, task="regression", head_lr=0.1)
    xs, _ = batches(2, 1)[0]
    y = torch.randn(12, dtype=DT)
    _, hs = model(xs)
    preds = [h(f.detach()).detach() for h, f in zip(cggm.heads, hs)]
    cggm.observe(hs, y)
    want = [float(((p.squeeze(1) > 0) == (y > 0)).double().mean()) for p in preds]
    assert cggm.metric.tolist() == want

    def dice(out, labels):
        pred = (out.squeeze(1) > 0).double()
        tgt = (labels > 0).double()
        return 2 * (pred * tgt).sum() / (pred.sum() + tgt.sum() + 1e-6)

    cggm2 = agm_fast.CGGM(list(model.encoders), model.out, model.dims, 1, task="regression", metric=dice, head_lr=0.1)
    preds = [h(f.detach()).detach() for h, f in zip(cggm2.heads, hs)]
    cggm2.observe(hs, y)
    torch.testing.assert_close(cggm2.metric, torch.stack([dice(p, y) for p in preds]))


def test_user_managed_head_optimizer_and_name_prefixes():
    model = Model(2).to(DT)
    cggm = agm_fast.CGGM(["encoders.0", "encoders.1"], model.out, model.dims, C, model=model, head_optimizer=None)
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": cggm.heads.parameters(), "lr": 0.05}], lr=0.1)
    xs, y = batches(2, 1)[0]
    before = [p.detach().clone() for p in cggm.heads.parameters()]
    opt.zero_grad()
    logits, hs = model(xs)
    F.cross_entropy(logits, y).backward()
    cggm.observe(hs, y)
    # observe() leaves the step to the caller's optimizer: weights unchanged, gradients present.
    for p, b in zip(cggm.heads.parameters(), before):
        assert torch.equal(p.detach(), b) and p.grad is not None
    opt.step()
    assert any(not torch.equal(p.detach(), b) for p, b in zip(cggm.heads.parameters(), before))


def _run(model, cggm, opt, data):
    for xs, y in data:
        opt.zero_grad()
        logits, hs = model(xs)
        (F.cross_entropy(logits, y) + cggm.loss_term()).backward()
        cggm.observe(hs, y)
        cggm.scale_gradients_()
        opt.step()


def _make(M=3, seed=0):
    torch.manual_seed(seed)
    model = Model(M).to(DT)
    cggm = agm_fast.CGGM(list(model.encoders), model.out, model.dims, C, head_lr=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, cggm, opt


def test_state_dict_resume_is_exact():
    data = batches(3, 6)
    m1, c1, o1 = _make()
    _run(m1, c1, o1, data)

    m2, c2, o2 = _make()
    _run(m2, c2, o2, data[:3])
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "cggm": c2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    m3, c3, o3 = _make(seed=5)
    m3.load_state_dict(saved["model"])
    o3.load_state_dict(saved["opt"])
    c3.load_state_dict(saved["cggm"])
    assert c3.step == 3
    _run(m3, c3, o3, data[3:])
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(c1.heads.parameters(), c3.heads.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(c1.coeffs, c3.coeffs) and torch.equal(c1.prev_metric, c3.prev_metric)


def test_clear_errors():
    model = Model(2).to(DT)
    enc, dims = list(model.encoders), model.dims
    with pytest.raises(ValueError, match="direction"):
        agm_fast.CGGM(enc, model.out, dims, C, direction="grad", head_lr=0.1)
    with pytest.raises(ValueError, match="head_lr"):
        agm_fast.CGGM(enc, model.out, dims, C)
    with pytest.raises(ValueError, match="encoders: expected at least 2"):
        agm_fast.CGGM(enc[:1], nn.Linear(3, C), dims[:1], C, head_lr=0.1)
    with pytest.raises(ValueError, match="feature_dims"):
        agm_fast.CGGM(enc, model.out, [3], C, head_lr=0.1)
    with pytest.raises(ValueError, match=r"heads: expected output layers .* pass heads= ending in nn.Linear"):
        agm_fast.CGGM(enc, model.out, [3, 5], C, heads=[nn.Linear(3, C), nn.Linear(5, C)], head_lr=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        agm_fast.CGGM(enc, model.out, dims, C + 1, head_lr=0.1)
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        agm_fast.CGGM(["encoders.0", "nothing"], model.out, dims, C, model=model, head_lr=0.1)
    with pytest.raises(ValueError, match="bound"):
        agm_fast.CGGM(enc, model.out, dims, C, bound=0.0, head_lr=0.1)
    # Hyper-parameters are checked once, at construction: non-finite, zero or negative values are refused.
    for kwargs, exc, pattern in (
        (dict(rho=float("nan")), ValueError, "rho: expected a finite number > 0.0, got nan"),
        (dict(rho=0.0), ValueError, "rho: expected a finite number > 0.0"),
        (dict(rho=float("inf")), ValueError, "rho: expected a finite number"),
        (dict(lam=-1.0), ValueError, "lam: expected a finite number >= 0.0, got -1.0"),
        (dict(lam="0.1"), TypeError, "lam: expected a finite number"),
        (dict(head_lr=float("nan")), ValueError, "head_lr: expected a finite number > 0.0"),
    ):
        with pytest.raises(exc, match=pattern):
            agm_fast.CGGM(enc, model.out, dims, C, **{"head_lr": 0.1, **kwargs})
    cggm = agm_fast.CGGM(enc, model.out, dims, C, head_lr=0.1)
    xs, y = batches(2, 1)[0]
    _, hs = model(xs)
    with pytest.raises(RuntimeError, match="observe"):
        cggm.scale_gradients_()
    with pytest.raises(ValueError, match="2 feature tensors"):
        cggm.observe(hs[:1], y)
    with pytest.raises(ValueError, match=r"features\[1\]"):
        cggm.observe([hs[0], hs[0]], y)
    with pytest.raises(TypeError, match="labels: expected int64"):
        cggm.observe(hs, y.float())
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\)"):
        cggm.observe(hs, y + C)
    with pytest.raises(ValueError, match="batch size"):
        cggm.observe(hs, y[:5])
    g = agm_fast.CGGM(enc, model.out, dims, C, direction="gradient", head_lr=0.1)
    g.observe(hs, y)
    with pytest.raises(ValueError, match="task_loss: expected the task loss"):
        g.loss_term()
    assert math.isfinite(float(g.loss_term(F.cross_entropy(model(xs)[0], y)).detach()))



def test_two_ranks_give_the_single_process_coefficients(monkeypatch):
    """Two ranks simulated by two threads whose all-reduce is a barrier exchange: the metric counts and head
    gradients that CGGM reduces must give every rank the single-process coefficients and heads of the global batch.
    (The collectives themselves are tested in test_distributed.py.)"""
    import threading

    world, B = 2, 12
    data = batches(2, 3, B=B)
    slots = [None] * world
    barrier = threading.Barrier(world)
    local = threading.local()

    def global_sums(t, group=None):
        slots[local.rank] = t.clone()
        barrier.wait()
        total = sum(slots)
        barrier.wait()
        return total

    def build():
        # Built in the calling (main) thread: the global RNG is shared between threads, so seeding inside the
        # rank threads would race.
        torch.manual_seed(0)
        model = Model(2).to(DT)
        cggm = agm_fast.CGGM(
            list(model.encoders), model.out, model.dims, C, head_optimizer=torch.optim.SGD, head_lr=0.5
        )
        return model, cggm

    def run(shard, built):
        model, cggm = built
        coeffs = []
        for xs, y in data:
            xs, y = shard(xs, y)
            _, hs = model(xs)
            coeffs.append(cggm.observe(hs, y).clone())
        return coeffs, [p.detach().clone() for p in cggm.heads.parameters()]

    want = run(lambda xs, y: (xs, y), build())
    built = [build() for _ in range(world)]
    monkeypatch.setattr(agm_fast.distributed, "is_active", lambda group=None: True)
    monkeypatch.setattr(agm_fast.distributed, "global_sums", global_sums)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
    results, errors = [None] * world, []

    def rank_main(rank):
        local.rank = rank
        sl = slice(rank * B // world, (rank + 1) * B // world)
        try:
            results[rank] = run(lambda xs, y: ([x[sl] for x in xs], y[sl]), built[rank])
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for got in results:
        for g, w in zip(got[0], want[0]):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        for g, w in zip(got[1], want[1]):
            torch.testing.assert_close(g, w)


def test_a_negative_coefficient_is_reported_once_and_min_coeff_keeps_the_sign():
    # Head metrics by step: d = [0.2, 0.5] (B > 0), then d = [0.7, -0.2], S = 0.5: B_0 = -0.4 < 0.
    values = iter([0.2, 0.5, 0.9, 0.3] * 2)

    def metric(out, labels):
        return torch.tensor(next(values), dtype=torch.float64)

    for min_coeff in (None, 0.0):
        torch.manual_seed(0)
        encoders = [nn.Linear(3, 4), nn.Linear(2, 4)]
        fusion = agm_fast.ConcatFusion([4, 4], 3)
        method = agm_fast.methods.create("cggm", encoders, fusion, metric=metric, min_coeff=min_coeff,
                                         clip_grad_norm=None)
        coeffs = []
        for _ in range(2):
            xs, y = [torch.randn(8, 3), torch.randn(8, 2)], torch.randint(0, 3, (8,))
            out = method.forward(xs, y, 0)
            method.loss(out, y).backward()
            coeffs.append(method.before_optimizer_step(out, y))
        assert (coeffs[1][0] < 0) == (min_coeff is None) and (coeffs[1] >= 0).all() == (min_coeff is not None)
        with pytest.warns(UserWarning, match="B_m went negative"):
            method.end_epoch(0, {})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            method.end_epoch(1, {})  # once
