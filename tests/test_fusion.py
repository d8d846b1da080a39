"""Fusion heads: forward, additive contributions, and the per-modality logits of docs/methods.md, section 2."""

import pytest
import torch
from torch import nn

from agm_fast.fusion import (
    ConcatFusion,
    FiLMFusion,
    GatedFusion,
    MLPFusion,
    SumFusion,
    build_fusion,
    per_modality_logits,
)


def _features(dims, batch=5, dtype=torch.float64):
    return [torch.randn(batch, d, dtype=dtype) for d in dims]


def _zero_out_by_hand(head, features):
    rows = []
    for m in range(len(features)):
        rows.append(head(*[h if j == m else torch.zeros_like(h) for j, h in enumerate(features)]))
    return torch.stack(rows)


@pytest.mark.parametrize("dims", [[3, 5], [4, 1, 7]])
def test_concat_contributions_and_slices(dims):
    head = ConcatFusion(dims, num_classes=6).double()
    h = _features(dims)
    parts, bias = head.contributions(*h)
    torch.testing.assert_close(torch.stack(parts).sum(0) + bias, head(*h))
    W, b = head.fc.weight, head.fc.bias
    start = 0
    expected = []
    for h_m, d in zip(h, dims):
        expected.append(h_m @ W[:, start : start + d].t() + b / len(dims))
        start += d
    out = head.per_modality_logits(*h)
    assert out.shape == (len(dims), 5, 6)
    torch.testing.assert_close(out, torch.stack(expected))
    torch.testing.assert_close(out.sum(0), head(*h))
    torch.testing.assert_close(per_modality_logits(head, h), out)


def test_concat_without_bias():
    head = ConcatFusion([2, 3], num_classes=4, bias=False).double()
    h = _features([2, 3])
    parts, bias = head.contributions(*h)
    assert bias is None
    torch.testing.assert_close(head.per_modality_logits(*h).sum(0), head(*h))


def test_sum_fusion():
    dims = [3, 4, 2]
    head = SumFusion(dims, num_classes=5).double()
    h = _features(dims)
    parts, bias = head.contributions(*h)
    assert bias is None
    torch.testing.assert_close(sum(parts), head(*h))
    expected = torch.stack([fc(h_m) for fc, h_m in zip(head.fcs, h)])
    torch.testing.assert_close(head.per_modality_logits(*h), expected)
    torch.testing.assert_close(per_modality_logits(head, h), expected)


def test_plain_linear_is_a_concat_head():
    dims = [3, 4]
    fc = nn.Linear(7, 5).double()
    h = _features(dims)
    expected = torch.stack([h[0] @ fc.weight[:, :3].t() + fc.bias / 2, h[1] @ fc.weight[:, 3:].t() + fc.bias / 2])
    torch.testing.assert_close(per_modality_logits(fc, h), expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda dims: MLPFusion(dims, 4, hidden=8),
        lambda dims: GatedFusion(dims, 4),
        lambda dims: GatedFusion(dims, 4, hidden=6, gate=1),
        lambda dims: FiLMFusion(dims, 4),
        lambda dims: FiLMFusion(dims, 4, condition=len(dims) - 1),
    ],
)
@pytest.mark.parametrize("dims", [[3, 3], [2, 5, 4]])
def test_zero_out_heads(make, dims):
    head = make(dims).double()
    h = _features(dims)
    assert head(*h).shape == (5, 4)
    expected = _zero_out_by_hand(head, h)
    torch.testing.assert_close(head.per_modality_logits(*h), expected)
    torch.testing.assert_close(per_modality_logits(head, h), expected)


def test_gated_two_modalities_matches_reference_form():
    head = GatedFusion([4, 4], 3).double()
    x, y = _features([4, 4])
    fc_x, fc_y = head.fcs
    expected = head.fc_out(torch.sigmoid(fc_x(x)) * fc_y(y))
    torch.testing.assert_close(head(x, y), expected)


def test_film_two_modalities_matches_reference_form():
    head = FiLMFusion([4, 6], 3).double()
    x, y = _features([4, 6])
    gamma, beta = torch.split(head.fc(x), 6, dim=1)
    torch.testing.assert_close(head(x, y), head.fc_out(gamma * y + beta))


def test_user_module_is_zero_out():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Bilinear(3, 2, 4)

        def forward(self, a, v):
            return self.b(a, v) + a.sum(1, keepdim=True)

    head = Bilinear().double()
    h = _features([3, 2])
    torch.testing.assert_close(per_modality_logits(head, h), _zero_out_by_hand(head, h))
    concat = ConcatFusion([3, 2], 4).double()
    torch.testing.assert_close(per_modality_logits(concat, h, head="zero_out"), _zero_out_by_hand(concat, h))


def test_features_as_one_list():
    head = ConcatFusion([2, 3], 4)
    h = _features([2, 3], dtype=torch.float32)
    torch.testing.assert_close(head(h), head(*h))


def test_gradients_flow_through_per_modality_logits():
    head = ConcatFusion([2, 3], 4).double()
    h = [x.requires_grad_() for x in _features([2, 3])]
    per_modality_logits(head, h).sum().backward()
    assert h[0].grad is not None and head.fc.weight.grad is not None


def test_build_fusion():
    assert isinstance(build_fusion("concat", [2, 3], 4), ConcatFusion)
    assert isinstance(build_fusion("sum", [2, 3], 4), SumFusion)
    assert isinstance(build_fusion("gated", [2, 3], 4), GatedFusion)
    assert isinstance(build_fusion("film", [2, 3], 4), FiLMFusion)
    assert isinstance(build_fusion("mlp", [2, 3], 4, hidden=5), MLPFusion)
    with pytest.raises(ValueError, match="method"):
        build_fusion("attention", [2, 3], 4)


def test_bad_inputs():
    head = ConcatFusion([2, 3], 4)
    with pytest.raises(ValueError, match="expected 2 feature tensors"):
        head(torch.randn(5, 2))
    with pytest.raises(ValueError, match="feature dimension 3"):
        head(torch.randn(5, 2), torch.randn(5, 4))
    with pytest.raises(ValueError, match="batch size"):
        head(torch.randn(5, 2), torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        head(torch.randn(5, 2, 1), torch.randn(5, 3))
    with pytest.raises(TypeError, match="floating-point"):
        head(torch.ones(5, 2, dtype=torch.int64), torch.randn(5, 3))
    with pytest.raises(ValueError, match="dims"):
        ConcatFusion([2, 0], 4)
    with pytest.raises(ValueError, match="gate"):
        GatedFusion([2, 3], 4, gate=2)
    with pytest.raises(ValueError, match="at least 2"):
        FiLMFusion([2], 4)
    with pytest.raises(ValueError, match="concat head"):
        per_modality_logits(nn.Linear(4, 4), [torch.randn(5, 2), torch.randn(5, 3)])
    with pytest.raises(ValueError, match="head"):
        per_modality_logits(head, [torch.randn(5, 2), torch.randn(5, 3)], head="sliced")
