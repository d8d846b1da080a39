"""OGM / OGM-GE (docs/methods.md, sections 2 and 3): coefficients by hand in float64, the reference-mirror
functions, and the OGMGE class (selection, window, warm-up, tie rules, ogm_plus, noise, state)."""

import math

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast import functional
from agm_fast.fusion import ConcatFusion, SumFusion
from agm_fast.methods.ogm import OGMGE, calculate_coefficient, update_model_with_OGM_GE
from agm_fast.ops.ogm_scores import ogm_coefficients_torch


def _scores_by_hand(logits, labels):
    p = torch.softmax(logits.double(), dim=-1)
    return [sum(p[m, b, labels[b]].item() for b in range(logits.shape[1])) for m in range(logits.shape[0])]


def _coeffs_by_hand(scores, alpha, continuous=False):
    shift = 1.0 if continuous else 0.0
    M = len(scores)
    if M == 2:
        rho = scores[1] / scores[0]
        if rho > 1:
            return [1.0, 1 - math.tanh(alpha * max(rho - shift, 0.0))]
        return [1 - math.tanh(alpha * max(1 / rho - shift, 0.0)), 1.0]
    out = []
    for m in range(M):
        rho = scores[m] / ((sum(scores) - scores[m]) / (M - 1))
        out.append(1 - math.tanh(alpha * max(rho - shift, 0.0)) if rho > 1 else 1.0)
    return out


def _logits(M, B=16, C=5, strong=0, scale=3.0):
    labels = torch.randint(0, C, (B,))
    logits = torch.randn(M, B, C)
    # Make one modality confidently right so that the scores differ clearly.
    logits[strong].scatter_add_(1, labels.view(B, 1), torch.full((B, 1), scale))
    return logits, labels


@pytest.mark.parametrize("strong", [0, 1])
@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.8, 2.6])
def test_two_modality_coefficients_by_hand(strong, continuous, alpha):
    logits, labels = _logits(2, strong=strong)
    scores = _scores_by_hand(logits, labels)
    want = _coeffs_by_hand(scores, alpha, continuous)
    k_a, k_v = calculate_coefficient(labels, logits[0], logits[1], alpha, continuous=continuous)
    assert k_a.shape == () and k_a.dtype == torch.float32
    torch.testing.assert_close(torch.stack([k_a, k_v]), torch.tensor(want, dtype=torch.float32))
    got_scores, got = functional.ogm_scores(logits, labels, alpha, continuous)
    torch.testing.assert_close(got_scores, torch.tensor(scores, dtype=torch.float32))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    if alpha == 0.0:
        assert torch.equal(got, torch.ones(2))


def test_rho_exactly_one():
    logits, labels = _logits(1)
    same = torch.cat([logits, logits])
    # Discontinuous (reference): a tie damps modality 0 by 1 - tanh(alpha).
    k_a, k_v = calculate_coefficient(labels, same[0], same[1], 0.8)
    torch.testing.assert_close(k_a, torch.tensor(1 - math.tanh(0.8), dtype=torch.float32))
    assert k_v.item() == 1.0
    # Continuous: relu(rho - 1) = 0, nobody is damped.
    k_a, k_v = calculate_coefficient(labels, same[0], same[1], 0.8, continuous=True)
    assert k_a.item() == 1.0 and k_v.item() == 1.0
    # M > 2 with every rho exactly 1: rho > 1 holds for none. Uniform logits over 4 classes give dyadic scores
    # (B / 4), so mean_{j != m} s_j is exactly s_m in float32 as well.
    uniform = torch.zeros(3, labels.shape[0], 4)
    scores, coeffs = functional.ogm_scores(uniform, labels % 4, 0.8)
    assert torch.equal(scores, torch.full((3,), labels.shape[0] / 4))
    assert torch.equal(coeffs, torch.ones(3))
    _, coeffs = functional.ogm_scores(uniform[:2], labels % 4, 0.8)
    torch.testing.assert_close(coeffs, torch.tensor([1 - math.tanh(0.8), 1.0]))


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("M", [3, 4])
def test_many_modality_coefficients_by_hand(M, continuous):
    logits, labels = _logits(M, strong=1)
    logits[2] *= 0.3
    scores = _scores_by_hand(logits, labels)
    want = _coeffs_by_hand(scores, 0.8, continuous)
    assert sum(w < 1 for w in want) >= 1
    _, got = functional.ogm_scores(logits, labels, 0.8, continuous)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


class _Encoder(nn.Module):
    def __init__(self, channels=2, out=3):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3)
        self.fc = nn.Linear(channels, out)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class _AVNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_net = _Encoder()
        self.visual_net = _Encoder()
        self.fusion = ConcatFusion([3, 3], 4)

    def features(self, x_a, x_v):
        return [self.audio_net(x_a), self.visual_net(x_v)]


def _backward(net, B=6, C=4):
    x_a, x_v = torch.randn(B, 1, 5, 5), torch.randn(B, 1, 5, 5)
    y = torch.randint(0, C, (B,))
    h = net.features(x_a, x_v)
    nn.functional.cross_entropy(net.fusion(*h), y).backward()
    return h, y


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_update_model_reference_mirror_ogm():
    net = _AVNet()
    _backward(net)
    before = _grads(net)
    update_model_with_OGM_GE(net, torch.tensor(0.25), 0.5, mode="OGM")
    after = _grads(net)
    for name in before:
        if name == "audio_net.conv.weight":
            factor = 0.25
        elif name == "visual_net.conv.weight":
            factor = 0.5
        else:
            factor = 1.0  # conv_only=True: biases, linear layers and the head are untouched
        torch.testing.assert_close(after[name], before[name] * factor)


def test_update_model_data_parallel_prefix_and_all_parameters():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    net = _AVNet()
    _backward(net)
    before = _grads(net)
    update_model_with_OGM_GE(Wrapper(net), 0.5, 1.0, mode="OGM", conv_only=False)
    after = _grads(net)
    for name in before:
        factor = 0.5 if name.startswith("audio_net") else 1.0
        torch.testing.assert_close(after[name], before[name] * factor)


def test_update_model_noise_on_both_modalities():
    net = _AVNet()
    _backward(net)
    before = _grads(net)
    update_model_with_OGM_GE(net, 0.5, 1.0, mode="OGM_GE", seed=3)
    after = _grads(net)
    assert not torch.equal(after["audio_net.conv.weight"], before["audio_net.conv.weight"] * 0.5)
    assert not torch.equal(after["visual_net.conv.weight"], before["visual_net.conv.weight"])
    assert torch.equal(after["audio_net.fc.weight"], before["audio_net.fc.weight"])


def test_update_model_selection_errors():
    net = _AVNet()
    _backward(net)
    before = _grads(net)
    with pytest.raises(ValueError, match="selects no"):
        update_model_with_OGM_GE(net, 0.5, 1.0, audio="sound")
    with pytest.raises(ValueError, match="selects no 4-D"):
        update_model_with_OGM_GE(net, 0.5, 1.0, audio="fusion")
    with pytest.raises(ValueError, match="mode"):
        update_model_with_OGM_GE(net, 0.5, 1.0, mode="ogm")
    update_model_with_OGM_GE(net, 0.5, 1.0, mode="Normal")
    for name, g in _grads(net).items():
        assert torch.equal(g, before[name])
    fresh = _AVNet()
    with pytest.raises(RuntimeError, match="backward"):
        update_model_with_OGM_GE(fresh, 0.5, 1.0)


def _hand_coeffs_of(net, h, y, alpha=0.8, continuous=False):
    with torch.no_grad():
        logits = net.fusion.per_modality_logits(*h)
    return _coeffs_by_hand(_scores_by_hand(logits, y), alpha, continuous)


@pytest.mark.parametrize("conv_only", [False, True])
def test_ogmge_ogm_mode_scales_exactly(conv_only):
    net = _AVNet()
    ogm = OGMGE({"audio": net.audio_net, "visual": net.visual_net}, alpha=0.8, mode="OGM", conv_only=conv_only)
    h, y = _backward(net)
    before = _grads(net)
    coeffs = ogm.step_from_features(y, net.fusion, h, epoch=0)
    torch.testing.assert_close(coeffs, torch.tensor(_hand_coeffs_of(net, h, y), dtype=torch.float32))
    after = _grads(net)
    for name in before:
        m = 0 if name.startswith("audio_net") else 1 if name.startswith("visual_net") else None
        selected = m is not None and (not conv_only or before[name].dim() == 4)
        factor = coeffs[m] if selected else 1.0
        torch.testing.assert_close(after[name], before[name] * factor)
    assert ogm.state_dict() == {"seed": 0, "offset": 1, "steps": 1, "modulated_steps": 1}


def test_ogmge_prefixes_and_list_encoders():
    net = _AVNet()
    by_prefix = OGMGE(["audio_net.", "visual_net."], alpha=0.5, mode="OGM", model=net)
    by_module = OGMGE([net.audio_net, net.visual_net], alpha=0.5, mode="OGM")
    assert [len(p) for p in by_prefix.params] == [len(p) for p in by_module.params] == [4, 4]
    h, y = _backward(net)
    logits = net.fusion.per_modality_logits(*h).detach()
    before = _grads(net)
    coeffs = by_prefix.step(y, logits[0], logits[1], epoch=0)
    for name, g in _grads(net).items():
        factor = coeffs[0] if name.startswith("audio") else coeffs[1] if name.startswith("visual") else 1.0
        torch.testing.assert_close(g, before[name] * factor)


def test_ogmge_noise_statistics():
    # Large gradients so that the sample statistics are sharp.
    a = nn.Linear(200, 100)
    v = nn.Linear(150, 100)
    a.weight.grad = torch.randn(100, 200) * 0.01
    v.weight.grad = torch.randn(100, 150) * 3.0
    a.bias.grad = None
    v.bias.grad = None
    before = [a.weight.grad.clone(), v.weight.grad.clone()]
    logits, labels = _logits(2, B=32, strong=1)
    ogm = OGMGE([a, v], alpha=0.8, seed=7)
    coeffs = ogm.step(labels, logits, epoch=0)
    assert coeffs[0].item() == 1.0 and coeffs[1].item() < 1.0
    noise = [a.weight.grad - coeffs[0] * before[0], v.weight.grad - coeffs[1] * before[1]]
    for n, g in zip(noise, before):
        sigma = g.std().item() + 1e-8
        N = n.numel()
        assert abs(n.mean().item()) < 5 * sigma / math.sqrt(N)
        assert abs(n.std().item() / sigma - 1) < 5 / math.sqrt(2 * N)
    corr = torch.corrcoef(torch.stack([noise[0].flatten()[:15000] / 0.01, noise[1].flatten()[:15000] / 3.0]))[0, 1]
    assert abs(corr.item()) < 5 / math.sqrt(15000)
    # A parameter whose grad is None was skipped, and a fresh stream is drawn at the next step.
    assert a.bias.grad is None
    first = noise[0].clone()
    a.weight.grad = before[0].clone()
    ogm.step(labels, logits, epoch=0)
    assert not torch.equal(a.weight.grad - coeffs[0] * before[0], first)


def test_ogmge_same_key_same_noise_and_resume():
    def run(states_at=None, load=None, steps=3):
        torch.manual_seed(1)
        net = _AVNet()
        ogm = OGMGE([net.audio_net, net.visual_net], alpha=0.8, seed=5)
        saved = None
        outs = []
        start = 0
        if load is not None:
            ogm.load_state_dict(load)
            start = load["steps"]
        for i in range(steps):
            net.zero_grad()
            torch.manual_seed(100 + i)
            h, y = _backward(net)
            if i >= start:
                ogm.step_from_features(y, net.fusion, h, epoch=i)
            if states_at == i:
                saved = ogm.state_dict()
            outs.append(_grads(net))
        return outs, saved

    full, saved = run(states_at=0)
    again, _ = run()
    resumed, _ = run(load=saved)
    for i in range(3):
        for name in full[i]:
            assert torch.equal(full[i][name], again[i][name])
            if i >= 1:
                assert torch.equal(full[i][name], resumed[i][name])


def test_ogmge_window_edges():
    net = _AVNet()
    ogm = OGMGE([net.audio_net, net.visual_net], alpha=0.8, mode="OGM", window=(2, 4))
    for epoch, modulated in [(1, False), (2, True), (4, True), (5, False)]:
        net.zero_grad()
        h, y = _backward(net)
        before = _grads(net)
        coeffs = ogm.step_from_features(y, net.fusion, h, epoch=epoch)
        changed = any(not torch.equal(g, before[n]) for n, g in _grads(net).items())
        assert changed == modulated, epoch
        if not modulated:
            assert torch.equal(coeffs, torch.ones(2))
    assert ogm.state_dict()["steps"] == 4 and ogm.state_dict()["modulated_steps"] == 2


def test_ogmge_normal_mode_is_a_no_op():
    net = _AVNet()
    ogm = OGMGE([net.audio_net, net.visual_net], alpha=0.8, mode="Normal")
    h, y = _backward(net)
    before = _grads(net)
    assert torch.equal(ogm.step_from_features(y, net.fusion, h, epoch=0), torch.ones(2))
    for name, g in _grads(net).items():
        assert torch.equal(g, before[name])


def _journal_coeffs_by_hand(scores, alpha, plus=False):
    """The journal code's two-modality rule (docs/methods.md, section 3): ratio_0 = s_0 / s_1; ratio_0 > 1 damps
    modality 0, anything else (a tie included) damps modality 1. OGM+ gives the damped modality 1 and the other 4."""
    ratio_0, ratio_1 = scores[0] / scores[1], scores[1] / scores[0]
    if ratio_0 > 1:
        return [1.0, 4.0] if plus else [1 - math.tanh(alpha * max(ratio_0, 0.0)), 1.0]
    return [4.0, 1.0] if plus else [1.0, 1 - math.tanh(alpha * max(ratio_1, 0.0))]


def test_journal_warmup_and_ogm_plus():
    net = _AVNet()
    ogm = OGMGE([net.audio_net, net.visual_net], alpha=0.8, mode="OGM", journal=True, ogm_plus=True)
    # Journal mode: the 6-epoch warm-up of the released code (it modulates from epoch 6 on).
    assert ogm.warmup_epochs == 6 and not ogm.active(5) and ogm.active(6)
    h, y = _backward(net)
    before = _grads(net)
    assert torch.equal(ogm.step_from_features(y, net.fusion, h, epoch=5), torch.ones(2))
    assert all(torch.equal(g, before[n]) for n, g in _grads(net).items())
    coeffs = ogm.step_from_features(y, net.fusion, h, epoch=6)
    with torch.no_grad():
        scores = _scores_by_hand(net.fusion.per_modality_logits(*h), y)
    want = _journal_coeffs_by_hand(scores, 0.8, plus=True)
    # OGM+ replaces the damping: the dominant modality keeps its gradient (1), the weak one gets 4.
    assert sorted(want) == [1.0, 4.0]
    torch.testing.assert_close(coeffs, torch.tensor(want, dtype=torch.float32))
    for name, g in _grads(net).items():
        m = 0 if name.startswith("audio") else 1 if name.startswith("visual") else None
        torch.testing.assert_close(g, before[name] * (1.0 if m is None else want[m]))
    # An explicit warm-up overrides journal mode's default, and CVPR mode has none.
    assert OGMGE([net.audio_net, net.visual_net], journal=True, warmup_epochs=2).window.start == 2
    assert OGMGE([net.audio_net, net.visual_net]).window.start == 0


@pytest.mark.parametrize("strong", [0, 1])
@pytest.mark.parametrize("alpha", [0.1, 0.8, 2.6])
def test_journal_rule_equals_cvpr_rule_off_ties(strong, alpha):
    logits, labels = _logits(2, strong=strong)
    scores = _scores_by_hand(logits, labels)
    want = _journal_coeffs_by_hand(scores, alpha)
    torch.testing.assert_close(
        ogm_coefficients_torch(torch.tensor(scores), alpha, journal=True),
        torch.tensor(want, dtype=torch.float32),
    )
    torch.testing.assert_close(torch.tensor(want), torch.tensor(_coeffs_by_hand(scores, alpha)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("journal, damped", [(False, 0), (True, 1)])
def test_exact_tie_damps_modality_0_in_cvpr_mode_and_1_in_journal_mode(journal, damped):
    # Both modalities get the same logits, so their scores tie exactly: rho = 1.
    encs = [nn.Linear(3, 3) for _ in range(2)]
    for e in encs:
        e.weight.grad = torch.ones(3, 3)
        e.bias.grad = torch.ones(3)
    one, labels = _logits(1)
    logits = one.expand(2, -1, -1).clone()
    ogm = OGMGE(encs, alpha=0.8, mode="OGM", journal=journal, warmup_epochs=0)
    coeffs = ogm.step(labels, logits, epoch=0)
    # By hand: the damped modality gets 1 - tanh(alpha * relu(1)) (no "-1" in either code), the other 1.
    want = [1.0, 1.0]
    want[damped] = 1 - math.tanh(0.8)
    torch.testing.assert_close(coeffs, torch.tensor(want, dtype=torch.float32))
    torch.testing.assert_close(encs[damped].weight.grad, torch.full((3, 3), want[damped]))
    torch.testing.assert_close(encs[1 - damped].weight.grad, torch.ones(3, 3))
    # The reference helper and the functional form agree with the class.
    torch.testing.assert_close(
        ogm_coefficients_torch(ogm.last_scores, 0.8, journal=journal), torch.tensor(want)
    )
    # OGM+ on a tie: the journal code boosts modality 0 (its else-branch), so modality 1 counts as dominant.
    plus = OGMGE(encs, alpha=0.8, mode="OGM", journal=True, ogm_plus=True, warmup_epochs=0)
    torch.testing.assert_close(plus.step(labels, logits, epoch=0), torch.tensor([4.0, 1.0]))


def test_ogm_plus_many_modalities():
    encs = [nn.Linear(3, 3) for _ in range(3)]
    for e in encs:
        e.weight.grad = torch.ones(3, 3)
        e.bias.grad = torch.ones(3)
    logits, labels = _logits(3, strong=2)
    ogm = OGMGE(encs, alpha=0.5, mode="OGM", ogm_plus=True, plus_factor=2.0)
    coeffs = ogm.step(labels, logits, epoch=0)
    scores = _scores_by_hand(logits, labels)
    damped = [scores[m] / ((sum(scores) - scores[m]) / 2) > 1 for m in range(3)]
    assert damped == [False, False, True]
    # The dominant modality is left alone (1); the weak ones get plus_factor.
    want = [1.0 if damped[m] else 2.0 for m in range(3)]
    torch.testing.assert_close(coeffs, torch.tensor(want, dtype=torch.float32))
    for e, w in zip(encs, want):
        torch.testing.assert_close(e.weight.grad, torch.full((3, 3), w))


def test_ogmge_sum_fusion_and_stacked_logits():
    a, v = nn.Linear(4, 3), nn.Linear(4, 3)
    fusion = SumFusion([3, 3], 5)
    x = torch.randn(8, 4)
    y = torch.randint(0, 5, (8,))
    h = [a(x), v(x)]
    nn.functional.cross_entropy(fusion(*h), y).backward()
    ogm = OGMGE([a, v], alpha=0.3, mode="OGM")
    coeffs = ogm.step_from_features(y, fusion, h, epoch=0)
    with torch.no_grad():
        logits = torch.stack([fusion.fcs[0](h[0]), fusion.fcs[1](h[1])])
    torch.testing.assert_close(coeffs, torch.tensor(_coeffs_by_hand(_scores_by_hand(logits, y), 0.3)))


def test_selection_errors():
    net = _AVNet()
    with pytest.raises(ValueError, match="selects no 4-D"):
        OGMGE([net.audio_net.fc, net.visual_net], alpha=0.5, conv_only=True)
    with pytest.raises(ValueError, match="selects no"):
        OGMGE(["audio_net.", "radar."], alpha=0.5, model=net)
    with pytest.raises(ValueError, match="needs model"):
        OGMGE(["audio_net.", "visual_net."], alpha=0.5)
    with pytest.raises(ValueError, match="selected by both"):
        OGMGE([net.audio_net, net], alpha=0.5)
    with pytest.raises(ValueError, match="at least two"):
        OGMGE([net.audio_net], alpha=0.5)
    frozen = _Encoder().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        OGMGE([net.audio_net, frozen], alpha=0.5)
    ogm = OGMGE([net.audio_net, net.visual_net], alpha=0.5)
    logits, labels = _logits(2, B=6, C=4)
    with pytest.raises(RuntimeError, match="backward"):
        ogm.step(labels, logits[0], logits[1], epoch=0)


def test_bad_inputs():
    net = _AVNet()
    h, y = _backward(net)
    ogm = OGMGE([net.audio_net, net.visual_net], alpha=0.5)
    logits = net.fusion.per_modality_logits(*h).detach()
    with pytest.raises(ValueError, match="expected class indices in"):
        ogm.step(torch.full_like(y, 4), logits[0], logits[1], epoch=0)
    with pytest.raises(ValueError, match="expected class indices in"):
        calculate_coefficient(torch.full_like(y, -1), logits[0], logits[1], 0.5)
    with pytest.raises(TypeError, match="int64"):
        ogm.step(y.int(), logits[0], logits[1], epoch=0)
    with pytest.raises(ValueError, match="expected 2 tensors"):
        ogm.step(y, logits[0], epoch=0)
    with pytest.raises(ValueError, match="M = 3"):
        ogm.step(y, torch.cat([logits, logits[:1]]), epoch=0)
    with pytest.raises(ValueError, match="differs"):
        ogm.step(y, logits[0], logits[1][:, :3], epoch=0)
    with pytest.raises(ValueError, match=r"shape \[6\]"):
        ogm.step(y[:5], logits[0], logits[1], epoch=0)
    with pytest.raises(TypeError):
        ogm.step(y, logits[0], logits[1])
    with pytest.raises(ValueError, match="alpha"):
        OGMGE([net.audio_net, net.visual_net], alpha=-1.0)
    with pytest.raises(ValueError, match="window"):
        OGMGE([net.audio_net, net.visual_net], alpha=0.5, window=(5, 2))
    with pytest.raises(ValueError, match="mode"):
        OGMGE([net.audio_net, net.visual_net], alpha=0.5, mode="GE")
    with pytest.raises(ValueError, match="out_v"):
        calculate_coefficient(y, logits[0], logits[1][:, :2], 0.5)
    assert ogm.state_dict()["steps"] == 0
    # Nothing was modulated by the rejected calls.
    assert ogm.state_dict()["offset"] == 0


def test_state_dict_requires_every_key():
    net = _AVNet()
    ogm = OGMGE([net.audio_net, net.visual_net], alpha=0.5)
    with pytest.raises(KeyError, match="offset"):
        ogm.load_state_dict({"seed": 1, "steps": 0, "modulated_steps": 0})


def test_public_names():
    for name in ("OGMGE", "calculate_coefficient", "update_model_with_OGM_GE", "OPM", "per_modality_logits"):
        assert hasattr(agm_fast, name)


def test_compiled_step_matches_eager():
    # One OGM-GE step traced whole (scores, coefficients and the in-place op) with no graph break.
    def setup():
        torch.manual_seed(0)
        enc_a, enc_v = nn.Linear(4, 3), nn.Linear(5, 3)
        fusion = ConcatFusion([3, 3], 4)
        x_a, x_v, y = torch.randn(8, 4), torch.randn(8, 5), torch.randint(0, 4, (8,))
        h = [enc_a(x_a), enc_v(x_v)]
        nn.functional.cross_entropy(fusion(*h), y).backward()
        ogm = OGMGE([enc_a, enc_v], alpha=0.8, seed=1)
        return ogm, fusion, y, [x.detach() for x in h], [enc_a, enc_v]

    ogm, fusion, y, h, encs = setup()
    want_coeffs = ogm.step_from_features(y, fusion, h, epoch=0)
    want = [p.grad.clone() for e in encs for p in e.parameters()]

    ogm, fusion, y, h, encs = setup()

    def modulate(y, h_a, h_v):
        return ogm.step_from_features(y, fusion, [h_a, h_v], epoch=0)

    coeffs = torch.compile(modulate, fullgraph=True, backend="aot_eager")(y, *h)
    torch.testing.assert_close(coeffs, want_coeffs)
    for g, w in zip([p.grad for e in encs for p in e.parameters()], want):
        torch.testing.assert_close(g, w)
    assert ogm.state_dict()["offset"] == 1


def test_modality_without_gradients_this_step():
    a, v = nn.Linear(3, 3), nn.Linear(3, 3)
    a.weight.grad, a.bias.grad = torch.ones(3, 3), torch.ones(3)
    logits, labels = _logits(2, strong=0)
    ogm = OGMGE([a, v], alpha=0.5, mode="OGM")
    coeffs = ogm.step(labels, logits, epoch=0)
    assert coeffs[0].item() < 1.0
    torch.testing.assert_close(a.weight.grad, torch.full((3, 3), coeffs[0].item()))
    assert v.weight.grad is None
    net = _AVNet()
    _backward(net)
    net.visual_net.zero_grad(set_to_none=True)
    update_model_with_OGM_GE(net, 0.5, 1.0, mode="OGM")
    assert net.visual_net.conv.weight.grad is None
