"""``ogm_scores``: OGM's per-modality scores (softmax at the label, summed over the batch) and coefficients in one
launch, plus the coefficient rules the OGM classes share (docs/methods.md, sections 2 and 3).

The custom op ``agm_fast::ogm_scores`` (Triton on CUDA, :func:`ogm_scores_torch` elsewhere), its fake, and the
validated public function :func:`ogm_scores`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, distributed
from .._validate import check_alpha, check_class_labels, check_per_modality_logits
from ..coalitions import mean_of_others

__all__ = ["ogm_coefficients_torch", "ogm_damped", "ogm_scores", "ogm_scores_op", "ogm_scores_torch"]


def ogm_damped(scores: Tensor, journal: bool = False) -> Tensor:
    """``[M]`` bool: which modalities OGM damps (the dominant ones).

    M = 2, CVPR code: modality 1 when ``s_1 / s_0 > 1``, else modality 0, so a tie damps modality 0. M = 2, journal
    code (``journal=True``): modality 0 when ``s_0 / s_1 > 1``, else modality 1, so a tie damps modality 1. M > 2:
    every m with ``s_m / mean_{j != m} s_j > 1`` (no modality on an exact tie).
    """
    s = scores.to(torch.float32)
    if s.shape[0] == 2:
        if journal:
            damp0 = s[0] / s[1] > 1
            return torch.stack([damp0, ~damp0])
        damp1 = s[1] / s[0] > 1
        return torch.stack([~damp1, damp1])
    return s / mean_of_others(s) > 1


def ogm_coefficients_torch(
    scores: Tensor,
    alpha: float,
    continuous: bool = False,
    journal: bool = False,
    plus_factor: Optional[float] = None,
) -> Tensor:
    """OGM coefficients from per-modality scores (docs/methods.md, sections 2 and 3).

    M = 2: the damped modality m (see :func:`ogm_damped`; the tie rule follows ``journal``) gets
    ``1 - tanh(alpha * relu(rho_m))`` with ``rho_m = s_m / s_other`` (``relu(rho_m - 1)`` with ``continuous``), the
    other 1. M > 2: ``rho_m = s_m / mean_{j!=m} s_j`` and every m with ``rho_m > 1`` is damped. With ``plus_factor``
    (the journal's OGM+) the damping is replaced: damped modalities get 1 and the others ``plus_factor``. Any
    non-finite score makes every coefficient NaN.

    Args:
        scores: ``[M]`` softmax-at-label sums.
        alpha: the modulation strength.
        continuous: use ``relu(rho - 1)`` (continuous at rho = 1).
        journal: the journal code's tie rule (M = 2: a tie damps modality 1).
        plus_factor: OGM+'s coefficient of the weak modalities, or None for OGM.

    Returns:
        ``[M]`` float32 coefficients.
    """
    s = scores.to(torch.float32)
    M = s.shape[0]
    shift = 1.0 if continuous else 0.0
    damped = ogm_damped(s, journal)
    if plus_factor is not None:
        k = torch.where(damped, torch.ones_like(s), torch.full_like(s, float(plus_factor)))
    elif M == 2:
        # rho_m of each modality against the other, in the form the reference computes it: s_1 / s_0 and its
        # reciprocal (CVPR), or s_0 / s_1 and its reciprocal (journal).
        if journal:
            rho0 = s[0] / s[1]
            rho = torch.stack([rho0, 1 / rho0])
        else:
            rho1 = s[1] / s[0]
            rho = torch.stack([1 / rho1, rho1])
        k = torch.where(damped, 1 - torch.tanh(alpha * torch.relu(rho - shift)), torch.ones_like(s))
    else:
        rho = s / mean_of_others(s)
        k = torch.where(damped, 1 - torch.tanh(alpha * torch.relu(rho - shift)), torch.ones_like(s))
    # A non-finite score makes every coefficient NaN, so that a step with overflowing logits cannot pass silently.
    return torch.where(torch.isfinite(s).all(), k, torch.full_like(k, float("nan")))


def ogm_scores_torch(logits: Tensor, labels: Tensor, alpha: float, continuous: bool = False) -> Tuple[Tensor, Tensor]:
    """OGM scores ``s_m = sum_b softmax(out_m)[b, y_b]`` and coefficients.

    Args:
        logits: ``[M, B, C]`` per-modality logits.
        labels: ``[B]`` int64 class indices.
        alpha, continuous: as :func:`ogm_coefficients_torch`.

    Returns:
        ``(scores [M], coeffs [M])``, float32.
    """
    p = torch.softmax(logits.to(torch.float32), dim=-1)
    idx = labels.view(1, -1, 1).expand(p.shape[0], -1, 1)
    scores = p.gather(-1, idx).squeeze(-1).sum(dim=1)
    return scores, ogm_coefficients_torch(scores, alpha, continuous)


@torch.library.custom_op("agm_fast::ogm_scores", mutates_args=())
def ogm_scores_op(logits: Tensor, labels: Tensor, alpha: float, continuous: bool) -> Tuple[Tensor, Tensor]:
    """See :func:`ogm_scores_torch`. Returns ``(scores [M], coeffs [M])``, float32."""
    if _backend.select(logits.device) == "triton":
        from agm_fast.kernels import ogm_scores as k

        return k.ogm_scores_fwd(logits, labels, alpha, continuous)
    return ogm_scores_torch(logits, labels, alpha, continuous)


@ogm_scores_op.register_fake
def _(logits, labels, alpha, continuous):
    M = logits.shape[0]
    return (
        torch.empty((M,), dtype=torch.float32, device=logits.device),
        torch.empty((M,), dtype=torch.float32, device=logits.device),
    )


def ogm_scores(
    logits: Tensor, labels: Tensor, alpha: float, continuous: bool = False, process_group=None
) -> Tuple[Tensor, Tensor]:
    """OGM scores and coefficients of one step, on the logits' device with no host synchronisation.

    ``s_m = sum_b softmax(out_m)[b, y_b]``; M = 2: ``rho = s_1 / s_0`` and the dominant modality gets
    ``1 - tanh(alpha * relu(rho))`` (``relu(rho - 1)`` with ``continuous``), the other 1, a tie damping modality 0;
    M > 2: ``rho_m = s_m / mean_{j != m} s_j`` and every m with ``rho_m > 1`` is damped (docs/methods.md, section 2).
    The logits are treated as constants (no gradient flows through the scores).

    Args:
        logits: ``[M, B, C]`` per-modality logits, M >= 2 (see :func:`agm_fast.fusion.per_modality_logits`).
        labels: ``[B]`` int64 class indices on the logits' device.
        alpha: modulation strength >= 0 (CREMA-D 0.8, VGGSound 0.1).
        continuous: use ``relu(rho - 1)``, continuous at ``rho = 1`` (the reference before May 2022).
        process_group: under data parallelism, the group of ranks that share the batch (e.g.
            ``torch.distributed.group.WORLD``): the score sums are all-reduced (M numbers,
            :func:`agm_fast.distributed.global_sums`), so every rank gets the scores and coefficients of the global
            batch, also for unequal local batches. None (the default), a group of one rank or no initialised
            ``torch.distributed``: nothing is communicated. Unlike the classes, an op never reduces over the default
            group unasked.

    Returns:
        ``(scores [M], coeffs [M])``, float32, on the logits' device (under a process group: the global batch's).
    """
    check_per_modality_logits(logits)
    check_class_labels(labels, logits.shape[1], logits.shape[2], logits.device)
    alpha = check_alpha(alpha)
    continuous = bool(continuous)
    scores, coeffs = ogm_scores_op(logits.detach().contiguous(), labels.contiguous(), alpha, continuous)
    if process_group is None or not distributed.is_active(process_group):
        return scores, coeffs
    # The scores are sums over the batch: their sum over the ranks is the global batch's.
    scores = distributed.global_sums(scores, process_group)
    return scores, ogm_coefficients_torch(scores, alpha, continuous)
