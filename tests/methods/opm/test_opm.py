"""OPM (docs/methods.md, section 3): drop probabilities, drop rates, the 1/(1-theta) scaling, the reference's theta
gradient, the window and warm-up, sample weights and the loss."""

import math

import pytest
import torch
import torch.nn.functional as F

import agm_fast
from agm_fast.fusion import ConcatFusion
from agm_fast.methods.opm import OPM as _OPM
from agm_fast.methods.opm import opm_apply, opm_drop_probs, opm_loss, opm_scores, opm_theta


def OPM(*args, **kwargs):
    # The mechanics tests run without the journal warm-up, so that epoch 0 drops.
    kwargs.setdefault("warmup_epochs", 0)
    return _OPM(*args, **kwargs)


def _q_by_hand(scores, q_base=0.5, lam=0.5):
    s = [float(x) for x in scores]
    M = len(s)
    out = []
    for m in range(M):
        rho = s[m] / ((sum(s) - s[m]) / (M - 1))
        r = math.tanh(max(rho - 1, 0.0))
        out.append(min(max(q_base * (1 + lam * r) if r > 0 else 0.0, 0.0), 1.0))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize(
    "scores, q_base, lam",
    [
        ([30.0, 10.0], 0.5, 0.5),
        ([10.0, 30.0], 0.5, 0.5),
        ([12.0, 12.0], 0.5, 0.5),
        ([9.0, 3.0, 6.0], 0.5, 0.5),
        ([40.0, 1.0, 2.0], 0.9, 1.0),
        ([5.0, 4.0], 0.3, 0.0),
    ],
)
def test_drop_probs_by_hand(scores, q_base, lam):
    q = opm_drop_probs(torch.tensor(scores), q_base, lam)
    torch.testing.assert_close(q, _q_by_hand(scores, q_base, lam))


def test_drop_probs_tie_and_clip():
    # rho exactly 1 gives r = 0, hence q = 0 (the "-1" of OPM); a large imbalance with q_base 1 clips at 1.
    torch.testing.assert_close(opm_drop_probs(torch.tensor([7.0, 7.0, 7.0])), torch.zeros(3))
    torch.testing.assert_close(opm_drop_probs(torch.tensor([50.0, 1.0]), q_base=1.0, lam=1.0), torch.tensor([1.0, 0]))


def test_theta():
    torch.testing.assert_close(opm_theta(torch.tensor([0.5, 0.25]), [3, 1]), torch.tensor((3 * 0.5 + 0.25) / 4))


def test_drop_rates_match_q():
    B = 20000
    opm = OPM([4, 2], p_exe=1.0, seed=3)
    q = torch.tensor([0.3, 0.6])
    h = [torch.randn(B, 4), torch.randn(B, 2)]
    out, weight = opm(*h, drop_probs=q)
    dropped = torch.stack([(o == 0).all(1) for o in out], dim=1).double()
    for m in range(2):
        sigma = math.sqrt(q[m] * (1 - q[m]) / B)
        assert abs(dropped[:, m].mean().item() - q[m].item()) < 5 * sigma
    both = (dropped[:, 0] * dropped[:, 1]).mean().item()
    assert abs(both - 0.18) < 5 * math.sqrt(0.18 * 0.82 / B)
    torch.testing.assert_close(weight, 1 - dropped[:, 0].float() * dropped[:, 1].float())


def test_kept_features_scaled_by_one_over_one_minus_theta():
    B = 64
    dims = [5, 3]
    opm = OPM(dims, p_exe=1.0, seed=1)
    scores = torch.tensor([40.0, 20.0])
    q = opm_drop_probs(scores)
    h = [torch.randn(B, 5), torch.randn(B, 3)]
    out, weight = opm(*h, scores=scores)
    theta = (5 * q[0] + 3 * q[1]) / 8
    keep = opm.last_keep
    torch.testing.assert_close(opm.last_theta, theta)
    for m in range(2):
        expected = torch.where(keep[:, m : m + 1], h[m] / (1 - theta), torch.zeros_like(h[m]))
        torch.testing.assert_close(out[m], expected)
    assert not keep[:, 1].logical_not().any()
    torch.testing.assert_close(weight, keep.any(1).float())


def test_zero_drop_probability_is_identity():
    opm = OPM([3, 4], p_exe=1.0)
    h = [torch.randn(8, 3), torch.randn(8, 4)]
    for kwargs in ({"drop_probs": torch.zeros(2)}, {"scores": torch.tensor([5.0, 5.0])}):
        out, weight = opm(*h, **kwargs)
        for o, x in zip(out, h):
            assert torch.equal(o, x)
        assert torch.equal(weight, torch.ones(8))


def test_p_exe_gate():
    opm = OPM([2, 2], p_exe=0.7, seed=5)
    h = [torch.randn(4, 2), torch.randn(4, 2)]
    steps = 400
    executed = 0
    for _ in range(steps):
        opm(*h, drop_probs=torch.tensor([0.5, 0.5]))
        executed += int(opm.last_theta.item() > 0)
    assert abs(executed / steps - 0.7) < 5 * math.sqrt(0.21 / steps)
    assert opm.step_count == steps


def test_eval_never_drops():
    opm = OPM([2, 3], p_exe=1.0).eval()
    h = [torch.randn(6, 2), torch.randn(6, 3)]
    out, weight = opm(*h, drop_probs=torch.tensor([1.0, 1.0]))
    assert all(o is x for o, x in zip(out, h))
    assert torch.equal(weight, torch.ones(6))
    assert opm.step_count == 0


def test_no_scores_is_identity():
    opm = OPM([2, 3])
    h = [torch.randn(6, 2), torch.randn(6, 3)]
    out, weight = opm(h)
    assert all(o is x for o, x in zip(out, h)) and torch.equal(weight, torch.ones(6))


def test_gradcheck_deterministic_part():
    B = 5
    h = [torch.randn(B, 3, dtype=torch.float64, requires_grad=True), torch.randn(B, 2, 2, dtype=torch.float64)]
    h[1].requires_grad_()
    keep = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    theta = torch.tensor(0.3)

    def fn(a, v):
        out, _ = opm_apply([a, v], keep, theta)
        return tuple(out)

    assert torch.autograd.gradcheck(fn, tuple(h))
    out, weight = opm_apply(h, keep, theta)
    g = [torch.randn_like(o) for o in out]
    torch.autograd.backward(out, g)
    factor = keep.double() / 0.7
    torch.testing.assert_close(h[0].grad, g[0] * factor[:, :1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h[1].grad, g[1] * factor[:, 1].view(B, 1, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weight, torch.tensor([1.0, 1, 1, 0, 1]))


def test_reproducible_and_resumable():
    h = [torch.randn(32, 2), torch.randn(32, 2)]
    q = torch.tensor([0.5, 0.4])
    a = OPM([2, 2], p_exe=1.0, seed=11)
    b = OPM([2, 2], p_exe=1.0, seed=11)
    a(*h, drop_probs=q)
    b(*h, drop_probs=q)
    assert torch.equal(a.last_keep, b.last_keep)
    state = a.state_dict()
    first_keep = a.last_keep
    second = a(*h, drop_probs=q)[0]
    # Consecutive steps draw different masks (64 decisions: equal by chance with probability < 1e-15).
    assert not torch.equal(a.last_keep, first_keep)
    c = OPM([2, 2], p_exe=1.0, seed=0)
    c.load_state_dict(state)
    assert c.seed == 11 and c.step_count == 1
    resumed = c(*h, drop_probs=q)[0]
    for x, y in zip(second, resumed):
        assert torch.equal(x, y)


def test_loss_equals_removing_dropped_samples():
    B, C = 7, 4
    logits = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, C, (B,))
    weight = torch.tensor([1.0, 0, 1, 1, 0, 1, 1])
    loss = opm_loss(logits, labels, weight)
    (grad,) = torch.autograd.grad(loss, logits)
    kept = weight.bool()
    sub = logits.detach()[kept].requires_grad_()
    ref_loss = F.cross_entropy(sub, labels[kept])
    (ref_grad,) = torch.autograd.grad(ref_loss, sub)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad[kept], ref_grad)
    assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept]))
    empty = opm_loss(logits, labels, torch.zeros(B))
    assert empty.item() == 0.0


def test_window_and_warmup():
    h = [torch.randn(16, 2), torch.randn(16, 3)]
    q = torch.tensor([0.9, 0.0])
    # Default: the journal code's warm-up, no dropping in epochs 0-5.
    opm = _OPM([2, 3], p_exe=1.0)
    assert opm.window == agm_fast.Window(6, None)
    for epoch in range(6):
        out, weight = opm(*h, drop_probs=q, epoch=epoch)
        assert all(o is x for o, x in zip(out, h)) and torch.equal(weight, torch.ones(16))
    assert opm.step_count == 0
    out, _ = opm(*h, drop_probs=q, epoch=6)
    assert opm.step_count == 1 and any((o == 0).all(1).any() for o in out)
    with pytest.raises(ValueError, match="epoch: required"):
        opm(*h, drop_probs=q)
    # A window and a warm-up: dropping only in epochs [max(start, warmup), end].
    win = _OPM([2, 3], p_exe=1.0, window=(1, 4), warmup_epochs=3)
    assert win.window == agm_fast.Window(3, 4)
    assert [win.active(e) for e in range(6)] == [False, False, False, True, True, False]
    with pytest.raises(ValueError, match="nothing of the window"):
        _OPM([2, 3], window=(0, 4))


def _theta_step(theta_grad, seed=0):
    """One OPM step on a concat head with scores from the detached head (opm_scores); returns the gradients of the
    features and of the head, and theta."""
    torch.manual_seed(seed)
    B, C = 12, 4
    h = [torch.randn(B, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    fusion = ConcatFusion([3, 3], C).double()
    with torch.no_grad():
        # Modality 0 dominates, so q_0 > 0 and theta depends on the features.
        fusion.fc.weight[:, :3] *= 4
    y = torch.randint(0, C, (B,))
    opm = OPM([3, 3], p_exe=1.0, seed=seed, theta_grad=theta_grad)
    scores = opm_scores(fusion, h, y)
    out, weight = opm(*h, scores=scores, epoch=0)
    loss = opm_loss(fusion(*out), y, weight)
    loss.backward()
    return [x.grad.clone() for x in h], fusion.fc.weight.grad.clone(), opm.last_theta, opm.last_keep, (h, fusion, y)


def test_reference_theta_gradient_is_theta_itself():
    grads_ref, head_ref, theta, keep, (h, fusion, y) = _theta_step("reference")
    grads_none, head_none, theta_none, keep_none, _ = _theta_step("none")
    assert torch.equal(keep, keep_none) and torch.equal(theta, theta_none) and float(theta) > 0
    # By hand: theta as a function of the features, through a detached copy of the head, as the released code
    # builds it; its gradient theta * d theta / d h is what the encoders receive on top of the loss gradient.
    hs = [x.detach().clone().requires_grad_() for x in h]
    W, b = fusion.fc.weight.detach(), fusion.fc.bias.detach()
    logits = [hs[0] @ W[:, :3].T + b / 2, hs[1] @ W[:, 3:].T + b / 2]
    s = [torch.softmax(lg, -1).gather(1, y.view(-1, 1)).sum() for lg in logits]
    q = []
    for m in range(2):
        r = torch.tanh(torch.relu(s[m] / s[1 - m] - 1))
        q.append(0.5 * (1 + 0.5 * r) if float(r.detach()) > 0 else torch.zeros((), dtype=torch.float64))
    theta_hand = (3 * q[0] + 3 * q[1]) / 6
    torch.testing.assert_close(theta_hand.float(), theta)
    extra = torch.autograd.grad(theta_hand, hs)
    for m in range(2):
        want = grads_none[m] + float(theta_hand.detach()) * extra[m]
        torch.testing.assert_close(grads_ref[m], want, rtol=1e-6, atol=1e-9)
    assert any(float(e.abs().max()) > 0 for e in extra)
    # The head's weights are detached in the scores: the quirk never reaches them.
    torch.testing.assert_close(head_ref, head_none, rtol=0, atol=0)


def test_bad_inputs():
    opm = OPM([2, 3])
    h = [torch.randn(4, 2), torch.randn(4, 3)]
    with pytest.raises(ValueError, match="expected 2 tensors"):
        opm(h[0], scores=torch.ones(2))
    with pytest.raises(ValueError, match="expected 3 features per sample"):
        opm(h[0], torch.randn(4, 4), scores=torch.ones(2))
    with pytest.raises(ValueError, match="scores: expected either scores or drop_probs, got both"):
        opm(*h, scores=torch.ones(2), drop_probs=torch.zeros(2))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        opm(*h, drop_probs=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="drop_probs"):
        opm(*h, drop_probs=torch.zeros(3))
    with pytest.raises(ValueError, match="scores"):
        opm_drop_probs(torch.ones(1))
    with pytest.raises(ValueError, match="p_exe"):
        OPM([2, 3], p_exe=1.5)
    with pytest.raises(ValueError, match="q_base"):
        OPM([2, 3], q_base=-0.1)
    with pytest.raises(ValueError, match="dims"):
        OPM([2])
    for kwargs, exc, pattern in (
        (dict(lam=float("nan")), ValueError, "lam: expected a finite number >= 0.0, got nan"),
        (dict(lam=-1.0), ValueError, "lam: expected a finite number >= 0.0"),
        (dict(p_exe="0.7"), TypeError, "p_exe: expected a finite number in"),
        (dict(theta_grad="paper"), ValueError, "theta_grad: expected one of"),
        (dict(seed=-1), ValueError, "seed: expected an int in"),
        (dict(warmup_epochs=-1), ValueError, "warmup_epochs: expected an int >= 0"),
    ):
        with pytest.raises(exc, match=pattern):
            OPM([2, 3], **kwargs)
    with pytest.raises(ValueError, match="keep"):
        opm_apply(h, torch.ones(4, 3, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="sample_weight"):
        opm_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), torch.ones(5))
