"""PMR against values derived by hand and an independent implementation written from docs/methods.md: prototypes from
the epoch pass (means, fraction, the blend and its epoch-0 quirk), the strengths, every gradient at M = 2 and 3, the
switches, the window and the errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agm_fast import ConcatFusion, methods
from agm_fast.methods import EpochPass, run_epoch_passes
from agm_fast.methods.pmr import pmr_strength, update_prototypes

C, D = 3, 4


def parts(M, seed=0):
    torch.manual_seed(seed)
    encoders = [nn.Sequential(nn.Linear(3 + m, D), nn.Tanh()) for m in range(M)]
    return encoders, ConcatFusion([D] * M, C)


def batches(M, n=3, B=6, seed=1, strong=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.arange(B) % C
        xs = [torch.randn(B, 3 + m, generator=g) for m in range(M)]
        xs[strong][:, :C] += 2 * F.one_hot(y, C)
        out.append((xs, y))
    return out


def class_means(encoders, data, m):
    # Row by row, as written in the docs: P[c] = mean of h_m over the rows of class c.
    sums, counts = torch.zeros(C, D), [0] * C
    with torch.no_grad():
        for xs, y in data:
            h = encoders[m](xs[m])
            for i in range(len(y)):
                sums[int(y[i])] += h[i]
                counts[int(y[i])] += 1
    return torch.stack([sums[c] / counts[c] if counts[c] else torch.zeros(D) for c in range(C)])


def test_the_start_pass_gives_the_class_means_of_the_fraction_read():
    encoders, fusion = parts(2)
    method = methods.create("pmr", encoders, fusion, proto_fraction=0.5)
    data = batches(2, n=4)
    assert method.epoch_passes(0) == [EpochPass("train", "start", 0.5), EpochPass("train", "end", 0.5)]
    report = run_epoch_passes(method, 0, "start", data)
    assert report.batches == 2
    for m in range(2):
        torch.testing.assert_close(method.prototypes[m], class_means(encoders, data[:2], m))
    # With prototypes, no start pass is asked for any more (a resumed run has them in its state).
    assert method.epoch_passes(1) == [EpochPass("train", "end", 0.5)]


def test_the_blend_replaces_after_epoch_0_and_blends_from_epoch_1():
    encoders, fusion = parts(2)
    a, b, c = batches(2, n=1, seed=1), batches(2, n=1, seed=2), batches(2, n=1, seed=3)
    method = methods.create("pmr", encoders, fusion, proto_momentum=0.25, proto_fraction=1.0)
    run_epoch_passes(method, 0, "start", a)
    run_epoch_passes(method, 0, "end", b)
    torch.testing.assert_close(method.prototypes[1], class_means(encoders, b, 1))  # replaced (the reference)
    run_epoch_passes(method, 1, "end", c)
    want = 0.75 * class_means(encoders, c, 1) + 0.25 * class_means(encoders, b, 1)
    torch.testing.assert_close(method.prototypes[1], want)

    switched = methods.create("pmr", encoders, fusion, proto_momentum=0.25, proto_fraction=1.0, first_epoch_ema=True)
    run_epoch_passes(switched, 0, "start", a)
    run_epoch_passes(switched, 0, "end", b)
    want = 0.75 * class_means(encoders, b, 0) + 0.25 * class_means(encoders, a, 0)
    torch.testing.assert_close(switched.prototypes[0], want)


def test_a_class_without_rows_keeps_its_prototype():
    old = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    sums = torch.tensor([[4.0, 6.0], [0.0, 0.0]])
    got = update_prototypes(old, sums, torch.tensor([2.0, 0.0]), 0.5, blend=True)
    torch.testing.assert_close(got, torch.tensor([[1.5, 2.5], [3.0, 4.0]]))
    got = update_prototypes(None, sums, torch.tensor([2.0, 0.0]), 0.5, blend=True)
    torch.testing.assert_close(got, torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def test_strengths_by_hand():
    rho, beta = pmr_strength(torch.tensor([2.0, 1.0, 0.5]), 3.0)
    torch.testing.assert_close(rho, torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(beta, torch.tensor([0.0, 3.0, 3.0]))
    _, beta = pmr_strength(torch.tensor([2.0, 1.0, 0.5]), 3.0, ratio_strength=True)
    torch.testing.assert_close(beta, torch.tensor([0.0, 3.0 * math.tanh(1.0), 3.0 * math.tanh(3.0)]))
    _, beta = pmr_strength(torch.tensor([1.0, 1.0]), 2.0)  # a tie: nobody trails
    torch.testing.assert_close(beta, torch.zeros(2))


def independent_step(encoders, fusion, protos, xs, y, alpha, ratio_strength=False):
    """The step as docs/methods.md writes it, with explicit loops for the distances."""
    feats = [enc(x) for enc, x in zip(encoders, xs)]
    loss = F.cross_entropy(fusion(*feats), y)
    sims = []
    for h, P in zip(feats, protos):
        rows = [torch.stack([-torch.sqrt(((h[i] - P[c]) ** 2).sum()) for c in range(C)]) for i in range(len(y))]
        sims.append(torch.stack(rows))
    scores = [float(sum(s.detach().softmax(1)[i, y[i]] for i in range(len(y)))) for s in sims]
    top = max(scores)
    betas = [(alpha * math.tanh(top / s - 1) if ratio_strength else (alpha if s < top else 0.0)) for s in scores]
    for b, s in zip(betas, sims):
        loss = loss + b * F.cross_entropy(s, y)
    return loss, betas


@pytest.mark.parametrize("M,strong,ratio_strength", [(2, 0, False), (2, 1, False), (3, 1, False), (3, 2, True)])
def test_every_gradient_matches_an_independent_step(M, strong, ratio_strength):
    encoders, fusion = parts(M)
    ref_enc, ref_fus = copy.deepcopy(encoders), copy.deepcopy(fusion)
    method = methods.create("pmr", encoders, fusion, alpha=1.5, ratio_strength=ratio_strength)
    run_epoch_passes(method, 0, "start", batches(M, n=10, strong=strong))
    protos = [p.clone() for p in method.prototypes]
    xs, y = batches(M, n=1, B=9, seed=5, strong=strong)[0]
    out = method.forward(xs, y, 0)
    method.loss(out, y).backward()
    coeffs = method.before_optimizer_step(out, y)
    want_loss, betas = independent_step(ref_enc, ref_fus, protos, xs, y, 1.5, ratio_strength)
    want_loss.backward()
    torch.testing.assert_close(coeffs, 1 + torch.tensor(betas))
    assert betas[strong] == 0.0 and sum(b > 0 for b in betas) == M - 1
    torch.testing.assert_close(method.decisions()["strength"], torch.tensor(betas))
    for p, q in zip([*[p for e in encoders for p in e.parameters()], *fusion.parameters()],
                    [*[p for e in ref_enc for p in e.parameters()], *ref_fus.parameters()]):
        torch.testing.assert_close(p.grad, q.grad)


def test_outside_the_window_no_term_and_no_pass_after_it():
    encoders, fusion = parts(2)
    method = methods.create("pmr", encoders, fusion, window=(1, 2))
    assert [r.when for r in method.epoch_passes(0)] == ["start", "end"]
    assert method.epoch_passes(3) == []
    run_epoch_passes(method, 0, "start", batches(2))
    assert [r.when for r in method.epoch_passes(1)] == ["end"] and method.epoch_passes(2) == []
    xs, y = batches(2, n=1)[0]
    out = method.forward(xs, y, 0)
    assert method.loss_term(F.cross_entropy(out.logits, y), out) is None
    assert torch.equal(method.before_optimizer_step(out, y), torch.ones(2)) and method.decisions() == {}


def test_accumulation_is_exact():
    encoders, fusion = parts(2)
    method = methods.create("pmr", encoders, fusion)
    method.set_accumulation(4)
    assert method.accumulation == "exact" and not method.accumulating


def test_errors():
    encoders, fusion = parts(2)
    xs, y = batches(2, n=1)[0]
    method = methods.create("pmr", encoders, fusion)
    out = method.forward(xs, y, 0)
    with pytest.raises(RuntimeError, match="no prototypes yet; run agm_fast.methods.run_epoch_passes"):
        method.loss(out, y)
    with pytest.raises(ValueError, match="task: PMR's prototypes are class means"):
        methods.create("pmr", encoders, fusion, task="regression")
    with pytest.raises(ValueError, match="num_classes: expected an int >= 2"):
        methods.create("pmr", encoders, fusion, num_classes=1)
    for kwargs, name in [({"alpha": -1.0}, "alpha"), ({"proto_fraction": 0.0}, "proto_fraction"),
                         ({"proto_momentum": 1.0}, "proto_momentum"), ({"proto_data": "test"}, "proto_data")]:
        with pytest.raises(ValueError, match=name):
            methods.create("pmr", encoders, fusion, **kwargs)
    empty = methods.create("pmr", encoders, nn.Linear(2 * D, C))  # no fusion.dims: no zero sums to start from
    with pytest.raises(ValueError, match="the prototype pass of epoch 0 read no batch"):
        run_epoch_passes(empty, 0, "start", [])


def test_the_val_split_is_asked_for_when_chosen():
    encoders, fusion = parts(2)
    method = methods.create("pmr", encoders, fusion, proto_data="val", proto_fraction=1.0)
    assert method.epoch_passes(0) == [EpochPass("val", "start", 1.0), EpochPass("val", "end", 1.0)]
    val = batches(2, n=2, seed=9)
    run_epoch_passes(method, 0, "start", None, val)
    torch.testing.assert_close(method.prototypes[0], class_means(encoders, val, 0))
