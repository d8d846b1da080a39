"""Thin typed functions other libraries call: validate inputs (metadata only), then call the ops of :mod:`agm_fast.ops`.

Nothing here reads a tensor's values on the hot path. Label ranges are checked eagerly on CPU tensors only (on CUDA
an out-of-range label gives a NaN score; ``AGM_FAST_DEBUG=1`` adds a synchronous check).
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from . import reference as ref

__all__ = []


# OGM / OGM-GE: per-modality scores and coefficients


def _check_class_labels(labels: Tensor, batch: int, num_classes: int, device: torch.device, name: str = "labels"):
    """``labels`` must be ``[batch]`` int64 class indices on ``device``; values are checked on CPU (or in debug)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected a Tensor of int64 class indices, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name}: expected int64 class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [{batch}] (one class index per sample), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name}: on {labels.device}, but the logits are on {device}")
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    if labels.device.type == "cpu" or os.environ.get("AGM_FAST_DEBUG", "0") == "1":
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name}: expected class indices in [0, {num_classes}), got values in [{low}, {high}]")


def _check_ogm_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name}: expected a Tensor [M, B, C], got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{name}: expected per-modality logits [M, B, C], got shape {tuple(logits.shape)}")
    if logits.shape[0] < 2:
        raise ValueError(f"{name}: expected at least two modalities (M >= 2) for OGM, got M = {logits.shape[0]}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name}: expected a batch of at least one sample, got B = 0")
    if logits.shape[2] < 1:
        raise ValueError(f"{name}: expected at least one class, got C = {logits.shape[2]}")
    if not logits.is_floating_point():
        raise TypeError(f"{name}: expected floating-point logits, got {logits.dtype}")


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, Tensor) or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha: expected a Python float, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha: expected a finite value >= 0, got {alpha}")
    return float(alpha)


def ogm_scores(logits: Tensor, labels: Tensor, alpha: float, continuous: bool = False) -> Tuple[Tensor, Tensor]:
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

    Returns:
        ``(scores [M], coeffs [M])``, float32, on the logits' device.
    """
    _check_ogm_logits(logits)
    _check_class_labels(labels, logits.shape[1], logits.shape[2], logits.device)
    alpha = _check_alpha(alpha)
    return ops.ogm_scores(logits.detach().contiguous(), labels.contiguous(), alpha, bool(continuous))


__all__ += ["ogm_scores"]


# AGM: the stacked subset batch, the Shapley step (scores, running means, coefficients) and the loss logits


def _check_float_tensor(t: Tensor, name: str, shape: str, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor {shape}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the subset logits are on {device}")


def _check_subset_logits(F: Tensor, W: Tensor) -> Tuple[int, int]:
    """``F [S, B, C]`` floating logits and ``W [M, S]`` weights on F's device, M >= 2; returns ``(M, S)``."""
    if not isinstance(F, Tensor):
        raise TypeError(f"F: expected a Tensor [S, B, C] of subset logits, got {type(F).__name__}")
    if F.dim() != 3:
        raise ValueError(f"F: expected subset logits [S, B, C], got shape {tuple(F.shape)}")
    if not F.is_floating_point():
        raise TypeError(f"F: expected floating-point logits, got {F.dtype}")
    if F.shape[0] < 1 or F.shape[1] < 1 or F.shape[2] < 1:
        raise ValueError(f"F: expected at least one subset, sample and class, got shape {tuple(F.shape)}")
    _check_float_tensor(W, "W", "[M, S]", F.device)
    if W.dim() != 2 or W.shape[1] != F.shape[0]:
        raise ValueError(f"W: expected Shapley weights [M, {F.shape[0]}] (one column per subset), got {tuple(W.shape)}")
    if W.shape[0] < 2:
        raise ValueError(f"W: expected at least two modalities (M >= 2) for AGM, got M = {W.shape[0]}")
    return W.shape[0], W.shape[1]


def subset_batch(x: Tensor, mute: Optional[Tensor], masks: Sequence[int], modality: int) -> Tensor:
    """One modality's stacked subset batch: ``x`` once per subset, or its muted value where the subset mutes it.

    Differentiable with respect to ``x`` and ``mute``; the backward sums over subsets (and the batch, for ``mute``).

    Args:
        x: ``[B, ...]`` the modality's inputs or features.
        mute: ``x.shape[1:]`` muted value (one sample, broadcast over the batch), or None for zeros.
        masks: S subset bitmasks (bit ``modality`` set = the modality is present), e.g.
            :func:`agm_fast.reference.subset_masks`.
        modality: the modality's index m (its bit in the masks).

    Returns:
        ``[S * B, ...]`` in x's dtype: block s is ``x`` when bit ``modality`` of ``masks[s]`` is set, else the muted
        value.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor [B, ...], got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x: expected a batch [B, ...], got a 0-d tensor")
    if isinstance(modality, bool) or not isinstance(modality, int) or modality < 0:
        raise TypeError(f"modality: expected a non-negative int, got {modality!r}")
    masks = list(masks)
    if not masks or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in masks):
        raise ValueError(f"masks: expected a non-empty list of non-negative int bitmasks, got {masks!r}")
    if mute is not None:
        if not isinstance(mute, Tensor):
            raise TypeError(f"mute: expected a Tensor {tuple(x.shape[1:])} or None, got {type(mute).__name__}")
        if mute.device != x.device:
            raise ValueError(f"mute: on {mute.device}, but x is on {x.device}")
        if tuple(mute.shape) != tuple(x.shape[1:]):
            raise ValueError(f"mute: expected one sample of x, shape {tuple(x.shape[1:])}, got {tuple(mute.shape)}")
    return ops.subset_batch(x, mute, masks, modality)


def shapley_scores(
    F: Tensor,
    W: Tensor,
    labels: Tensor,
    running: Tensor,
    count: Tensor,
    prev_coeffs: Tensor,
    alpha: float,
    cap: Optional[float] = 10.0,
    in_window: bool = True,
    hold_last: bool = False,
    task: str = "classification",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The AGM step on stacked subset logits, on their device with no host synchronisation.

    The maths is in docs/methods.md, sections 1.3 and 1.4.

    ``psi[m] = sum_s W[m, s] F[s]``; ``s_m = mean_b -log(max(softmax(psi_m)[b, y_b], 1e-8))`` (regression: the mean
    squared error); ``c_m = exp(alpha * min(rbar_m - r_m, cap))`` with ``rbar`` from the running means before this
    step; the running means are updated with this step's scores. A step whose scores are not all finite leaves the
    running state unchanged. Gradients flow to ``F`` through ``psi``.

    Args:
        F: ``[S, B, C]`` subset logits in the column order of ``W``.
        W: ``[M, S]`` Shapley weights (:func:`agm_fast.reference.shapley_weights`), M >= 2, on F's device.
        labels: ``[B]`` int64 class indices; with ``task="regression"`` float targets ``[B]`` or ``[B, C]``.
        running: ``[M]`` running mean scores before this step.
        count: ``[]`` or ``[1]`` number of steps done before this one.
        prev_coeffs: ``[M]`` the last step's coefficients (returned outside the window with ``hold_last``).
        alpha: modulation strength >= 0 (AV-MNIST 2.5, CREMA-D 1.5, UR-Funny 4.0 / 6.0).
        cap: upper bound on ``rbar - r`` (default 10, as for CREMA-D), or None for no bound.
        in_window: whether this step lies in the modulation window (outside it the coefficients are 1).
        hold_last: outside the window, keep ``prev_coeffs`` (the reference behaviour) instead of 1.
        task: ``"classification"`` or ``"regression"``.

    Returns:
        ``(psi [M, B, C] in F's dtype, scores [M], running_new [M], count_new (count's shape), coeffs [M])``, the
        last four float32.
    """
    M, _ = _check_subset_logits(F, W)
    B, C = F.shape[1], F.shape[2]
    if task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    if task == "classification":
        _check_class_labels(labels, B, C, F.device)
    else:
        _check_float_tensor(labels, "labels", "[B] or [B, C] of regression targets", F.device)
        if tuple(labels.shape) not in ((B,), (B, C)):
            raise ValueError(f"labels: expected regression targets [{B}] or [{B}, {C}], got {tuple(labels.shape)}")
    for name, t in (("running", running), ("prev_coeffs", prev_coeffs)):
        _check_float_tensor(t, name, f"[{M}]", F.device)
        if tuple(t.shape) != (M,):
            raise ValueError(f"{name}: expected shape [{M}] (one value per modality), got {tuple(t.shape)}")
    _check_float_tensor(count, "count", "[] or [1]", F.device)
    if tuple(count.shape) not in ((), (1,)):
        raise ValueError(f"count: expected a step count of shape [] or [1], got {tuple(count.shape)}")
    alpha = _check_alpha(alpha)
    if cap is not None:
        if isinstance(cap, (Tensor, bool)) or not isinstance(cap, (int, float)):
            raise TypeError(f"cap: expected a Python float or None, got {type(cap).__name__}")
        if math.isnan(cap):
            raise ValueError("cap: expected a number or None, got NaN")
        cap = float(cap)
    return ops.shapley_scores(
        F, W, labels, running, count, prev_coeffs, alpha, cap, bool(in_window), bool(hold_last), task == "regression"
    )


def shapley_combine(F: Tensor, W: Tensor, coeffs: Tensor, full_index: int) -> Tensor:
    """AGM loss logits: value ``F[full_index]`` (the full pass), gradient routed through the scaled mono-modal outputs.

    ``out = sum_m c_m psi_m + stopgrad(f(A) - sum_m c_m psi_m)``, so ``dF[s] = (sum_m c_m W[m, s]) g``
    (docs/methods.md, section 1.5).

    Args:
        F: ``[S, B, C]`` subset logits.
        W: ``[M, S]`` Shapley weights on F's device.
        coeffs: ``[M]`` coefficients (constants: no gradient reaches them).
        full_index: the row of F that holds the full set (negative values count from the end).

    Returns:
        ``[B, C]`` in F's dtype.
    """
    M, S = _check_subset_logits(F, W)
    _check_float_tensor(coeffs, "coeffs", f"[{M}]", F.device)
    if tuple(coeffs.shape) != (M,):
        raise ValueError(f"coeffs: expected shape [{M}] (one coefficient per modality), got {tuple(coeffs.shape)}")
    if isinstance(full_index, bool) or not isinstance(full_index, int) or not -S <= full_index < S:
        raise ValueError(f"full_index: expected an int row of F in [-{S}, {S}), got {full_index!r}")
    return ops.shapley_combine(F, W, coeffs.detach(), full_index % S)


__all__ += ["subset_batch", "shapley_scores", "shapley_combine"]


# AGM (stateless): Shapley subsets and weights, mono-modal outputs, scores and the coefficient update


def _agm_check_target(
    labels: Tensor,
    batch: int,
    num_classes: Optional[int],
    task: str,
    device: Optional[torch.device],
    name: str = "target",
) -> None:
    """AGM targets: ``[B]`` int64 class indices, or ``[B]`` / ``[B, C]`` float regression targets.

    With ``num_classes`` and ``device`` None only the dtype and batch size are checked (before the model runs);
    with both given the check is complete, including the value range on CPU tensors.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected a Tensor [{batch}], got {type(labels).__name__}")
    if task == "classification":
        if num_classes is not None and device is not None:
            _check_class_labels(labels, batch, num_classes, device, name)
            return
        if labels.dtype != torch.int64:
            raise TypeError(f"{name}: expected int64 class indices, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(f"{name}: expected shape [{batch}] (one class index per sample), got {list(labels.shape)}")
        return
    if not labels.is_floating_point():
        raise TypeError(f"{name}: expected floating-point regression targets, got {labels.dtype}")
    if labels.dim() not in (1, 2) or labels.shape[0] != batch:
        raise ValueError(f"{name}: expected regression targets [{batch}] or [{batch}, C], got {tuple(labels.shape)}")
    if num_classes is not None and labels.dim() == 2 and labels.shape[1] != num_classes:
        raise ValueError(f"{name}: expected regression targets [{batch}] or [{batch}, {num_classes}], "
                         f"got {tuple(labels.shape)}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name}: on {labels.device}, but the logits are on {device}")


def _agm_check_modalities(num_modalities: int, shapley: str) -> int:
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, int):
        raise TypeError(f"num_modalities: expected an int, got {type(num_modalities).__name__}")
    if num_modalities < 2:
        raise ValueError(f"num_modalities: AGM needs at least two modalities (M >= 2), got {num_modalities}")
    if shapley != "sampled" and num_modalities > ref.MAX_EXACT_MODALITIES:
        raise ValueError(
            f"num_modalities: shapley={shapley!r} evaluates all 2^M subsets and supports M <= "
            f"{ref.MAX_EXACT_MODALITIES}, got M = {num_modalities}; use shapley='sampled'"
        )
    return num_modalities


def shapley_subsets(
    num_modalities: int,
    shapley: str = "reference",
    *,
    num_permutations: int = 16,
    generator: Optional[torch.Generator] = None,
) -> Tuple[List[int], Tensor]:
    """The subsets whose outputs a Shapley variant needs, and its weight matrix (docs/methods.md, section 1.3).

    Args:
        num_modalities: M >= 2 (at most 8 for ``"reference"`` and ``"exact"``).
        shapley: ``"reference"`` (psi: every non-empty subset; ``sum_m psi_m = f(A)``), ``"exact"`` (phi: all 2^M
            subsets, the empty one included) or ``"sampled"`` (a permutation-sampling estimate of psi).
        num_permutations: permutations drawn for ``"sampled"`` (default 16).
        generator: CPU generator that draws the permutations (default: torch's global one).

    Returns:
        ``(masks, W)``: int bitmasks in ascending order (the full set last) and ``W [M, len(masks)]`` float32 on
        the CPU, so that ``psi = shapley_outputs(F, W)`` for ``F[s] = f(masks[s])``.
    """
    if shapley not in ("reference", "exact", "sampled"):
        raise ValueError(f"shapley: expected 'reference', 'exact' or 'sampled', got {shapley!r}")
    M = _agm_check_modalities(num_modalities, shapley)
    if shapley == "sampled":
        if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or num_permutations < 1:
            raise ValueError(f"num_permutations: expected a positive int, got {num_permutations!r}")
        masks, W = ref.sampled_shapley_weights(M, num_permutations, generator)
        return masks, W.to(torch.float32)
    masks = ref.subset_masks(M, shapley)
    return masks, ref.shapley_weights(M, masks, torch.float32)


def shapley_outputs(
    F: Tensor,
    W: Optional[Tensor] = None,
    *,
    masks: Optional[Sequence[int]] = None,
    num_modalities: Optional[int] = None,
) -> Tensor:
    """Mono-modal outputs from stacked subset logits: ``psi[m] = sum_s W[m, s] F[s]`` (differentiable).

    Give either ``W`` or (``masks``, ``num_modalities``): with masks, the exact Shapley weights over them are used,
    and the masks must be every non-empty subset (psi, the reference variant) or every subset (phi), in any order.

    Args:
        F: ``[S, B, C]`` subset logits, row s holding f(masks[s]).
        W: ``[M, S]`` weights on F's device (:func:`shapley_subsets`).
        masks: the S subset bitmasks of F's rows.
        num_modalities: M.

    Returns:
        ``[M, B, C]`` in F's dtype (accumulated in float32).
    """
    if W is None:
        if masks is None or num_modalities is None:
            raise ValueError("shapley_outputs: give W, or masks= and num_modalities=")
        M = _agm_check_modalities(num_modalities, "exact")
        masks = list(masks)
        if sorted(masks) not in (ref.subset_masks(M, "reference"), ref.subset_masks(M, "exact")):
            raise ValueError(
                f"masks: expected every non-empty subset of {M} modalities (psi) or every subset (phi), "
                f"each once; got {masks}"
            )
        if not isinstance(F, Tensor):
            raise TypeError(f"F: expected a Tensor [S, B, C] of subset logits, got {type(F).__name__}")
        W = ref.shapley_weights(M, masks, torch.float32).to(F.device)
    _check_subset_logits(F, W)
    return ref.shapley_ref(F, W)


def agm_scores(psi: Tensor, labels: Tensor, task: str = "classification") -> Tensor:
    """Per-modality AGM scores of one batch (docs/methods.md, section 1.4).

    Classification: ``s_m = mean_b -log(max(softmax(psi_m)[b, y_b], 1e-8))``; regression (beyond the reference):
    ``s_m = mean((psi_m - y)^2)``. Non-finite outputs give a NaN score.

    Args:
        psi: ``[M, B, C]`` mono-modal outputs, M >= 2.
        labels: ``[B]`` int64 class indices, or ``[B]`` / ``[B, C]`` float targets for regression.
        task: ``"classification"`` (default) or ``"regression"``.

    Returns:
        ``[M]`` float32.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    if not isinstance(psi, Tensor):
        raise TypeError(f"psi: expected a Tensor [M, B, C], got {type(psi).__name__}")
    if psi.dim() != 3 or psi.shape[0] < 2:
        raise ValueError(f"psi: expected mono-modal outputs [M, B, C] with M >= 2, got shape {tuple(psi.shape)}")
    if not psi.is_floating_point():
        raise TypeError(f"psi: expected floating-point outputs, got {psi.dtype}")
    _agm_check_target(labels, psi.shape[1], psi.shape[2], task, psi.device, name="labels")
    return ref.agm_scores_ref(psi, labels, task)


def agm_coefficients(
    scores: Tensor,
    running: Tensor,
    count: Tensor,
    prev_coeffs: Optional[Tensor] = None,
    *,
    alpha: float,
    cap: Optional[float] = 10.0,
    in_window: bool = True,
    hold_last: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """AGM coefficients of one step and the running-mean update (docs/methods.md, section 1.4).

    ``r_m = exp(mean_{j!=m} s_j - s_m)``, ``rbar_m`` the same on the running means before this step,
    ``c_m = exp(alpha * min(rbar_m - r_m, cap))``; outside the window 1 (``hold_last``: ``prev_coeffs``). Then
    ``S <- S t/(t+1) + s/(t+1)``, ``t <- t+1``; non-finite scores give NaN coefficients and leave S and t unchanged.

    Args:
        scores: ``[M]`` this step's scores, M >= 2.
        running: ``[M]`` running means before this step.
        count: ``[]`` or ``[1]`` steps counted before this one.
        prev_coeffs: ``[M]`` the last coefficients (default ones).
        alpha: modulation strength >= 0.
        cap: upper bound on ``rbar - r`` (default 10.0), or None.
        in_window: whether this step is in the modulation window.
        hold_last: outside the window keep ``prev_coeffs`` (the reference) instead of 1.

    Returns:
        ``(running_new [M], count_new (count's shape), coeffs [M])``, float32.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] < 2:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a tensor [M] with M >= 2, got {got}")
    M = scores.shape[0]
    if prev_coeffs is None:
        prev_coeffs = torch.ones(M, dtype=torch.float32, device=scores.device)
    _check_float_tensor(scores, "scores", f"[{M}]", scores.device)
    for name, t in (("running", running), ("prev_coeffs", prev_coeffs)):
        _check_float_tensor(t, name, f"[{M}]", scores.device)
        if tuple(t.shape) != (M,):
            raise ValueError(f"{name}: expected shape [{M}] (one value per modality), got {tuple(t.shape)}")
    _check_float_tensor(count, "count", "[] or [1]", scores.device)
    if tuple(count.shape) not in ((), (1,)):
        raise ValueError(f"count: expected a step count of shape [] or [1], got {tuple(count.shape)}")
    alpha = _check_alpha(alpha)
    if cap is not None:
        if isinstance(cap, (Tensor, bool)) or not isinstance(cap, (int, float)) or math.isnan(cap):
            raise TypeError(f"cap: expected a Python float or None, got {cap!r}")
        cap = float(cap)
    running_new, count_new, coeffs = ref.agm_coefficients_ref(
        scores, running, count, prev_coeffs, alpha, cap, bool(in_window), bool(hold_last)
    )
    return running_new, count_new.reshape(count.shape), coeffs


__all__ += ["shapley_subsets", "shapley_outputs", "agm_scores", "agm_coefficients"]


# OGM-GE: in-place noisy gradient scaling over a list of gradient tensors


def _check_key_int(value, name: str) -> int:
    if isinstance(value, (bool, Tensor)) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name}: expected an int in [0, 2^63), got {value}")
    return value


def ogm_ge_(
    grads: Sequence[Tensor],
    group: Sequence[int],
    coeffs: Tensor,
    noise: bool = True,
    seed: int = 0,
    offset: int = 0,
    starts: Optional[Sequence[int]] = None,
    sigma: Optional[Tensor] = None,
) -> None:
    """OGM / OGM-GE gradient update, in place, between ``backward()`` and ``optimizer.step()``.

    For tensor i of modality ``m = group[i]``: ``g <- coeffs[m] * g`` (OGM), plus ``sigma * z`` with noise (OGM-GE),
    where ``sigma = std_unbiased(g before scaling) + 1e-8`` (std 0 for a one-element tensor) and ``z`` standard
    normal noise from Philox4x32-10 keyed on ``(seed, offset, i, element index)``: the same key gives the same noise
    on every device and every data-parallel replica (see :func:`agm_fast.reference.philox_normal_ref`). The
    coefficients are read from device memory; nothing synchronises with the host. Runs the compiled extension when
    it is built, else the pure-PyTorch reference (``AGM_FAST_BACKEND=torch|ext`` forces one).

    Args:
        grads: contiguous float32 / float16 / bfloat16 tensors (e.g. ``p.grad``) on one device, not overlapping in
            memory; statistics are accumulated in float32 whatever their dtype.
        group: ``len(grads)`` modality indices (ints >= 0), one per tensor.
        coeffs: ``[M]`` float32 coefficients on the grads' device, ``M = max(group) + 1``.
        noise: add the Gaussian noise (OGM-GE, default) or only scale (OGM).
        seed: noise seed in [0, 2^63). Default 0.
        offset: noise offset in [0, 2^63); advance it every step for fresh noise. Default 0.
        starts: for shards of larger tensors (FSDP), the global index of each tensor's first element: element j then
            draws the noise of element ``starts[i] + j``, bitwise the slice of the whole tensor's noise. Empty
            tensors (empty shards) are allowed and keep their index. Default: every tensor is whole.
        sigma: ``[len(grads)]`` float32 stds on the grads' device to use instead of computing each tensor's (a
            shard's std must be the whole tensor's: :func:`agm_fast.distributed.sharded_std`). Default: computed.

    Returns:
        None; ``grads`` are modified in place.
    """
    if isinstance(grads, Tensor) or not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads: expected a list of gradient tensors, got {type(grads).__name__}")
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(
                f"grads[{i}]: expected a Tensor, got {type(g).__name__} (a parameter without a gradient?)"
            )
    if isinstance(group, Tensor):
        if group.device.type != "cpu" or group.dim() != 1 or group.is_floating_point():
            raise TypeError("group: expected a list of ints or a 1-D integer CPU tensor")
        group = group.tolist()
    if not isinstance(group, (list, tuple)):
        raise TypeError(f"group: expected a list of modality indices, got {type(group).__name__}")
    for i, m in enumerate(group):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"group[{i}]: expected an int modality index, got {type(m).__name__}")
    if not isinstance(coeffs, Tensor):
        raise TypeError(f"coeffs: expected a float32 tensor [M], got {type(coeffs).__name__}")
    if not isinstance(noise, bool):
        raise TypeError(f"noise: expected a bool, got {type(noise).__name__}")
    seed = _check_key_int(seed, "seed")
    offset = _check_key_int(offset, "offset")
    if starts is not None:
        if isinstance(starts, (str, bytes)) or not isinstance(starts, Sequence):
            raise TypeError(f"starts: expected a list of element offsets, got {type(starts).__name__}")
        starts = [_check_key_int(v, f"starts[{i}]") for i, v in enumerate(starts)]
    if sigma is not None and not isinstance(sigma, Tensor):
        raise TypeError(f"sigma: expected a float32 tensor [len(grads)], got {type(sigma).__name__}")
    grads, group = list(grads), list(group)
    ops._ogm_ge_check(grads, group, coeffs, starts, sigma)
    ops.ogm_ge_(grads, group, coeffs, noise, seed, offset, starts, sigma)


__all__ += ["ogm_ge_"]
