"""Diagnosing & Re-learning against values derived by hand: the scaling, the purity, k-means on separated clusters,
the weights, the schedule of the diagnosis passes, the soft re-initialisation of every parameter, and the errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agm_fast import ConcatFusion, methods
from agm_fast.methods import EpochPass, run_epoch_passes
from agm_fast.methods.relearning import kmeans, minmax_scale, purity, relearn_weights

C, D = 3, 4


def parts(M, seed=0):
    torch.manual_seed(seed)
    encoders = [nn.Sequential(nn.Linear(3 + m, D), nn.Tanh()) for m in range(M)]
    return encoders, ConcatFusion([D] * M, C)


def batches(M, n=3, B=9, seed=1, signal=3.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.arange(B) % C
        xs = [torch.randn(B, 3 + m, generator=g) for m in range(M)]
        xs[0][:, :C] += signal * F.one_hot(y, C)
        out.append((xs, y))
    return out


def test_minmax_scale_by_hand():
    x = torch.tensor([[0.0, 5.0, 2.0], [2.0, 5.0, 4.0], [1.0, 5.0, 3.0]])
    want = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, 1.0], [0.0, -1.0, 0.0]])
    torch.testing.assert_close(minmax_scale(x), want)


def test_purity_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(purity(labels, torch.tensor([0, 0, 0, 1, 1, 1])), torch.tensor(4 / 6))
    torch.testing.assert_close(purity(labels, torch.tensor([2, 2, 0, 0, 1, 1])), torch.tensor(1.0))
    torch.testing.assert_close(purity(labels, torch.zeros(6, dtype=torch.long)), torch.tensor(2 / 6))


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    y = torch.arange(40) % 4
    x = centres[y] + 0.3 * torch.randn(40, 2, generator=g)
    labels = kmeans(x, 4, restarts=3, generator=torch.Generator().manual_seed(1))
    assert labels.shape == (40,) and labels.dtype == torch.int64
    torch.testing.assert_close(purity(y, labels), torch.tensor(1.0))
    assert len(torch.unique(labels)) == 4
    # The same generator state gives the same clustering.
    again = kmeans(x, 4, restarts=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(labels, again)


def test_weights_by_hand():
    w = relearn_weights(torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.55]), 3.0)
    torch.testing.assert_close(w, torch.tensor([math.tanh(0.9), math.tanh(0.15)]))


def test_the_schedule_of_the_diagnosis():
    encoders, fusion = parts(2)
    method = methods.create("relearning", encoders, fusion, reinit_epoch=2, reinit_num=2, window=(0, 5))
    both = [EpochPass("train", "end"), EpochPass("val", "end")]
    assert [bool(method.epoch_passes(e)) for e in range(8)] == [False, False, True, False, True, False, False, False]
    assert method.epoch_passes(2) == both
    method.reinits = 2  # two re-initialisations done: no more
    assert method.epoch_passes(4) == []
    assert method.first_active_epoch() == 2
    assert methods.create("relearning", encoders, fusion, reinit_epoch=20, window=(25, None)).first_active_epoch() == 40
    assert methods.create("relearning", encoders, fusion, reinit_epoch=20, window=(0, 19)).first_active_epoch() is None
    assert methods.create("relearning", encoders, fusion, reinit_num=0).first_active_epoch() is None


@pytest.mark.parametrize("M", [2, 3])
def test_every_encoder_parameter_moves_towards_its_initial_value(M):
    encoders, fusion = parts(M)
    initial = copy.deepcopy(encoders)
    method = methods.create("relearning", encoders, fusion, reinit_epoch=1, move_lambda=2.0, kmeans_restarts=2)
    with torch.no_grad():  # "training"
        for e in encoders:
            for p in e.parameters():
                p.add_(0.5)
    trained = copy.deepcopy(encoders)
    fusion_before = copy.deepcopy(fusion)
    xs, y = batches(M, n=1)[0]
    assert torch.equal(method.before_optimizer_step(method.forward(xs, y, 1), y), torch.ones(M))
    report = run_epoch_passes(method, 1, "end", batches(M, n=4), batches(M, n=2, seed=2, signal=0.5))
    assert report.passes == 2 and report.rows == 54
    dec = method.decisions()
    assert set(dec) == {"train_purity", "val_purity", "weight"} and dec["weight"].shape == (M,)
    assert ((dec["train_purity"] >= 1 / C - 1e-6) & (dec["train_purity"] <= 1)).all()
    want_w = torch.tanh(2.0 * (dec["train_purity"] - dec["val_purity"]).abs())
    torch.testing.assert_close(dec["weight"], want_w)
    assert float(dec["weight"].max()) > 0  # the strong modality's clusters differ between the splits
    for m in range(M):
        w = float(dec["weight"][m])
        for p, p0, pt in zip(encoders[m].parameters(), initial[m].parameters(), trained[m].parameters()):
            torch.testing.assert_close(p.detach(), w * p0.detach() + (1 - w) * pt.detach())
    for p, q in zip(fusion.parameters(), fusion_before.parameters()):
        assert torch.equal(p, q)  # the fusion head is not re-initialised
    out = method.forward(xs, y, 2)
    torch.testing.assert_close(method.before_optimizer_step(out, y), 1 - dec["weight"])
    assert method.reinits == 1


def test_errors():
    encoders, fusion = parts(2)
    with pytest.raises(ValueError, match="task: the purity compares clusters with classes"):
        methods.create("relearning", encoders, fusion, task="regression")
    with pytest.raises(ValueError, match="num_classes: expected an int >= 2"):
        methods.create("relearning", encoders, fusion, num_classes=1)
    for kwargs, name in [({"move_lambda": -1.0}, "move_lambda"), ({"reinit_epoch": 0}, "reinit_epoch"),
                         ({"reinit_num": -1}, "reinit_num"), ({"kmeans_restarts": 0}, "kmeans_restarts")]:
        with pytest.raises(ValueError, match=name):
            methods.create("relearning", encoders, fusion, **kwargs)
    method = methods.create("relearning", encoders, fusion, reinit_epoch=1)
    with pytest.raises(ValueError, match="val: relearning asks for a pass over the val data at the end of epoch 1"):
        run_epoch_passes(method, 1, "end", batches(2), None)
