"""AMSS / AMSS+ (docs/methods.md, section 13): keep ratios by hand, the kept count, channel masking, the method
(window, layer rules, AMSS+ factors, M = 3, non-finite gradients, state) and errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agm_fast.methods as methods
from agm_fast.methods.amss import AMSSMethod, keep_ratios, mask_channels, masked_weights
from agm_fast.methods.amss.core import keep_ratio_sums, keep_ratios_from_sums, kept_count


def _c_by_hand(t):
    e = [math.exp(x) for x in t]
    return [min(max((sum(e) - x) / sum(e), 0.1), 0.9) for x in e]


def test_keep_ratios_by_hand_uniform_logits_and_features():
    # labels [0, 1]: p = (1/2, 1/2), H(Y) term = -log softmax(p)_c = log 2; zero logits: CE = log 2, score = -log 2;
    # zero features of widths 2 and 4: entropies log 2 and log 4. Numerators 0.5, ratios 0.5/log2 and 0.5/log4.
    logits = torch.zeros(2, 2, 2)
    feats = [torch.zeros(2, 2), torch.zeros(2, 4)]
    c, ratio = keep_ratios(logits, feats, torch.tensor([0, 1]), 0.2)
    r = [0.5 / math.log(2), 0.5 / math.log(4)]
    assert ratio.tolist() == pytest.approx(r, rel=1e-6)
    want = [1 / (1 + math.exp((r[0] - r[1]) / 0.2)), 1 / (1 + math.exp((r[1] - r[0]) / 0.2))]
    assert c.tolist() == pytest.approx(want, rel=1e-6)
    assert c.dtype == torch.float32
    # the modality with the larger ratio keeps fewer channels
    assert c[0] < c[1]


def test_label_term_uses_classes_up_to_the_largest_label_only():
    # labels [0, 0, 1] with 4 classes: p = (2/3, 1/3) over 2 entries (not 4).
    p = [2 / 3, 1 / 3]
    lse = math.log(sum(math.exp(x) for x in p))
    hy = -sum(x * (x - lse) for x in p)
    target = torch.tensor([0, 0, 1])
    logits = 2.0 * F.one_hot(target, 4).float().expand(2, 3, 4)   # CE = log(e^2 + 3) - 2
    feats = [torch.zeros(3, 3), torch.zeros(3, 5)]
    c, ratio = keep_ratios(logits, feats, target, 0.5)
    num = -(math.log(math.exp(2) + 3) - 2) + hy + 0.5
    assert num > 0
    assert ratio.tolist() == pytest.approx([num / math.log(3), num / math.log(5)], rel=1e-6)
    assert c.tolist() == pytest.approx(_c_by_hand([num / math.log(3) / 0.5, num / math.log(5) / 0.5]), rel=1e-6)


def test_fallback_overflow_and_clamp():
    feats = [torch.zeros(2, 2), torch.zeros(2, 4)]
    target = torch.tensor([0, 1])
    bad = torch.zeros(2, 2, 2)
    bad[1, :, :] = torch.tensor([[-20.0, 20.0], [20.0, -20.0]])   # CE of modality 1 = 40: numerator < 0
    c, ratio = keep_ratios(bad, feats, target, 0.2)
    assert c.tolist() == [0.5, 0.5] and ratio.tolist() == [1.0, 1.0]
    # both t overflow: inf / inf -> nan -> 0.5
    c, _ = keep_ratios(torch.zeros(2, 2, 2), feats, target, 1e-3)
    assert c.tolist() == [0.5, 0.5]
    # only t_0 overflows (t_0 = 721, t_1 = 72): c_0 = e^t1 / inf = 0 -> 0.1, c_1 = inf / inf -> 0.5
    c, _ = keep_ratios(torch.zeros(2, 2, 2), [torch.zeros(2, 2), torch.zeros(2, 2 ** 10)], target, 1e-3)
    assert c.tolist() == [pytest.approx(0.1), 0.5]
    # large finite gap: clamped to [0.1, 0.9]
    c, _ = keep_ratios(torch.zeros(2, 2, 2), feats, target, 0.01)
    assert c.tolist() == [pytest.approx(0.1), pytest.approx(0.9)]


def test_keep_ratios_from_the_sums_of_unequal_shards_equal_the_whole_batch():
    # 4 classes, labels up to 2 only; the first shard (3 rows) has no label 2, the second (6 rows) all of them.
    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([0, 1, 0, 2, 1, 2, 0, 2, 1])
    logits = torch.stack([s * F.one_hot(target, 4) + 0.3 * torch.randn(9, 4, generator=gen) for s in (3.0, 1.5)])
    feats = [torch.randn(9, 3, generator=gen), torch.randn(9, 5, generator=gen)]
    want_c, want_ratio = keep_ratios(logits, feats, target, 0.5)
    sums = sum(keep_ratio_sums(logits[:, s], [f[s] for f in feats], target[s]) for s in (slice(0, 3), slice(3, 9)))
    assert sums[:4].tolist() == [3, 3, 3, 0]
    c, ratio = keep_ratios_from_sums(sums, 2, 0.5)
    torch.testing.assert_close(c, want_c)
    torch.testing.assert_close(ratio, want_ratio)
    assert min(want_c.tolist()) != 0.5                                   # not the fallback
    # The first shard alone decides otherwise (its label term counts classes 0..1).
    alone, _ = keep_ratios_from_sums(keep_ratio_sums(logits[:, :3], [f[:3] for f in feats], target[:3]), 2, 0.5)
    assert not torch.allclose(alone, want_c)


def test_kept_count_uses_the_float32_value():
    assert kept_count(10, torch.tensor(0.1).item()) == 2
    assert kept_count(64, torch.tensor(0.1).item()) == 7
    assert kept_count(10, torch.tensor(0.9).item()) == 9
    assert kept_count(10, 0.5) == 5


def _grad_with_energy(energies, width=3):
    g = torch.zeros(len(energies), width)
    g[:, 0] = torch.tensor(energies).sqrt()
    return g


def test_mask_channels_sampling_topk_and_plus_by_hand():
    # energies (4, 0, 1, 0): two non-zero channels; k = 2 draws both of them whatever the generator.
    g = _grad_with_energy([4.0, 0.0, 1.0, 0.0])
    mu = (g * g).sum(1)
    gen = torch.Generator().manual_seed(0)
    out = g.clone()
    mask = mask_channels(out, mu, 2, 2, sample=True, plus=False, generator=gen)
    assert mask.tolist() == [1, 0, 1, 0] and torch.equal(out, g)
    out = g.clone()
    mask = mask_channels(out, mu, 2, 2, sample=True, plus=True, generator=gen)   # q = (0.8, 0, 0.2, 0), 1/C = 0.25
    assert mask.tolist() == pytest.approx([1 / 1.05, 0, 1 / 0.45, 0])
    assert torch.allclose(out, g * mask[:, None])
    # top-k keeps the largest energies; AMSS+ does not rescale it
    g = _grad_with_energy([1.0, 9.0, 4.0, 16.0])
    out = g.clone()
    mask = mask_channels(out, (g * g).sum(1), 2, 4, sample=False, plus=True, generator=None)
    assert mask.tolist() == [0, 1, 0, 1]
    assert torch.equal(out[[0, 2]], torch.zeros(2, 3)) and torch.equal(out[[1, 3]], g[[1, 3]])
    # sampling without replacement: k distinct channels, never a zero-energy one
    g = _grad_with_energy([1.0, 0.0, 2.0, 3.0, 4.0, 0.0])
    for s in range(20):
        m = mask_channels(g.clone(), (g * g).sum(1), 3, 4, sample=True, plus=False,
                          generator=torch.Generator().manual_seed(s))
        assert int(m.sum()) == 3 and m[1] == 0 and m[5] == 0


def _mlp(M=2, seed=0):
    torch.manual_seed(seed)
    d = [5, 6, 7][:M]
    encs = [nn.Sequential(nn.Linear(x, 10), nn.ReLU(), nn.Linear(10, 4)) for x in d]
    return encs, nn.Linear(4 * M, 3), [torch.randn(8, x) for x in d], torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _grads(encs, fus):
    return [p.grad.clone() for e in list(encs) + [fus] for p in e.parameters()]


def _joint(encs, fus, xs, y):
    for e in list(encs) + [fus]:
        e.zero_grad(set_to_none=True)
    F.cross_entropy(fus(torch.cat([e(x) for e, x in zip(encs, xs)], 1)), y).backward()
    return _grads(encs, fus)


def _step(method, xs, y, epoch=0):
    out = method.forward(xs, y, epoch)
    for e in list(method.encoders) + [method.fusion]:
        e.zero_grad(set_to_none=True)
    method.loss(out, y).backward()
    return out, method.before_optimizer_step(out, y)


def _independent_c(encs, fus, xs, y, T=0.2):
    z = [e(x).detach().double() for e, x in zip(encs, xs)]
    W, b = fus.weight.detach().double(), fus.bias.detach().double()
    M, o, t, nums = len(z), 0, [], []
    p = torch.bincount(y).double() / len(y)
    hy = -(p * torch.log_softmax(p, 0)).sum().item()
    for zm in z:
        lo = zm @ W[:, o:o + zm.shape[1]].t() + b / M
        o += zm.shape[1]
        ce = F.cross_entropy(lo, y).item()
        h = -(torch.softmax(zm, 1) * torch.log_softmax(zm, 1)).sum(1).mean().item()
        nums.append(-ce + hy + 0.5)
        t.append((-ce + hy + 0.5) / h / T)
    return [0.5] * M if min(nums) <= 0 else _c_by_hand(t)


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("plus", [False, True])
def test_method_masks_rows_as_documented(M, plus):
    encs, fus, xs, y = _mlp(M)
    joint = _joint(encs, fus, xs, y)
    method = methods.create("amss_plus" if plus else "amss", encs, fus, seed=5)
    out, c = _step(method, xs, y)
    assert c.dtype == torch.float32 and c.shape == (M,)
    assert c.tolist() == pytest.approx(_independent_c(encs, fus, xs, y), rel=1e-5)
    assert min(c.tolist()) != 0.5 or max(c.tolist()) != 0.5        # not the fallback
    kept = [0] * M
    i = 0
    for m, e in enumerate(encs):
        for name, p in e.named_parameters():
            jg = joint[i]
            i += 1
            if name.endswith("bias"):
                assert torch.equal(p.grad, jg)
                continue
            C = p.shape[0]
            k = math.ceil(C * c[m].item())
            rows = (p.grad != 0).any(1)
            assert int(rows.sum()) == min(k, int((jg != 0).any(1).sum()))
            kept[m] += int(rows.sum())
            q = (jg ** 2).sum(1) / (jg ** 2).sum()
            scale = 1 / (q + 1 / C) if plus else torch.ones(C)
            assert torch.allclose(p.grad[rows], jg[rows] * scale[rows][:, None], rtol=1e-6)
    for p, jg in zip(fus.parameters(), joint[i:]):
        assert torch.equal(p.grad, jg)                    # the head is never masked
    d = method.decisions()
    assert d["kept"].tolist() == kept and torch.equal(d["c"], c)


def test_outside_the_window_is_joint_training():
    encs, fus, xs, y = _mlp()
    joint = _joint(encs, fus, xs, y)
    method = methods.create("amss_plus", encs, fus, window=(2, 4))
    _, c = _step(method, xs, y, epoch=0)
    assert c.tolist() == [1.0, 1.0] and method.decisions() == {}
    for a, b in zip(_grads(encs, fus), joint):
        assert torch.equal(a, b)
    _, c = _step(method, xs, y, epoch=2)
    assert c.tolist() != [1.0, 1.0]


def test_draws_follow_seed_and_step_and_the_state_restores_the_step():
    encs, fus, xs, y = _mlp()
    a = methods.create("amss", encs, fus, seed=1)
    masks = []
    for _ in range(2):
        _step(a, xs, y)
        masks.append([(p.grad != 0).any(1) for e in encs for n, p in e.named_parameters() if n.endswith("weight")])
    assert a.method_state() == {"step": 2}
    b = methods.create("amss", encs, fus, seed=1)
    b.load_method_state({"step": 1})
    _step(b, xs, y)
    again = [(p.grad != 0).any(1) for e in encs for n, p in e.named_parameters() if n.endswith("weight")]
    assert all(torch.equal(u, v) for u, v in zip(again, masks[1]))
    with pytest.raises(ValueError, match="state"):
        b.load_method_state({"step": -1})


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.downsample = nn.Sequential(nn.Conv2d(2, 3, 1))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.layer1 = nn.Sequential(_Block())
        self.fc = nn.Linear(3, 2)


def test_layer_rules():
    net = _Net()
    assert [n for n, _ in masked_weights(net, "reference")] == ["layer1.0.conv1.weight"]
    assert [n for n, _ in masked_weights(net, "all")] == ["conv1.weight", "layer1.0.conv1.weight",
                                                          "layer1.0.downsample.0.weight", "fc.weight"]
    encs, fus, _, _ = _mlp()
    with pytest.raises(ValueError, match="layers"):
        AMSSMethod(encs, fus, layers="reference")


def test_non_finite_gradients_stay_non_finite():
    encs, fus, xs, y = _mlp()
    method = methods.create("amss_plus", encs, fus)
    out = method.forward(xs, y, 0)
    method.loss(out, y).backward()
    w = encs[0][0].weight
    w.grad[0, 0] = float("inf")
    method.before_optimizer_step(out, y)
    assert not torch.isfinite(w.grad).all()


def test_errors_name_the_argument():
    encs, fus, _, _ = _mlp()
    for kw, name in (({"temperature": 0.0}, "temperature"), ({"layers": "convs"}, "layers"),
                     ({"selection": "bernoulli"}, "selection"), ({"plus": "yes"}, "plus"),
                     ({"energy": "l1"}, "energy")):
        with pytest.raises((ValueError, TypeError), match=name):
            AMSSMethod(encs, fus, **kw)
    with pytest.raises(ValueError, match="task"):
        AMSSMethod(encs, fus, task="regression")


@pytest.mark.parametrize("plus", [False, True])
def test_accumulation_masks_each_micro_batch_as_its_own_step(plus):
    # Two micro-batches of 3 and 5 rows (losses weighted by rows): each gradient masked by hand with its own c and
    # its own draw (micro-batch j draws as step j: seed + j * 0x9E3779B97F4A7C15), then the two summed.
    encs, fus, xs, y = _mlp()
    splits, seed = [(0, 3), (3, 8)], 7
    micro = [([x[a:b] for x in xs], y[a:b], (b - a) / len(y)) for a, b in splits]
    grads, cs = [], []
    for mx, my, w in micro:
        for e in list(encs) + [fus]:
            e.zero_grad(set_to_none=True)
        (F.cross_entropy(fus(torch.cat([e(x) for e, x in zip(encs, mx)], 1)), my) * w).backward()
        grads.append(_grads(encs, fus))
        cs.append(_independent_c(encs, fus, mx, my))

    method = methods.create("amss_plus" if plus else "amss", encs, fus, seed=seed)
    method.set_accumulation(2)
    for e in list(encs) + [fus]:
        e.zero_grad(set_to_none=True)
    for mx, my, w in micro:
        out = method.forward(mx, my, 0)
        (method.loss(out, my) * w).backward()
    recorded = [c.clone() for c in method.micro_coefficients]
    coeffs = method.before_optimizer_step()
    torch.testing.assert_close(coeffs, (recorded[0] + recorded[1]) / 2)

    want = [torch.zeros_like(g) for g in grads[0]]
    for j, (g_micro, c_hand, c) in enumerate(zip(grads, cs, recorded)):
        assert c.tolist() == pytest.approx(c_hand, rel=1e-5)
        gen = torch.Generator().manual_seed((seed + j * 0x9E3779B97F4A7C15) % 2 ** 64)
        i, kept = 0, [0, 0]
        for m, e in enumerate(encs):
            for name, _ in e.named_parameters():
                g = g_micro[i]
                if name.endswith("weight"):
                    C = g.shape[0]
                    mu = (g * g).sum(1)
                    q = mu / mu.sum()
                    n = min(math.ceil(C * c[m].item()), int((mu > 0).sum()))
                    idx = torch.multinomial(q, n, replacement=False, generator=gen)
                    factor = torch.zeros(C)
                    factor[idx] = 1 / (q[idx] + 1 / C) if plus else 1.0
                    g = g * factor[:, None]
                    kept[m] += n
                want[i] += g
                i += 1
        for k in range(i, len(g_micro)):
            want[k] += g_micro[k]                        # the head is never masked
    got = _grads(encs, fus)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=lambda msg: f"parameter {k}: {msg}")
    assert method.decisions()["kept"].tolist() == kept     # the last micro-batch's
    assert all(0 < k < 10 + 4 for k in kept)               # channels were dropped
    assert method.method_state() == {"step": 2}            # one step per micro-batch
