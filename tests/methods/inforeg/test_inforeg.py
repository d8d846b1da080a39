"""InfoReg against an independent implementation written from docs/methods.md, and hand-derived values."""

import copy
import math

import pytest
import torch
from torch import nn

from agm_fast import methods
from agm_fast.methods.inforeg import trace_ratio

C, B = 3, 8


def test_trace_ratio_by_hand():
    t = lambda *v: [torch.tensor(float(x)) for x in v]  # noqa: E731
    assert float(trace_ratio([], 10)) == 1.0
    assert float(trace_ratio(t(2.0), 10)) == pytest.approx(1.0)  # (2 - 0) / 2
    assert float(trace_ratio(t(2.0, 3.0), 10)) == pytest.approx(3.0 / 5.0)  # padding zero is subtracted
    assert float(trace_ratio(t(1.0, 2.0, 4.0), 2)) == pytest.approx((4.0 - 1.0) / 6.0)
    assert float(trace_ratio(t(0.0, 0.0), 10)) == 0.0


def model(M, seed=0):
    torch.manual_seed(seed)
    dims = [5, 4, 6][:M]
    encs = [nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 4)) for d in dims]
    return dims, encs, nn.Linear(4 * M, C)


def batches(dims, steps=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        xs = [torch.randn(B, d, generator=g) for d in dims]
        y = torch.randint(0, C, (B,), generator=g)
        xs[0][:, :C] += 2 * nn.functional.one_hot(y, C)
        out.append((xs, y))
    return out


class Independent:
    """The docs' rule, written with plain loops and Python floats."""

    def __init__(self, encs, fus, bases, threshold=0.05, window=10, trace_modality="first", score="sum"):
        self.encs, self.fus, self.bases = encs, fus, bases
        self.threshold, self.window, self.tm, self.score = threshold, window, trace_modality, score
        self.traces = [[] for _ in encs]
        self.fisher = None

    def k_of(self, hist):
        if not hist:
            return 1.0
        L = [0.0] * self.window + hist
        return (L[-1] - L[-self.window - 1]) / sum(L[-self.window:])

    def begin_epoch(self):
        if self.fisher is not None:
            self.end_epoch()
        self.ks = [self.k_of(h) for h in self.traces]
        self.anchor = [[p.detach().clone() for p in e.parameters()] for e in self.encs]
        self.fisher = [[torch.zeros_like(m.weight) for m in e if isinstance(m, nn.Linear)] for e in self.encs]

    def end_epoch(self):
        for m, acc in enumerate(self.fisher):
            self.traces[m].append(sum(float(a.mean()) for a in acc))
        self.fisher = None

    def step(self, xs, y):
        M = len(self.encs)
        for p in list(self.fus.parameters()) + [q for e in self.encs for q in e.parameters()]:
            p.grad = None
        z = [e(x) for e, x in zip(self.encs, xs)]
        W, b = self.fus.weight, self.fus.bias
        uni = [z[m] @ W[:, 4 * m:4 * m + 4].t() + b / M for m in range(M)]
        loss = nn.functional.cross_entropy(self.fus(torch.cat(z, 1)), y)
        for u in uni:
            loss = loss + nn.functional.cross_entropy(u, y)
        loss.backward()
        s = []
        for u in uni:
            p = torch.softmax(u.detach(), 1)
            v = sum(float(p[i, y[i]]) for i in range(B))
            s.append(v if self.score == "sum" else v / B)
        lead = max(range(M), key=lambda m: s[m])
        second = max(s[m] for m in range(M) if m != lead)
        k = self.ks[0] if self.tm == "first" else self.ks[lead]
        beta = [0.0] * M
        if s[lead] > second and k > self.threshold:
            beta[lead] = self.bases[lead] * math.exp(math.tanh(s[lead] - second))
        with torch.no_grad():
            for m, e in enumerate(self.encs):
                for p, a in zip(e.parameters(), self.anchor[m]):
                    p.grad += beta[m] * (p - a)
                for acc, lin in zip(self.fisher[m], [q for q in e if isinstance(q, nn.Linear)]):
                    acc += lin.weight.grad ** 2
        return beta, k


def compare(M, bases, epochs=3, **hp):
    dims, encs, fus = model(M)
    encs2, fus2 = copy.deepcopy(encs), copy.deepcopy(fus)
    ind = Independent(encs, fus, bases, **hp)
    method = methods.create("inforeg", encs2, fus2, beta_bases=bases, **hp)
    params_a = list(fus.parameters()) + [q for e in encs for q in e.parameters()]
    params_b = list(fus2.parameters()) + [q for e in encs2 for q in e.parameters()]
    regulated = 0
    for epoch in range(epochs):
        ind.begin_epoch()
        for xs, y in batches(dims):
            beta, k = ind.step(xs, y)
            for p in params_b:
                p.grad = None
            out = method.forward(xs, y, epoch)
            method.loss(out, y).backward()
            coeffs = method.before_optimizer_step(out, y)
            d = method.decisions()
            torch.testing.assert_close(d["beta"], torch.tensor(beta), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(coeffs, 1 + torch.tensor(beta), rtol=1e-5, atol=1e-7)
            assert d["regulated"].tolist() == [b > 0 for b in beta]
            assert float(d["k"]) == pytest.approx(k, rel=1e-5)
            regulated += any(b > 0 for b in beta)
            for pa, pb in zip(params_a, params_b):
                torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-7)
            with torch.no_grad():
                for pa, pb in zip(params_a, params_b):
                    pa -= 0.3 * pa.grad
                    pb -= 0.3 * pa.grad
        method.end_epoch(epoch, {})
    return regulated


def test_matches_the_independent_rule_at_m2():
    assert compare(2, [0.95, 0.1]) > 0


def test_matches_the_independent_rule_at_m3_and_the_leader_trace_switch():
    assert compare(3, [0.95, 0.1, 0.4]) > 0
    assert compare(3, [0.95, 0.1, 0.4], trace_modality="leader", score="mean") > 0


def test_threshold_gates_the_pull():
    # A threshold above any k: no regulation, and every gradient is that of CE_fused + sum_m CE_m.
    assert compare(2, [0.95, 0.1], threshold=5.0) == 0


def test_outside_the_window_it_is_joint_training():
    dims, encs, fus = model(2)
    j_encs, j_fus = copy.deepcopy(encs), copy.deepcopy(fus)
    method = methods.create("inforeg", encs, fus, window=(1, 3))
    joint = methods.create("joint", j_encs, j_fus)
    xs, y = batches(dims, 1)[0]
    out = method.forward(xs, y, 0)
    method.loss(out, y).backward()
    assert torch.equal(method.before_optimizer_step(out, y), torch.ones(2))
    assert method.decisions() == {}
    jout = joint.forward(xs, y, 0)
    joint.loss(jout, y).backward()
    for p, q in zip(list(fus.parameters()) + list(encs[0].parameters()), list(j_fus.parameters()) +
                    list(j_encs[0].parameters())):
        assert torch.equal(p.grad, q.grad)


def test_first_step_of_an_epoch_pulls_nothing():
    # theta == theta_0 at the first step: beta > 0 (k = 1) but the gradients are the unregulated ones.
    dims, encs, fus = model(2)
    method = methods.create("inforeg", encs, fus, beta_bases=[0.95, 0.1])
    xs, y = batches(dims, 1)[0]
    out = method.forward(xs, y, 0)
    method.loss(out, y).backward()
    before = [p.grad.clone() for e in encs for p in e.parameters()]
    method.before_optimizer_step(out, y)
    assert bool(method.decisions()["regulated"].any())
    for g, p in zip(before, [p for e in encs for p in e.parameters()]):
        assert torch.equal(g, p.grad)


def test_errors_name_the_argument():
    dims, encs, fus = model(3)
    assert methods.create("inforeg", encs, fus).beta_bases == (0.95, 0.1, 0.1)  # the default at M = 3
    with pytest.raises(ValueError, match="beta_bases"):
        methods.create("inforeg", encs, fus, beta_bases=[0.9, 0.2])
    with pytest.raises(ValueError, match=r"beta_bases\[1\]"):
        methods.create("inforeg", encs, fus, beta_bases=[0.9, -1.0, 0.2])
    with pytest.raises(TypeError, match="beta_bases"):
        methods.create("inforeg", encs, fus, beta_bases=0.9)
    with pytest.raises(ValueError, match="trace_modality"):
        methods.create("inforeg", encs, fus, beta_bases=[1, 1, 1], trace_modality="audio")
    with pytest.raises(ValueError, match="trace_window"):
        methods.create("inforeg", encs, fus, beta_bases=[1, 1, 1], trace_window=0)
    with pytest.raises(ValueError, match="task"):
        methods.create("inforeg", encs, fus, beta_bases=[1, 1, 1], task="regression")


def test_non_finite_gradients_stay_non_finite():
    dims, encs, fus = model(2)
    method = methods.create("inforeg", encs, fus)
    data = batches(dims, 2)
    for xs, y in data:
        out = method.forward(xs, y, 0)
        method.loss(out, y).backward()
        with torch.no_grad():
            for p in encs[0].parameters():
                p -= 0.1 * p.grad
    encs[0][0].weight.grad[0, 0] = float("inf")
    encs[1][0].weight.grad[0, 0] = float("nan")
    method.before_optimizer_step(out, y)
    assert torch.isinf(encs[0][0].weight.grad[0, 0]) and torch.isnan(encs[1][0].weight.grad[0, 0])
