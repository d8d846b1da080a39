"""agm_fast.validation.modality_metrics: the one definition of per-modality accuracy, checked by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agm_fast import methods
from agm_fast.fusion import ConcatFusion, MLPFusion
from agm_fast.validation import modality_metrics, split_batch

C, N = 4, 37


class Model(nn.Module):
    def __init__(self, M, fusion="concat", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3)) for _ in range(M)
        )
        self.fusion = ConcatFusion([6] * M, C) if fusion == "concat" else MLPFusion([6] * M, C, hidden=7)

    def f(self, xs, keep):
        # f(S): the inputs outside S set to zero.
        return self.fusion(*[enc(x if k else torch.zeros_like(x)) for enc, x, k in zip(self.encoders, xs, keep)])


def data(M, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 5, generator=g) for _ in range(M)], torch.randint(0, C, (N,), generator=g)


@pytest.mark.parametrize("fusion", ["concat", "mlp"])
def test_two_modalities_by_hand(fusion):
    model = Model(2, fusion)
    xs, y = data(2)
    got = modality_metrics(model, (xs, y))
    model.eval()
    with torch.no_grad():
        full, a, v = model.f(xs, (1, 1)), model.f(xs, (1, 0)), model.f(xs, (0, 1))
    psi = [(full - v + a) / 2, (full - a + v) / 2]
    assert got["count"] == N
    assert got["accuracy"] == pytest.approx((full.argmax(1) == y).double().mean().item())
    assert got["loss"] == pytest.approx(F.cross_entropy(full, y).item(), rel=1e-6)
    for m in range(2):
        assert got["modality_accuracy"][m] == pytest.approx((psi[m].argmax(1) == y).double().mean().item())
        assert got["modality_loss"][m] == pytest.approx(F.cross_entropy(psi[m], y).item(), rel=1e-5)


def test_three_modalities_sum_to_the_fused_output_and_batches_agree():
    model = Model(3, "mlp")
    xs, y = data(3)
    whole = modality_metrics(model, (xs, y))
    chunked = modality_metrics(model, (xs, y), chunk=7 * 5)  # 5 rows per model call
    loader = [tuple(x[i:i + 8] for x in xs) + (y[i:i + 8],) for i in range(0, N, 8)]
    batched = modality_metrics(model, loader)
    as_dicts = modality_metrics(model, [{"inputs": b[:-1], "labels": b[-1]} for b in loader])
    for other in (chunked, batched, as_dicts):
        assert other["count"] == N
        for key in ("accuracy", "modality_accuracy"):
            assert other[key] == whole[key]
        assert other["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        assert other["modality_loss"] == pytest.approx(whole["modality_loss"], rel=1e-6)


def test_a_method_and_the_modes_it_leaves():
    model = Model(2)
    method = methods.create("ogm", list(model.encoders), model.fusion)
    model.train()
    model.encoders[1].eval()
    xs, y = data(2)
    assert modality_metrics(method, (xs, y)) == modality_metrics(model, (xs, y))
    assert model.encoders[0].training and not model.encoders[1].training and model.fusion.training
    assert all(m.training for m in model.encoders[0].modules())


def test_bad_input_names_what_was_expected():
    model = Model(2)
    xs, y = data(2)
    with pytest.raises(ValueError, match="data: expected 2 inputs per batch"):
        modality_metrics(model, (xs[:1] + xs, y))
    with pytest.raises(ValueError, match="data: expected labels"):
        modality_metrics(model, (xs, y.float()))
    with pytest.raises(ValueError, match="data: expected input 1 with 37 rows"):
        modality_metrics(model, (xs[:1] + [xs[1][:5]], y))
    with pytest.raises(ValueError, match="data: expected at least one sample"):
        modality_metrics(model, [])
    with pytest.raises(ValueError, match="chunk: expected an int >= 1"):
        modality_metrics(model, (xs, y), chunk=0)
    with pytest.raises(TypeError, match="model: expected an agm_fast Method or a model with .encoders"):
        modality_metrics(nn.Linear(2, 2), (xs, y))
    with pytest.raises(TypeError, match="batch: expected"):
        split_batch((xs[0],))
