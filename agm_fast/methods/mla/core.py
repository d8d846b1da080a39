"""MLA's maths: the test-time fusion weights and the projection of the shared head's gradient."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["fusion_weights", "fuse", "owm_update"]


def _stacked(logits: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    return logits if isinstance(logits, Tensor) else torch.stack(list(logits))


def fusion_weights(logits: Union[Tensor, Sequence[Tensor]], entropy: str = "batch") -> Tensor:
    """The weights of the M unimodal outputs: ``softmax_m(-e_m)``, ``e_m`` the entropy of modality m's output.

    Args:
        logits: M tensors ``[B, C]`` (or one ``[M, B, C]``).
        entropy: ``"batch"``: softmax over the batch axis (each class column a distribution over the samples) and
            one entropy per modality summed over the whole batch, weights ``[M]``; ``"sample"``: softmax over the
            classes, one entropy per sample, weights ``[M, B]``.

    Returns:
        float32 weights, ``[M]`` or ``[M, B]``, summing to 1 over the modalities.
    """
    z = _stacked(logits).float()
    axis = 1 if entropy == "batch" else 2
    logp = torch.log_softmax(z, dim=axis)
    ent = -(logp.exp() * logp).sum(dim=(1, 2) if entropy == "batch" else 2)
    return torch.softmax(-ent, dim=0)


def fuse(logits: Union[Tensor, Sequence[Tensor]], weights: Tensor) -> Tensor:
    """``sum_m w_m z_m`` (logits: M tensors ``[B, C]`` or one ``[M, B, C]``): weights ``[M]`` (one per modality) or
    ``[M, B]`` (per sample)."""
    z = _stacked(logits)
    w = weights.to(z.dtype)
    w = w[:, None, None] if w.dim() == 1 else w[:, :, None]
    return (w * z).sum(0)


def owm_update(P: Tensor, features: Tensor, alpha: float) -> Tensor:
    """One step of the projection: ``k = P r``, ``P - k k^T / (alpha + r^T k)``, scaled to unit Frobenius norm.

    Args:
        P: ``[d, d]`` the projection so far.
        features: ``[B, d]`` the features the head just read (``r`` is their mean over the batch).
        alpha: the regulariser (``0.1 ** (1 + progress)``).
    """
    r = features.detach().to(P.dtype).mean(0, keepdim=True)
    k = P @ r.T
    P = P - (k @ k.T) / (alpha + r @ k)
    return P / torch.linalg.matrix_norm(P)
