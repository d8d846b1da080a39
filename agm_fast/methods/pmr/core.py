"""PMR's maths: prototype logits, the strength of each modality's prototype cross-entropy, the prototype update."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["prototype_logits", "pmr_strength", "update_prototypes"]


def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """``-||h_i - p_c||``: ``[B, C]`` from features ``[B, ...]`` (flattened) and prototypes ``[C, D]``, float32, in
    one batched distance computation (differences, not the matrix-product expansion, for float32 accuracy)."""
    h = features.reshape(features.shape[0], -1).float()
    return -torch.cdist(h, prototypes.float(), compute_mode="donot_use_mm_for_euclid_dist")


def pmr_strength(scores: Tensor, alpha: float, ratio_strength: bool = False) -> Tuple[Tensor, Tensor]:
    """The ratios ``rho_m = max_k s_k / s_m`` and the strengths ``beta_m`` of the prototype cross-entropies.

    Args:
        scores: ``[M]`` the prototype scores ``s_m`` (sums of the true-class prototype probabilities).
        alpha: the strength.
        ratio_strength: ``beta_m = alpha tanh(rho_m - 1)`` (the paper) instead of ``alpha`` for every modality whose
            score is below the largest (the reference).

    Returns:
        ``(rho, beta)``, each ``[M]`` in the scores' dtype (``rho_m`` is inf where ``s_m`` is 0).
    """
    top = scores.max()
    rho = torch.where(scores > 0, top / torch.where(scores > 0, scores, torch.ones_like(scores)),
                      torch.full_like(scores, float("inf")))
    if ratio_strength:
        beta = alpha * torch.tanh(rho - 1)
    else:
        beta = torch.where(scores < top, torch.full_like(scores, alpha), torch.zeros_like(scores))
    return rho, beta


def update_prototypes(old: Optional[Tensor], sums: Tensor, counts: Tensor, momentum: float, blend: bool) -> Tensor:
    """New prototypes ``[C, D]`` from a pass's per-class feature sums ``[C, D]`` and counts ``[C]``.

    The class means; a class without rows keeps its old prototype (zeros before the first). With ``blend``, ``(1 -
    momentum) * mean + momentum * old``.
    """
    sums = sums.float()
    counts = counts.to(sums.dtype)
    base = torch.zeros_like(sums) if old is None else old.to(sums.device, sums.dtype)
    mean = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], base)
    return (1 - momentum) * mean + momentum * base if blend and old is not None else mean
