"""Competition strength (docs/methods.md, section 1.6), feature extraction and Shapley attribution of accuracy."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import agm_fast


def numpy_strength(Xtr, Ytr, Xte, Yte, alpha):
    """Independent computation: ridge by the normal equations of the design matrix with an intercept column whose
    coefficient is not penalised."""
    A = np.hstack([Xtr, np.ones((Xtr.shape[0], 1))])
    pen = alpha * np.eye(A.shape[1])
    pen[-1, -1] = 0.0
    w = np.linalg.solve(A.T @ A + pen, A.T @ Ytr)
    R = np.hstack([Xte, np.ones((Xte.shape[0], 1))]) @ w - Yte
    N, D = Yte.shape
    Bm = N * np.cov(Yte, rowvar=False).reshape(D, D)
    P = np.linalg.pinv(Bm)
    return sum(r @ P @ r for r in R) / D


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("alpha", [120.0, 0.5, 0.0])
def test_competition_strength_matches_numpy(alpha):
    Xtr, Xte = rand(60, 7, seed=1) * 3 + 1, rand(40, 7, seed=2) * 3 + 1
    mix = rand(7, 4, seed=3)
    Ya_tr, Ya_te = Xtr @ mix + rand(60, 4, seed=4), Xte @ mix + rand(40, 4, seed=5)
    Yv_tr, Yv_te = rand(60, 2, seed=6) + 5, rand(40, 2, seed=7) + 5
    got = agm_fast.competition_strength(Xtr, {"a": Ya_tr, "v": Yv_tr}, Xte.float(), {"a": Ya_te, "v": Yv_te}, alpha)
    assert set(got) == {"a", "v"} and got["a"].dtype == torch.float64
    want_a = numpy_strength(Xtr.numpy(), Ya_tr.numpy(), Xte.float().double().numpy(), Ya_te.numpy(), alpha)
    want_v = numpy_strength(Xtr.numpy(), Yv_tr.numpy(), Xte.float().double().numpy(), Yv_te.numpy(), alpha)
    assert abs(float(got["a"]) - want_a) <= 1e-8 * max(1.0, abs(want_a))
    assert abs(float(got["v"]) - want_v) <= 1e-8 * max(1.0, abs(want_v))
    as_list = agm_fast.competition_strength(Xtr, [Ya_tr, Yv_tr], Xte.float(), [Ya_te, Yv_te], alpha)
    single = agm_fast.competition_strength(Xtr, Yv_tr, Xte.float(), Yv_te, alpha)
    assert as_list.shape == (2,) and single.shape == ()
    torch.testing.assert_close(as_list, torch.stack([got["a"], got["v"]]))
    torch.testing.assert_close(single, got["v"])
    # The fused feature explains concept a but not v.
    assert float(got["a"]) < float(got["v"])


def test_competition_strength_near_zero_for_a_linear_concept():
    Xtr, Xte = rand(80, 6, seed=1), rand(50, 6, seed=2)
    mix = rand(6, 3, seed=3)
    d = agm_fast.competition_strength(Xtr, Xtr @ mix + 2.0, Xte, Xte @ mix + 2.0, ridge_alpha=1e-9)
    assert 0.0 <= float(d) < 1e-9


def test_competition_strength_near_one_for_independent_noise():
    n_tr, n_te, P, D = 4000, 4000, 8, 3
    Xtr, Xte = rand(n_tr, P, seed=1), rand(n_te, P, seed=2)
    Ytr, Yte = rand(n_tr, D, seed=3) * 2 - 1, rand(n_te, D, seed=4) * 2 - 1
    d = float(agm_fast.competition_strength(Xtr, Ytr, Xte, Yte))
    # With nothing to learn, prediction = train mean + noise of beta. Centred test residuals contribute exactly
    # (N-1)/N; the train-vs-test mean gap about 1/n_tr + 1/n_te and the fitted noise in beta about P/n_tr, so
    # E[d] ~ 1 + (P + 1)/n_tr = 1.00225 here, with fluctuations of the same order.
    expected = (n_te - 1) / n_te + (P + 1) / n_tr + 1 / n_te
    assert abs(d - expected) < 5e-3
    assert 0.995 < d < 1.01


def test_competition_strength_errors():
    X, Y = rand(20, 4), rand(20, 3)
    cs = agm_fast.competition_strength
    with pytest.raises(ValueError, match="rows"):
        cs(X, Y[:19], X, Y)
    with pytest.raises(ValueError, match="rows"):
        cs(X, Y, X, Y[:19])
    with pytest.raises(ValueError, match="features"):
        cs(X, Y, X[:, :3], Y)
    with pytest.raises(ValueError, match="as on the train split"):
        cs(X, Y, X, Y[:, :2])
    with pytest.raises(ValueError, match="same structure"):
        cs(X, [Y], X, Y)
    with pytest.raises(ValueError, match="same structure"):
        cs(X, {"a": Y}, X, {"b": Y})
    with pytest.raises(ValueError, match="N_test > D"):
        cs(X, rand(20, 6), X[:6], rand(6, 6))
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        cs(bad, Y, X, Y)
    inf = Y.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite"):
        cs(X, Y, X, inf)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        cs(X.unsqueeze(0), Y, X, Y)
    # A constant concept would give d = 0 ("fully contained") from pinv(0) = 0: it is refused.
    with pytest.raises(ValueError, match=r"concept \(test\): expected a concept that varies over the test split"):
        cs(X, Y, X, torch.ones(20, 3, dtype=Y.dtype))
    with pytest.raises(ValueError, match="ridge_alpha"):
        cs(X, Y, X, Y, ridge_alpha=-1.0)
    with pytest.raises(TypeError, match="tensor"):
        cs(X.numpy(), Y, X, Y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_competition_strength_cuda_matches_cpu():
    Xtr, Xte, Ytr, Yte = rand(50, 5, seed=1), rand(30, 5, seed=2), rand(50, 2, seed=3), rand(30, 2, seed=4)
    cpu = agm_fast.competition_strength(Xtr, Ytr, Xte, Yte)
    gpu = agm_fast.competition_strength(Xtr.cuda(), Ytr.cuda(), Xte.cuda(), Yte.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-12)


class First(nn.Module):
    """A module that takes the loader's batch tuple and runs on its first entry."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch[0])


def test_extract_features_collects_in_eval_mode_and_restores_modes():
    torch.manual_seed(0)
    xa, xv = torch.randn(10, 4), torch.randn(10, 3)
    loader = DataLoader(TensorDataset(xa, xv), batch_size=4)
    fusion = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5))
    conc_a = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.9))
    conc_v = nn.Linear(3, 3)
    fusion.train()
    conc_a.train()
    F, Ys = agm_fast.extract_features(
        loader, lambda b: fusion(torch.cat(b, 1)), {"a": lambda b: conc_a(b[0]), "v": lambda b: conc_v(b[1])}
    )
    assert fusion.training and conc_a.training
    # The lambdas are not modules, so the caller's modes apply: pass modules to get eval mode.
    F2, (Ya, Yv) = agm_fast.extract_features(
        [(torch.cat([xa, xv], 1), xa, xv)], lambda b: b[0], [lambda b: b[1], lambda b: b[2]]
    )
    torch.testing.assert_close(F2, torch.cat([xa, xv], 1))
    torch.testing.assert_close(Ya, xa)
    # Modules are called in eval mode (dropout 0.9 off) and put back in train mode afterwards.
    first = First(conc_a)
    first.train()
    F3, Y3 = agm_fast.extract_features(((a,) for a in xa.split(3)), first, first, max_batches=2)
    assert first.training and conc_a.training
    torch.testing.assert_close(Y3, conc_a[0](xa[:6]).detach())
    torch.testing.assert_close(F3, Y3)
    assert F.shape == (10, 5) and Ys["a"].shape == (10, 2) and Ys["v"].shape == (10, 3)
    assert not F.requires_grad
    with pytest.raises(ValueError, match="loader: expected at least one batch"):
        agm_fast.extract_features([], conc_v, conc_v)


def subset_logits(M, B, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1 << M, B, C, generator=g), torch.randint(0, C, (B,), generator=g)


def accuracy(logits, y):
    return float((logits.argmax(-1) == y).double().mean())


def test_shapley_accuracy_m2_by_hand():
    F, y = subset_logits(2, 50, 4)
    res = agm_fast.shapley_accuracy(F, y, masks=[0, 1, 2, 3])
    acc = [accuracy(F[s], y) for s in range(4)]
    want = [0.5 * ((acc[3] - acc[2]) + (acc[1] - acc[0])), 0.5 * ((acc[3] - acc[1]) + (acc[2] - acc[0]))]
    torch.testing.assert_close(res.values, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(res.accuracies, torch.tensor(acc, dtype=torch.float64))
    # Without f(empty), the chance level 1/C stands in; or the value given.
    chance = agm_fast.shapley_accuracy(F[1:], y, masks=[1, 2, 3])
    assert float(chance.accuracies[0]) == 0.25
    want = [0.5 * ((acc[3] - acc[2]) + (acc[1] - 0.25)), 0.5 * ((acc[3] - acc[1]) + (acc[2] - 0.25))]
    torch.testing.assert_close(chance.values, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    fixed = agm_fast.shapley_accuracy(F, y, masks=[0, 1, 2, 3], empty_accuracy=0.0)
    assert float(fixed.values.sum()) == pytest.approx(acc[3])


@pytest.mark.parametrize("M", [3, 4])
def test_shapley_accuracy_axioms_and_callable(M):
    F, y = subset_logits(M, 40, 3, seed=M)
    # Modality M-1 is a null player: f(S) ignores it.
    null = 1 << (M - 1)
    for s in range(1 << M):
        if s & null:
            F[s] = F[s & ~null]
    order = list(range(1 << M))[::-1]
    res = agm_fast.shapley_accuracy(F[order], y, masks=order)
    acc = [accuracy(F[s], y) for s in range(1 << M)]
    assert float(res.values.sum()) == pytest.approx(acc[-1] - acc[0], abs=1e-14)
    assert float(res.values[M - 1]) == pytest.approx(0.0, abs=1e-15)
    # The permutation definition of the Shapley value.
    for m in range(M):
        total = 0.0
        for perm in itertools.permutations(range(M)):
            before = sum(1 << j for j in perm[: perm.index(m)])
            total += acc[before | (1 << m)] - acc[before]
        assert float(res.values[m]) == pytest.approx(total / math.factorial(M), abs=1e-14)
    calls = []

    def f(mask):
        calls.append(mask)
        return F[mask]

    via_fn = agm_fast.shapley_accuracy(f, y, num_modalities=M)
    assert sorted(calls) == list(range(1 << M))
    torch.testing.assert_close(via_fn.values, res.values)


def test_shapley_accuracy_metric_and_errors():
    F, y = subset_logits(2, 20, 3)
    top = agm_fast.shapley_accuracy(F, y, masks=[0, 1, 2, 3], metric=lambda lg, lab: lg.amax(-1).mean(-1))
    maxes = F.amax(-1).mean(-1).double()
    assert float(top.values.sum()) == pytest.approx(float(maxes[3] - maxes[0]))
    with pytest.raises(ValueError, match="outputs: expected every non-empty subset"):
        agm_fast.shapley_accuracy(F[:3], y, masks=[0, 1, 2])
    with pytest.raises(ValueError, match="masks: expected 4 entries"):
        agm_fast.shapley_accuracy(F, y, masks=[0, 1, 2])
    with pytest.raises(ValueError, match="distinct"):
        agm_fast.shapley_accuracy(F, y, masks=[1, 1, 2, 3])
    with pytest.raises(ValueError, match="masks: expected the subset bitmask"):
        agm_fast.shapley_accuracy(F, y)
    with pytest.raises(ValueError, match="labels"):
        agm_fast.shapley_accuracy(F, y[:5], masks=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="int64"):
        agm_fast.shapley_accuracy(F, y.float(), masks=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="num_modalities"):
        agm_fast.shapley_accuracy(lambda mask: F[mask], y)
    with pytest.raises(ValueError, match=r"\[S, B, C\]"):
        agm_fast.shapley_accuracy(F[0], y, masks=[0])


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList([nn.Sequential(nn.Linear(4, 3), nn.Tanh()), nn.Sequential(nn.Linear(5, 2))])
        self.fusion = nn.Linear(5, 3)

    def forward(self, a, v):
        return self.fusion(torch.cat([self.encoders[0](a), self.encoders[1](v)], dim=1))


@pytest.mark.parametrize("form", ["factorized", "batched"])
def test_shapley_accuracy_through_the_agm_subset_evaluation(form):
    torch.manual_seed(0)
    net = TwoTower().eval()
    xs = [torch.randn(30, 4), torch.randn(30, 5)]
    y = torch.randint(0, 3, (30,))
    if form == "factorized":
        agm = agm_fast.AGM(encoders=list(net.encoders), fusion=net.fusion)
    else:
        agm = agm_fast.AGM(net, num_modalities=2, strategy="batched")

    def f(mask):
        # Input-level muting, as the AGM core's default: a muted modality's input is zeros.
        return net(*[x if (mask >> m) & 1 else torch.zeros_like(x) for m, x in enumerate(xs)])

    want = agm_fast.shapley_accuracy(f, y, num_modalities=2)
    got = agm_fast.shapley_accuracy(agm, y, inputs=xs)
    torch.testing.assert_close(got.accuracies, want.accuracies)
    torch.testing.assert_close(got.values, want.values)
    with pytest.raises(ValueError, match="inputs: expected the M input tensors"):
        agm_fast.shapley_accuracy(agm, y)
    with pytest.raises(ValueError, match="inputs: expected None unless"):
        agm_fast.shapley_accuracy(f, y, num_modalities=2, inputs=xs)
