"""Bad inputs to AGM get a Python error that names the problem."""

import pytest
import torch
from agm_models import make_batch, make_model
from torch import nn

import agm_fast
from agm_fast import functional as fn


@pytest.fixture
def model():
    return make_model(2, "mlp")


def _agms(model):
    return [
        agm_fast.AGM(model, num_modalities=2, strategy="sequential"),
        agm_fast.AGM(model, num_modalities=2, strategy="batched"),
        agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion),
    ]


def test_wrong_number_of_inputs(model):
    xs, y = make_batch(2)
    for agm in _agms(model):
        with pytest.raises(ValueError, match="expected 2 inputs"):
            agm(xs[0], target=y)
    with pytest.raises(ValueError, match="expected 2 inputs"):
        agm_fast.GradMod(model, 2)(*xs, xs[0])


def test_mismatched_batch_sizes(model):
    xs, y = make_batch(2)
    for agm in _agms(model):
        with pytest.raises(ValueError, match=r"inputs: expected the same batch size B .*, got batch sizes \[5, 4\]"):
            agm(xs[0], xs[1][:4], target=y)
    with pytest.raises(TypeError, match=r"inputs\[1\]: expected a tensor"):
        _agms(model)[0](xs[0], [1.0], target=y)


def test_labels_out_of_range_or_wrong_dtype_or_shape(model):
    xs, y = make_batch(2)
    agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion)
    with pytest.raises(ValueError, match=r"expected class indices in \[0, 4\)"):
        agm(*xs, target=torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"expected class indices in \[0, 4\)"):
        agm(*xs, target=torch.tensor([0, -1, 2, 3, 1]))
    with pytest.raises(TypeError, match="int64 class indices"):
        agm(*xs, target=y.float())
    with pytest.raises(TypeError, match="int64 class indices"):
        agm(*xs, target=y.int())
    with pytest.raises(ValueError, match=r"expected shape \[5\]"):
        agm(*xs, target=y[:3])
    with pytest.raises(ValueError, match="expected class indices in"):
        agm_fast.AGMCoefficients(2, alpha=1.0)(torch.randn(2, 5, 4), y + 4)
    with pytest.raises(TypeError, match="floating-point regression targets"):
        agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, task="regression")(*xs, target=y)
    # A bad target is caught before the model runs: the running state is untouched.
    assert float(agm.coefficients.count) == 0


def test_too_few_or_too_many_modalities(model):
    with pytest.raises(ValueError, match=r"at least two modalities \(M >= 2\), got 1"):
        agm_fast.AGM(model, num_modalities=1)
    with pytest.raises(ValueError, match=r"at least two modalities \(M >= 2\), got 1"):
        agm_fast.AGM(encoders=[model.encoders[0]], fusion=model.fusion)
    with pytest.raises(ValueError, match=r"at least two modalities \(M >= 2\), got 1"):
        agm_fast.AGMCoefficients(1, alpha=1.0)
    with pytest.raises(ValueError, match=r"supports M <= 8, got M = 9; use shapley='sampled'"):
        agm_fast.AGM(model, num_modalities=9)
    with pytest.raises(ValueError, match="M = 10"):
        agm_fast.GradMod(model, 10, shapley="exact")
    with pytest.raises(ValueError, match="shapley='sampled'"):
        fn.shapley_subsets(9)
    agm_fast.AGM(model, num_modalities=9, shapley="sampled")


def test_fusion_output_not_b_by_c(model):
    xs, y = make_batch(2)

    class Flat(nn.Module):
        def forward(self, *f):
            return torch.cat(f, 1).sum(1)

    class Transposed(nn.Module):
        def forward(self, *f):
            return torch.cat(f, 1)[:, :4].t()

    class WrongMasked(nn.Module):
        def forward(self, *f):
            return torch.cat(f, 1)[:5, :4]

    for fusion, pat in ((Flat(), r"shape \[B, C\] = \[5, C\], got shape \(5,\)"),
                        (Transposed(), r"\[5, C\], got shape \(4, 5\)"),
                        (WrongMasked(), r"\[10, 4\], got shape \(5, 4\)")):
        with pytest.raises(ValueError, match=pat):
            agm_fast.AGM(encoders=list(model.encoders), fusion=fusion)(*xs, target=y)

    class NotTensor(nn.Module):
        def forward(self, *f):
            return [f]

    with pytest.raises(TypeError, match="model: expected to return a tensor of logits"):
        agm_fast.AGM(NotTensor(), num_modalities=2)(*xs, target=y)

    class BadContrib(nn.Module):
        def contributions(self, *f):
            return [f[0][:, :4]], None

        def forward(self, *f):
            return torch.cat(f, 1)[:, :4]

    with pytest.raises(ValueError, match="fusion.contributions: expected one piece per modality"):
        agm_fast.AGM(encoders=list(model.encoders), fusion=BadContrib())(*xs, target=y)


def test_configuration_errors(model):
    enc, fus = list(model.encoders), model.fusion
    with pytest.raises(ValueError, match="strategy: expected one of"):
        agm_fast.AGM(model, num_modalities=2, strategy="fast")
    with pytest.raises(ValueError, match="got both"):
        agm_fast.AGM(model, encoders=enc, fusion=fus)
    with pytest.raises(ValueError, match="strategy: expected encoders"):
        agm_fast.AGM(model, num_modalities=2, strategy="factorized")
    with pytest.raises(ValueError, match="masked_mode: 'train' .* needs strategy='factorized'"):
        agm_fast.AGM(model, num_modalities=2, masked_mode="train")
    with pytest.raises(ValueError, match="mute: 'feature' .* needs strategy='factorized'"):
        agm_fast.AGM(encoders=enc, fusion=fus, strategy="batched", mute="feature")
    with pytest.raises(ValueError, match="baselines: .* need mute='feature'"):
        agm_fast.AGM(encoders=enc, fusion=fus, baselines=[torch.zeros(6)] * 2)
    with pytest.raises(ValueError, match="one feature per modality"):
        agm_fast.AGM(encoders=enc, fusion=fus, mute="feature", baselines=[torch.zeros(6)])
    with pytest.raises(ValueError, match="num_modalities: expected the number of modalities"):
        agm_fast.AGM(model)
    with pytest.raises(ValueError, match="num_permutations"):
        agm_fast.AGM(model, num_modalities=2, shapley="sampled", num_permutations=0)
    with pytest.raises(ValueError, match="window"):
        agm_fast.AGM(model, num_modalities=2, window=(5, 1))
    with pytest.raises(ValueError, match="max_batch"):
        agm_fast.AGM(model, num_modalities=2, max_batch=0)
    with pytest.raises(TypeError, match="alpha"):
        agm_fast.AGMCoefficients(2, alpha="1")
    with pytest.raises(ValueError, match="num_modalities: expected 2"):
        agm_fast.AGM(encoders=enc, fusion=fus, num_modalities=3)
    xs, y = make_batch(2)
    with pytest.raises(ValueError, match="epoch: required"):
        agm_fast.AGM(model, num_modalities=2, window=(0, 3))(*xs, target=y)
    bad = agm_fast.AGM(encoders=enc, fusion=fus, mute="feature", baselines=[torch.zeros(5)] * 2)
    with pytest.raises(ValueError, match=r"baselines\[0\]: expected the feature shape of encoder 0, \[6\]"):
        bad(*xs, target=y)
    with pytest.raises(ValueError, match="expected 2 mono-modal outputs"):
        agm_fast.AGMCoefficients(2, alpha=1.0)([torch.randn(5, 4)] * 3, y)


def test_functional_validation():
    F = torch.randn(3, 5, 4)
    _, W = fn.shapley_subsets(2)
    with pytest.raises(ValueError, match=r"W: expected Shapley weights \[M, 3\]"):
        fn.shapley_outputs(F, W[:, :2])
    with pytest.raises(ValueError, match="give W, or masks"):
        fn.shapley_outputs(F)
    with pytest.raises(ValueError, match=r"psi: expected mono-modal outputs \[M, B, C\]"):
        fn.agm_scores(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"running: expected shape \[2\]"):
        fn.agm_coefficients(torch.ones(2), torch.zeros(3), torch.zeros(()), alpha=1.0)
    with pytest.raises(ValueError, match="count"):
        fn.agm_coefficients(torch.ones(2), torch.zeros(2), torch.zeros(2), alpha=1.0)
