"""The demo model of ``agm-fast train``: one MLP encoder per view and a fusion head."""

from __future__ import annotations

from typing import List, Sequence

from torch import Tensor, nn

from .fusion import build_fusion

__all__ = ["MultiViewModel", "mlp_encoder"]


def mlp_encoder(d_in: int, hidden: int, d_out: int) -> nn.Module:
    """``Linear(d_in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, d_out) -> ReLU``."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out), nn.ReLU()
    )


class MultiViewModel(nn.Module):
    """One MLP encoder per view and a fusion head: ``fusion(enc_0(x_0), ..., enc_{M-1}(x_{M-1}))``.

    Each encoder is ``Linear(d_m, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, feature_dim) -> ReLU``.

    Args:
        dims: input dimensions ``d_m`` of the views.
        num_classes: C.
        fusion: ``"concat"``, ``"sum"``, ``"mlp"``, ``"gated"`` or ``"film"`` (see :mod:`agm_fast.fusion`).
        hidden: hidden width of each encoder.
        feature_dim: output width of each encoder.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, fusion: str, hidden: int = 128, feature_dim: int = 64):
        super().__init__()
        self.encoders = nn.ModuleList(mlp_encoder(d, hidden, feature_dim) for d in dims)
        # The MLP head's hidden width equals the feature width, so that its output layer is [C, feature_dim] like
        # every other head's (CGGM compares it with its per-modality heads).
        kwargs = {"hidden": feature_dim} if fusion == "mlp" else {}
        self.fusion = build_fusion(fusion, [feature_dim] * len(dims), num_classes, **kwargs)

    def features(self, *xs: Tensor) -> List[Tensor]:
        """Per-view features: M tensors ``[B, feature_dim]`` from M inputs ``[B, d_m]``."""
        return [enc(x) for enc, x in zip(self.encoders, xs)]

    def forward(self, *xs: Tensor) -> Tensor:
        """Logits ``[B, C]``."""
        return self.fusion(*self.features(*xs))
