"""The stratified Shapley estimator (each distinct subset evaluated once): exact when every stratum is enumerated,
unbiased within its standard error at M = 6 and 8, and its stated variance matches the spread over seeds."""

import math

import pytest
import torch

from agm_fast.coalitions import shapley_weights, stratified_shapley_variance, stratified_shapley_weights


def _game(M, seed=0):
    """A set function on all 2^M subsets that is far from additive: pairwise and size-dependent terms."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, generator=g, dtype=torch.float64)
    pair = torch.randn(M, M, generator=g, dtype=torch.float64)
    f = torch.zeros(1 << M, dtype=torch.float64)
    for mask in range(1 << M):
        x = torch.tensor([(mask >> m) & 1 for m in range(M)], dtype=torch.float64)
        f[mask] = a @ x + x @ pair @ x / M + math.sin(float(x.sum()))
    return f


def _phi(M, f, include_empty):
    masks = list(range(0 if include_empty else 1, 1 << M))
    return shapley_weights(M, masks) @ f[masks]


@pytest.mark.parametrize("include_empty", [False, True])
@pytest.mark.parametrize("M", [2, 3])
def test_exact_when_every_stratum_is_enumerated(M, include_empty):
    # M <= 3: sizes 1 and M - 1 are all the strata, and one permutation's windows enumerate each.
    f = _game(M)
    masks, W, W_rounds = stratified_shapley_weights(M, 2, torch.Generator().manual_seed(0), include_empty)
    torch.testing.assert_close(W @ f[masks], _phi(M, f, include_empty), rtol=1e-12, atol=1e-12)
    assert W_rounds.shape == (2, M, len(masks))


@pytest.mark.parametrize("M, rounds", [(6, 3), (8, 3)])
def test_unbiased_within_its_standard_error_and_stated_variance(M, rounds):
    f = _game(M, seed=M)
    want = _phi(M, f, include_empty=False)
    est, stated, counts = [], [], []
    for seed in range(300):
        masks, W, W_rounds = stratified_shapley_weights(M, rounds, torch.Generator().manual_seed(seed))
        F = f[masks]
        est.append(W @ F)
        stated.append(stratified_shapley_variance(F, W_rounds))
        counts.append(len(masks))
    est = torch.stack(est)
    se = est.std(0) / math.sqrt(len(est))
    # Bias within 4 standard errors of the mean over 300 seeds, for every modality.
    assert ((est.mean(0) - want).abs() <= 4 * se).all()
    # The stated variance (per draw) averages to the spread of the estimates over seeds, within sampling error.
    ratio = torch.stack(stated).mean(0) / est.var(0)
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio
    # Each distinct subset once: at most 2M + 1 + r M (M - 3) of them (sizes 1 and M - 1 are the same M each round),
    # fewer than the exact sum's 2^M - 1.
    assert max(counts) <= min(2 * M + 1 + rounds * M * (M - 3), (1 << M) - 1)
    assert sum(counts) / len(counts) < (1 << M) - 1
    assert est.std(0).max() > 0  # the estimate is random, the test can fail


def test_seeded_and_efficient():
    a = stratified_shapley_weights(5, 4, torch.Generator().manual_seed(3))
    b = stratified_shapley_weights(5, 4, torch.Generator().manual_seed(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    # Every draw's estimates sum to f(A): the weights sum to 1 on the full set and to 0 elsewhere.
    want = torch.zeros(len(a[0]), dtype=torch.float64)
    want[-1] = 1.0
    torch.testing.assert_close(a[1].sum(0), want, rtol=0, atol=1e-12)


def test_agm_stratified_equals_the_sequential_strategy_on_its_subsets():
    from torch import nn

    import agm_fast

    M, B, C = 6, 8, 3
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(4, 5), nn.Tanh()) for _ in range(M)]
    fusion = agm_fast.MLPFusion([5] * M, C, hidden=7)
    xs = [torch.randn(B, 4, dtype=torch.float64) for _ in range(M)]
    y = torch.randint(0, C, (B,))

    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoders, self.fusion = nn.ModuleList(encoders), fusion

        def forward(self, *x):
            return self.fusion(*[e(v) for e, v in zip(self.encoders, x)])

    whole = Whole().double()
    out = []
    for kw in ({"encoders": list(whole.encoders), "fusion": whole.fusion}, {"model": whole, "strategy": "sequential"}):
        agm = agm_fast.AGM(num_modalities=M, shapley="stratified", rounds=3, seed=4, alpha=1.0, **kw)
        assert len(agm._plan(torch.device("cpu"))[0]) < 2**M - 1
        whole.zero_grad()
        res = agm(*xs, target=y)
        nn.functional.cross_entropy(res.logits, y).backward()
        out.append([res.coeffs.clone()] + [p.grad.clone() for p in whole.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="rounds"):
        agm_fast.AGM(encoders=encoders, fusion=fusion, shapley="stratified", rounds=1)
    with pytest.raises(ValueError, match="rounds: applies to shapley='stratified'"):
        agm_fast.methods.create("agm", encoders, fusion, rounds=3)
