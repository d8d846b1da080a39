"""Gradient routing of AGM (docs/methods.md, section 1.5): the hook form (GradMod) and the stop-gradient form
(AGM) agree."""

import pytest
import torch
from agm_models import clone, grads, make_batch, make_model
from torch import nn

import agm_fast
from agm_fast import functional as fn

ce = nn.functional.cross_entropy


class TableModel(nn.Module):
    """A two-modality "model" whose output for subset S is the leaf ``F[S - 1]``: it reads which inputs are zero."""

    def __init__(self, F: torch.Tensor) -> None:
        super().__init__()
        self.F = F

    def forward(self, xa, xv):
        mask = int(bool(xa.abs().sum() > 0)) | (int(bool(xv.abs().sum() > 0)) << 1)
        return self.F[mask - 1] * 1.0


@pytest.mark.parametrize("tensor_scales", [False, True])
def test_two_modality_routing_hook_form(tensor_scales):
    B, C = 4, 3
    F = torch.randn(3, B, C, requires_grad=True)
    g = torch.randn(B, C)
    c_a, c_v = 1.7, 0.4
    gm = agm_fast.GradMod(TableModel(F), 2, strategy="sequential")
    psi_a, psi_v, out = gm(torch.ones(B, 2), torch.ones(B, 2))
    torch.testing.assert_close(out, F[2])
    torch.testing.assert_close(psi_a, 0.5 * (F[2] - F[1] + F[0]))
    # The scales are read at backward time: set them after the forward, as the reference loop does.
    gm.update_scale(*(torch.tensor([c_a, c_v]) if tensor_scales else (c_a, c_v)))
    out.backward(g)
    torch.testing.assert_close(F.grad[2], 0.5 * (c_a + c_v) * g)  # f({a, v})
    torch.testing.assert_close(F.grad[0], 0.5 * (c_a - c_v) * g)  # f({a})
    torch.testing.assert_close(F.grad[1], 0.5 * (c_v - c_a) * g)  # f({v})


def test_two_modality_routing_stop_gradient_form():
    B, C = 4, 3
    F = torch.randn(3, B, C, requires_grad=True)
    g = torch.randn(B, C)
    c = torch.tensor([1.7, 0.4])
    _, W = fn.shapley_subsets(2)
    out = fn.shapley_combine(F, W, c, 2)
    torch.testing.assert_close(out, F[2])
    out.backward(g)
    torch.testing.assert_close(F.grad[2], 0.5 * (c[0] + c[1]) * g)
    torch.testing.assert_close(F.grad[0], 0.5 * (c[0] - c[1]) * g)
    torch.testing.assert_close(F.grad[1], 0.5 * (c[1] - c[0]) * g)


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("shapley", ["reference", "exact"])
def test_hook_form_equals_stop_gradient_form(M, shapley):
    model = make_model(M, "mlp", bn=True, dropout=0.2)
    xs, y = make_batch(M)
    m1, m2 = clone(model), clone(model)

    agm = agm_fast.AGM(encoders=list(m1.encoders), fusion=m1.fusion, alpha=3.0, shapley=shapley)
    torch.manual_seed(7)
    res = agm(*xs, target=y)
    ce(res.logits, y).backward()

    gm = agm_fast.GradMod(m2, M, shapley=shapley)
    coef = agm_fast.AGMCoefficients(M, alpha=3.0)
    torch.manual_seed(7)
    *psis, out = gm(*xs)
    loss = ce(out, y)
    coeffs = coef(psis, y)
    gm.update_scale(*coeffs)
    loss.backward()

    assert not torch.allclose(coeffs, torch.ones(M))
    torch.testing.assert_close(coeffs, res.coeffs)
    torch.testing.assert_close(torch.stack(psis), res.mono)
    torch.testing.assert_close(out, res.logits)
    for a, b in zip(grads(m1), grads(m2)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(coef.running, agm.coefficients.running)


def test_gradmod_float_and_tensor_scales_agree_and_validate():
    model = make_model(3, "linear")
    xs, y = make_batch(3)
    out = []
    for scales in ((0.5, 2.0, 1.25), tuple(torch.tensor([0.5, 2.0, 1.25]).unbind()), (torch.tensor([0.5, 2.0, 1.25]),)):
        m = clone(model)
        gm = agm_fast.GradMod(m, 3)
        *_, o = gm(*xs)
        gm.update_scale(*scales)
        ce(o, y).backward()
        out.append(grads(m))
    for g in out[1:]:
        for a, b in zip(out[0], g):
            torch.testing.assert_close(a, b)
    gm = agm_fast.GradMod(model, 3)
    with pytest.raises(ValueError, match="coeffs: expected 3 coefficients"):
        gm.update_scale(1.0, 2.0)
    with pytest.raises(TypeError, match=r"coeffs\[1\]"):
        gm.update_scale(1.0, "2", 3.0)
    with pytest.raises(ValueError, match=r"coeffs\[0\]"):
        gm.update_scale(torch.ones(2, 2), 1.0, 1.0)


def test_gradmod_psi_gradient_reaches_unimodal_losses_scaled():
    # A loss on psi_m itself is scaled too, as with the reference's identity module and its full backward hook.
    B, C = 4, 3
    F = torch.randn(3, B, C, requires_grad=True)
    gm = agm_fast.GradMod(TableModel(F), 2, strategy="sequential")
    psi_a, psi_v, _ = gm(torch.ones(B, 2), torch.ones(B, 2))
    gm.update_scale(3.0, 1.0)
    psi_a.sum().backward()
    torch.testing.assert_close(F.grad[0], torch.full((B, C), 1.5))
    torch.testing.assert_close(F.grad[1], torch.full((B, C), -1.5))
