"""AGM scores, running means and coefficients by hand against docs/methods.md (section 1.4); state and resume."""

import math

import pytest
import torch
from agm_models import clone, make_batch, make_model
from torch import nn

import agm_fast
from agm_fast import functional as fn

ce = nn.functional.cross_entropy


class HandAGM:
    """docs/methods.md section 1.4 in float64 Python, sample by sample."""

    def __init__(self, M, alpha, cap, window, hold_last):
        self.M, self.alpha, self.cap, self.window, self.hold_last = M, alpha, cap, window, hold_last
        self.S = [0.0] * M
        self.t = 0
        self.last = [1.0] * M

    def score(self, psi, y):
        s = []
        for m in range(self.M):
            total = 0.0
            for b in range(psi.shape[1]):
                row = [float(v) for v in psi[m, b]]
                z = sum(math.exp(v) for v in row)
                total += -math.log(max(math.exp(row[int(y[b])]) / z, 1e-8))
            s.append(total / psi.shape[1])
        return s

    def step(self, psi, y, epoch):
        M = self.M
        s = self.score(psi, y)
        c = []
        for m in range(M):
            r = math.exp(sum(s[j] for j in range(M) if j != m) / (M - 1) - s[m])
            rbar = math.exp(sum(self.S[j] for j in range(M) if j != m) / (M - 1) - self.S[m])
            d = rbar - r if self.cap is None else min(rbar - r, self.cap)
            c.append(math.exp(self.alpha * d))
        if self.window is not None and not self.window[0] <= epoch <= self.window[1]:
            c = list(self.last) if self.hold_last else [1.0] * M
        self.S = [self.S[m] * self.t / (self.t + 1) + s[m] / (self.t + 1) for m in range(M)]
        self.t += 1
        self.last = c
        return s, c


def _psi_sequence(M, steps, B=6, C=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        # Different spreads per modality and step: some steps hit the cap, some do not.
        scale = torch.tensor([0.5 + 2.0 * ((k + m) % 3) for m in range(M)]).view(M, 1, 1)
        out.append((torch.randn(M, B, C, generator=gen) * scale, torch.randint(0, C, (B,), generator=gen)))
    return out


@pytest.mark.parametrize("M", [2, 3, 5])
@pytest.mark.parametrize("cap", [None, 0.3])
@pytest.mark.parametrize("hold_last", [False, True])
def test_coefficients_match_hand_formulas_over_steps(M, cap, hold_last):
    window = (2, 4)
    epochs = [0, 1, 2, 3, 4, 5, 6, 3]
    hand = HandAGM(M, 1.5, cap, window, hold_last)
    coef = agm_fast.AGMCoefficients(M, alpha=1.5, cap=cap, window=window, hold_last=hold_last)
    capped = False
    for (psi, y), epoch in zip(_psi_sequence(M, len(epochs)), epochs):
        s, c = hand.step(psi.double(), y, epoch)
        got = coef(psi, y, epoch=epoch)
        assert got.dtype == torch.float32 and got.shape == (M,)
        torch.testing.assert_close(got.double(), torch.tensor(c, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(coef.running.double(), torch.tensor(hand.S, dtype=torch.float64), rtol=1e-5,
                                   atol=1e-6)
        assert float(coef.count) == hand.t
        if window[0] <= epoch <= window[1] and cap is not None:
            capped |= any(abs(math.log(ci) / 1.5 - cap) < 1e-12 for ci in c)
        if not window[0] <= epoch <= window[1] and not hold_last:
            assert torch.equal(got, torch.ones(M))
    assert cap is None or capped, "the sequence never reached the cap"


def test_first_step_uses_zero_running_means():
    psi, y = _psi_sequence(3, 1)[0]
    s = fn.agm_scores(psi, y)
    _, _, c = fn.agm_coefficients(s, torch.zeros(3), torch.zeros(()), alpha=2.0, cap=None)
    # S = 0 gives rbar = 1 for every modality.
    r = torch.exp((s.sum() - s) / 2 - s)
    torch.testing.assert_close(c, torch.exp(2.0 * (1 - r)))
    torch.testing.assert_close(agm_fast.AGMCoefficients(3, alpha=2.0, cap=None)(psi, y), c)


def test_functional_scores_and_coefficients_equal_the_class():
    coef = agm_fast.AGMCoefficients(3, alpha=0.7, cap=2.0)
    running, count, last = torch.zeros(3), torch.zeros(()), torch.ones(3)
    for psi, y in _psi_sequence(3, 4):
        s = fn.agm_scores(psi, y)
        running, count, c = fn.agm_coefficients(s, running, count, last, alpha=0.7, cap=2.0)
        torch.testing.assert_close(coef(list(psi.unbind(0)), y), c)
        torch.testing.assert_close(coef.running, running)
        assert count.shape == ()


def test_regression_scores_are_mse():
    psi = torch.randn(2, 5, 3)
    target = torch.randn(5, 3)
    torch.testing.assert_close(fn.agm_scores(psi, target, "regression"), ((psi - target) ** 2).mean(dim=(1, 2)))
    target1 = torch.randn(5)
    want = ((psi - target1.view(1, 5, 1)) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(fn.agm_scores(psi, target1, "regression"), want)
    coef = agm_fast.AGMCoefficients(2, alpha=1.0, task="regression")
    s = want.double()
    r = torch.exp(s.flip(0) - s)
    torch.testing.assert_close(coef(psi, target1).double(), torch.exp(1 - r), rtol=1e-5, atol=1e-6)


def test_regression_agm_end_to_end():
    model = make_model(2, "linear", num_classes=1)
    xs, _ = make_batch(2)
    target = torch.randn(5, 1)
    agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, task="regression")
    res = agm(*xs, target=target)
    torch.testing.assert_close(res.scores, fn.agm_scores(res.mono.detach(), target, "regression"))
    nn.functional.mse_loss(res.logits, target).backward()


def test_non_finite_logits_give_nan_coefficients_and_leave_state_unchanged():
    coef = agm_fast.AGMCoefficients(2, alpha=1.0, window=(0, 1))
    seq = _psi_sequence(2, 3)
    coef(*seq[0], epoch=0)
    state = {k: v.clone() for k, v in coef.state_dict().items()}
    bad = seq[1][0].clone()
    bad[0, 2, 1] = float("nan")
    for epoch in (0, 5):  # inside and outside the window
        c = coef(bad, seq[1][1], epoch=epoch)
        assert torch.isnan(c).all()
        for k, v in coef.state_dict().items():
            assert torch.equal(v, state[k]), k
    # The next finite step proceeds as if the bad one had not happened.
    fresh = agm_fast.AGMCoefficients(2, alpha=1.0, window=(0, 1))
    fresh(*seq[0], epoch=0)
    torch.testing.assert_close(coef(*seq[2], epoch=0), fresh(*seq[2], epoch=0))

    # Through AGM: an inf in an input reaches the logits.
    model = make_model(2, "linear", bn=False)
    xs, y = make_batch(2)
    xs[1][0, 0] = float("inf")
    agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion)
    res = agm(*xs, target=y)
    assert torch.isnan(res.coeffs).all() and torch.isnan(res.scores).all()
    assert float(agm.coefficients.count) == 0 and torch.equal(agm.coefficients.running, torch.zeros(2))


def test_eval_mode_leaves_state_unchanged():
    model = make_model(2, "mlp")
    xs, y = make_batch(2)
    agm = agm_fast.AGM(model, num_modalities=2, shapley="sampled", num_permutations=2)
    agm(*xs, target=y)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in agm.state_dict().items()}
    agm.eval()
    agm(*xs, target=y)
    for k, v in agm.state_dict().items():
        assert torch.equal(v, state[k]) if torch.is_tensor(v) else v == state[k]
    agm.train()
    agm(*xs, target=y)
    assert float(agm.coefficients.count) == 2 and agm.get_extra_state()["step"] == 2


def _train(model, agm, steps, start=0, opt_state=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    trace = []
    for step in range(start, start + steps):
        xs, y = make_batch(len(model.encoders), seed=100 + step)
        torch.manual_seed(step)
        res = agm(*xs, target=y, epoch=step // 3)
        opt.zero_grad()
        ce(res.logits, y).backward()
        opt.step()
        trace.append((res.logits.detach(), res.coeffs))
    return trace, opt


@pytest.mark.parametrize("shapley", ["reference", "sampled"])
def test_resume_is_bitwise(shapley, tmp_path):
    kw = dict(alpha=2.0, cap=1.0, window=(1, 2), hold_last=True, shapley=shapley, num_permutations=2)
    init = make_model(3, "mlp", bn=True, dropout=0.2)

    straight = clone(init)
    agm = agm_fast.AGM(encoders=list(straight.encoders), fusion=straight.fusion, **kw)
    trace, _ = _train(straight, agm, 10)

    first = clone(init)
    agm1 = agm_fast.AGM(encoders=list(first.encoders), fusion=first.fusion, **kw)
    trace1, opt1 = _train(first, agm1, 5)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "agm": agm1.state_dict()}, path)

    ckpt = torch.load(path)
    second = make_model(3, "mlp", bn=True, dropout=0.2, seed=123)
    second.load_state_dict(ckpt["model"])
    agm2 = agm_fast.AGM(encoders=list(second.encoders), fusion=second.fusion, **kw)
    agm2.load_state_dict(ckpt["agm"])
    trace2, _ = _train(second, agm2, 5, start=5, opt_state=ckpt["opt"])

    for (a_logits, a_c), (b_logits, b_c) in zip(trace, trace1 + trace2):
        assert torch.equal(a_logits, b_logits)
        assert torch.equal(a_c, b_c)
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)
    for (k, a), b in zip(agm.state_dict().items(), agm2.state_dict().values()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, k


def test_coefficient_state_follows_the_input_device_and_dtype():
    coef = agm_fast.AGMCoefficients(2, alpha=1.0)
    psi, y = _psi_sequence(2, 1)[0]
    c = coef(psi.double(), y)
    assert c.dtype == torch.float32 and coef.running.dtype == torch.float32
