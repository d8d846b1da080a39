"""The AGM step's ops on stacked subset logits ``F [S, B, C]``: ``shapley_scores`` (mono-modal outputs, scores,
running means and coefficients in one pass) and ``shapley_combine`` (the loss logits whose gradient is modulated).

Each custom op (Triton on CUDA, the ``*_torch`` functions elsewhere) has its fake and its backward op; the validated
public functions are :func:`shapley_scores`, :func:`shapley_combine`, :func:`shapley_subsets`,
:func:`shapley_outputs`, :func:`agm_scores` and :func:`agm_coefficients` (docs/methods.md, sections 1.3 to 1.5).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend, distributed
from .._validate import check_alpha, check_class_labels, check_float_tensor, check_target
from ..coalitions import check_modalities, mean_of_others, sampled_shapley_weights, shapley_weights, subset_masks

__all__ = [
    "LOG_PROB_FLOOR",
    "agm_coefficients",
    "agm_coefficients_torch",
    "agm_scores",
    "agm_scores_torch",
    "check_subset_logits",
    "shapley_bwd_op",
    "shapley_combine",
    "shapley_combine_bwd_op",
    "shapley_combine_op",
    "shapley_combine_torch",
    "shapley_outputs",
    "shapley_outputs_torch",
    "shapley_scores",
    "shapley_scores_op",
    "shapley_scores_torch",
    "shapley_subsets",
]

# The reference clamps the softmax probability at 1e-8 before the log.
LOG_PROB_FLOOR = math.log(1e-8)


def _task(regression: bool) -> str:
    return "regression" if regression else "classification"


def shapley_outputs_torch(F: Tensor, W: Tensor) -> Tensor:
    """Mono-modal outputs ``psi[m] = sum_s W[m, s] F[s]``, accumulated in float32.

    Args:
        F: ``[S, B, C]`` subset logits (any float dtype).
        W: ``[M, S]`` weights.

    Returns:
        ``[M, B, C]`` in F's dtype.
    """
    S, B, C = F.shape
    # One matrix product on [S, B*C] (what the einsum lowers to, without its permutes and views).
    return (W.to(torch.float32) @ F.to(torch.float32).reshape(S, B * C)).reshape(-1, B, C).to(F.dtype)


def agm_scores_torch(psi: Tensor, labels: Tensor, task: str = "classification") -> Tensor:
    """Per-modality batch scores of AGM.

    Classification: ``s_m = mean_b -log(max(softmax(psi_m)[b, y_b], 1e-8))``. Regression (beyond the reference):
    ``s_m = mean((psi_m - y)^2)``. A modality whose outputs hold a non-finite value gets a NaN score.

    Args:
        psi: ``[M, B, C]`` mono-modal outputs.
        labels: ``[B]`` int64 class indices (classification) or ``[B]`` / ``[B, C]`` float targets (regression).
        task: ``"classification"`` or ``"regression"``.

    Returns:
        ``[M]`` float32 scores.
    """
    x = psi.to(torch.float32)
    if task == "regression":
        y = labels.to(torch.float32).reshape(1, x.shape[1], -1).expand_as(x)
        return ((x - y) ** 2).mean(dim=(1, 2))
    logp = torch.log_softmax(x, dim=-1)
    idx = labels.view(1, -1, 1).expand(x.shape[0], -1, 1)
    at_label = logp.gather(-1, idx).squeeze(-1)
    # NaN for a row with any non-finite logit (x - x is 0 for finite x), as softmax would give.
    poison = (x - x).sum(-1)
    return (-torch.clamp(at_label, min=LOG_PROB_FLOOR) + poison).mean(dim=1)


def agm_coefficients_torch(
    scores: Tensor,
    running: Tensor,
    count: Tensor,
    prev_coeffs: Tensor,
    alpha: float,
    cap: Optional[float],
    in_window: bool,
    hold_last: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """AGM coefficients and the running-mean update of one step.

    ``r_m = exp(mean_{j!=m} s_j - s_m)``, ``rbar_m`` the same on the running means S (before this step's update),
    ``c_m = exp(alpha * min(rbar_m - r_m, cap))``; outside the window ``c = 1`` (or the previous coefficients with
    ``hold_last``, the reference behaviour). ``S <- S t/(t+1) + s/(t+1)``, ``t <- t+1``, every step; a step whose
    scores are not all finite leaves S and t unchanged (its coefficients are NaN, so an AMP step that is skipped
    leaves the state as it was).

    Args:
        scores: ``[M]`` this step's scores.
        running: ``[M]`` running means S before this step.
        count: ``[]`` or ``[1]`` steps done before this one (t), float32.
        prev_coeffs: ``[M]`` the last step's coefficients (used with ``hold_last``).
        alpha: the modulation strength.
        cap: upper bound on ``rbar - r``, or None.
        in_window: whether this step lies in the modulation window.
        hold_last: outside the window, keep ``prev_coeffs`` instead of 1.

    Returns:
        ``(running_new [M], count_new (count's shape), coeffs [M])``, float32.
    """
    s = scores.to(torch.float32)
    S = running.to(torch.float32)
    others = mean_of_others(s)
    others_run = mean_of_others(S)
    diff = torch.exp(others_run - S) - torch.exp(others - s)
    if cap is not None:
        diff = torch.clamp(diff, max=cap)
    coeffs = torch.exp(alpha * diff)
    if not in_window:
        coeffs = prev_coeffs.to(torch.float32).clone() if hold_last else torch.ones_like(coeffs)
        coeffs = torch.where(torch.isfinite(s).all(), coeffs, torch.full_like(coeffs, float("nan")))
    t = count.to(torch.float32)
    new_running = S * (t / (t + 1)) + s / (t + 1)
    ok = torch.isfinite(s).all()
    running_new = torch.where(ok, new_running, S)
    count_new = torch.where(ok, t + 1, t)
    return running_new, count_new, coeffs


def shapley_scores_torch(
    F: Tensor,
    W: Tensor,
    labels: Tensor,
    running: Tensor,
    count: Tensor,
    prev_coeffs: Tensor,
    alpha: float,
    cap: Optional[float],
    in_window: bool,
    hold_last: bool = False,
    task: str = "classification",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole AGM step on subset logits: mono-modal outputs, scores, running means and coefficients.

    Args:
        F: ``[S, B, C]`` subset logits.
        W: ``[M, S]`` Shapley weights (:func:`agm_fast.coalitions.shapley_weights`).
        labels, task: as :func:`agm_scores_torch`.
        running, count, prev_coeffs, alpha, cap, in_window, hold_last: as :func:`agm_coefficients_torch`.

    Returns:
        ``(psi [M, B, C] in F's dtype, scores [M], running_new [M], count_new, coeffs [M])``.
    """
    psi = shapley_outputs_torch(F, W)
    scores = agm_scores_torch(psi, labels, task)
    running_new, count_new, coeffs = agm_coefficients_torch(
        scores, running, count, prev_coeffs, alpha, cap, in_window, hold_last
    )
    return psi, scores, running_new, count_new, coeffs


def shapley_combine_torch(F: Tensor, W: Tensor, coeffs: Tensor, full_index: int) -> Tensor:
    """Loss logits of AGM: value ``f(A) = F[full_index]``, gradient routed through the scaled mono-modal outputs.

    ``out = sum_m c_m psi_m + stopgrad(f(A) - sum_m c_m psi_m)``, so ``dF[s] = (sum_m c_m W[m, s]) * g``.

    Args:
        F: ``[S, B, C]`` subset logits.
        W: ``[M, S]`` Shapley weights.
        coeffs: ``[M]`` coefficients (treated as constants).
        full_index: the row of F that holds the full set.

    Returns:
        ``[B, C]`` in F's dtype.
    """
    v = (coeffs.detach().to(torch.float32) @ W.to(torch.float32)).to(F.dtype)
    scaled = torch.einsum("s,sbc->bc", v, F)
    return scaled + (F[full_index] - scaled).detach()


@torch.library.custom_op("agm_fast::shapley_scores", mutates_args=())
def shapley_scores_op(
    F: Tensor,
    W: Tensor,
    labels: Tensor,
    running: Tensor,
    count: Tensor,
    prev_coeffs: Tensor,
    alpha: float,
    cap: Optional[float],
    in_window: bool,
    hold_last: bool,
    regression: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`shapley_scores_torch`. Returns ``(psi, scores, running_new, count_new, coeffs)``."""
    return scores_impl(F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression)


def scores_impl(F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression):
    """The body of :func:`shapley_scores_op`: Triton on CUDA, the extension's C++ kernel on CPU (float32 and float64
    logits), the torch functions otherwise."""
    on_cpu = F.device.type == "cpu"
    backend = _backend.select(F.device, ("torch", "triton", "ext") if on_cpu else ("torch", "triton"))
    if backend == "triton":
        from agm_fast.kernels import shapley as k

        return k.shapley_scores_fwd(
            F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression
        )
    if backend == "ext" and F.dtype in (torch.float32, torch.float64):
        return torch.ops.agm_fast._shapley_scores_impl(
            F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression
        )
    psi, scores, running_new, count_new, coeffs = shapley_scores_torch(
        F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, _task(regression)
    )
    return psi.contiguous(), scores, running_new, count_new.reshape(count.shape), coeffs


@shapley_scores_op.register_fake
def _(F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression):
    M = W.shape[0]
    f32 = dict(dtype=torch.float32, device=F.device)
    return (
        F.new_empty((M, F.shape[1], F.shape[2])),
        torch.empty((M,), **f32),
        torch.empty((M,), **f32),
        torch.empty(tuple(count.shape), **f32),
        torch.empty((M,), **f32),
    )


@torch.library.custom_op("agm_fast::shapley_bwd", mutates_args=())
def shapley_bwd_op(dpsi: Tensor, W: Tensor, dtype_like: Tensor) -> Tensor:
    """Backward of the Shapley combination: ``dF[s] = sum_m W[m, s] dpsi[m]``, in ``dtype_like``'s dtype."""
    return scores_bwd_impl(dpsi, W, dtype_like.dtype)


def scores_bwd_impl(dpsi: Tensor, W: Tensor, dtype: torch.dtype) -> Tensor:
    """The body of :func:`shapley_bwd_op`."""
    if _backend.select(dpsi.device) == "triton":
        from agm_fast.kernels import shapley as k

        return k.shapley_bwd(dpsi, W, dtype)
    M, B, C = dpsi.shape
    return (W.to(torch.float32).t() @ dpsi.to(torch.float32).reshape(M, B * C)).reshape(-1, B, C).to(dtype)


@shapley_bwd_op.register_fake
def _(dpsi, W, dtype_like):
    return dpsi.new_empty((W.shape[1], dpsi.shape[1], dpsi.shape[2]), dtype=dtype_like.dtype)


def _shapley_scores_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.F_meta = inputs[0].new_empty((0,))


def _shapley_scores_backward(ctx, dpsi, dscores, drunning, dcount, dcoeffs):
    (W,) = ctx.saved_tensors
    if dpsi is None:
        return (None,) * 11
    dF = shapley_bwd_op(dpsi.contiguous(), W, ctx.F_meta)
    return (dF,) + (None,) * 10


shapley_scores_op.register_autograd(_shapley_scores_backward, setup_context=_shapley_scores_setup)


# shapley_combine_op: the loss logits f(A) whose gradient reaches F through the scaled mono-modal outputs
@torch.library.custom_op("agm_fast::shapley_combine", mutates_args=())
def shapley_combine_op(F: Tensor, W: Tensor, coeffs: Tensor, full_index: int) -> Tensor:
    """Value ``F[full_index]``; gradient ``dF[s] = (sum_m coeffs[m] W[m, s]) g`` (see :func:`shapley_combine_torch`)."""
    return F[full_index].clone()


@shapley_combine_op.register_fake
def _(F, W, coeffs, full_index):
    return F.new_empty(tuple(F.shape[1:]))


@torch.library.custom_op("agm_fast::shapley_combine_bwd", mutates_args=())
def shapley_combine_bwd_op(g: Tensor, W: Tensor, coeffs: Tensor) -> Tensor:
    """``dF [S, B, C] = (coeffs @ W)[s] * g``, computed in float32 and returned in g's dtype."""
    return combine_bwd_impl(g, W, coeffs)


def combine_bwd_impl(g: Tensor, W: Tensor, coeffs: Tensor) -> Tensor:
    """The body of :func:`shapley_combine_bwd_op`."""
    if _backend.select(g.device) == "triton":
        from agm_fast.kernels import shapley as k

        return k.shapley_combine_bwd(g, W, coeffs)
    v = coeffs.to(torch.float32) @ W.to(torch.float32)
    return (v.view(-1, 1, 1) * g.to(torch.float32).unsqueeze(0)).to(g.dtype)


@shapley_combine_bwd_op.register_fake
def _(g, W, coeffs):
    return g.new_empty((W.shape[1],) + tuple(g.shape))


def _shapley_combine_setup(ctx, inputs, output):
    F, W, coeffs, full_index = inputs
    ctx.save_for_backward(W, coeffs)


def _shapley_combine_backward(ctx, g):
    W, coeffs = ctx.saved_tensors
    return shapley_combine_bwd_op(g.contiguous(), W, coeffs), None, None, None


shapley_combine_op.register_autograd(_shapley_combine_backward, setup_context=_shapley_combine_setup)


def check_subset_logits(F: Tensor, W: Tensor) -> Tuple[int, int]:
    """``F [S, B, C]`` floating logits and ``W [M, S]`` weights on F's device, M >= 2; returns ``(M, S)``."""
    if not isinstance(F, Tensor):
        raise TypeError(f"F: expected a Tensor [S, B, C] of subset logits, got {type(F).__name__}")
    if F.dim() != 3:
        raise ValueError(f"F: expected subset logits [S, B, C], got shape {tuple(F.shape)}")
    if not F.is_floating_point():
        raise TypeError(f"F: expected floating-point logits, got {F.dtype}")
    if F.shape[0] < 1 or F.shape[1] < 1 or F.shape[2] < 1:
        raise ValueError(f"F: expected at least one subset, sample and class, got shape {tuple(F.shape)}")
    check_float_tensor(W, "W", "[M, S]", F.device)
    if W.dim() != 2 or W.shape[1] != F.shape[0]:
        raise ValueError(f"W: expected Shapley weights [M, {F.shape[0]}] (one column per subset), got {tuple(W.shape)}")
    if W.shape[0] < 2:
        raise ValueError(f"W: expected at least two modalities (M >= 2) for AGM, got M = {W.shape[0]}")
    return W.shape[0], W.shape[1]


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
    process_group=None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The AGM step on stacked subset logits, on their device with no host synchronisation.

    The maths is in docs/methods.md, sections 1.3 and 1.4.

    ``psi[m] = sum_s W[m, s] F[s]``; ``s_m = mean_b -log(max(softmax(psi_m)[b, y_b], 1e-8))`` (regression: the mean
    squared error); ``c_m = exp(alpha * min(rbar_m - r_m, cap))`` with ``rbar`` from the running means before this
    step; the running means are updated with this step's scores. A step whose scores are not all finite leaves the
    running state unchanged. Gradients flow to ``F`` through ``psi``.

    Args:
        F: ``[S, B, C]`` subset logits in the column order of ``W``.
        W: ``[M, S]`` Shapley weights (:func:`agm_fast.coalitions.shapley_weights`), M >= 2, on F's device.
        labels: ``[B]`` int64 class indices; with ``task="regression"`` float targets ``[B]`` or ``[B, C]``.
        running: ``[M]`` running mean scores before this step.
        count: ``[]`` or ``[1]`` number of steps done before this one.
        prev_coeffs: ``[M]`` the last step's coefficients (returned outside the window with ``hold_last``).
        alpha: modulation strength >= 0 (AV-MNIST 2.5, CREMA-D 1.5, UR-Funny 4.0 / 6.0).
        cap: upper bound on ``rbar - r`` (default 10, as for CREMA-D), or None for no bound.
        in_window: whether this step lies in the modulation window (outside it the coefficients are 1).
        hold_last: outside the window, keep ``prev_coeffs`` (the reference behaviour) instead of 1.
        task: ``"classification"`` or ``"regression"``.
        process_group: under data parallelism, the group of ranks that share the batch (e.g.
            ``torch.distributed.group.WORLD``): this rank's score sums and sample count are all-reduced (one
            collective of 2M numbers, :func:`agm_fast.distributed.global_mean_scores`), so every rank gets the
            scores, running means and coefficients of the global batch, also for unequal local batches. None (the
            default), a group of one rank or no initialised ``torch.distributed``: nothing is communicated. Unlike
            the classes, an op never reduces over the default group unasked.

    Returns:
        ``(psi [M, B, C] in F's dtype, scores [M], running_new [M], count_new (count's shape), coeffs [M])``, the
        last four float32; under a process group the last four are the global batch's, the same on every rank.
    """
    M, _ = check_subset_logits(F, W)
    B, C = F.shape[1], F.shape[2]
    if task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    if task == "classification":
        check_class_labels(labels, B, C, F.device)
    else:
        check_float_tensor(labels, "labels", "[B] or [B, C] of regression targets", F.device)
        if tuple(labels.shape) not in ((B,), (B, C)):
            raise ValueError(f"labels: expected regression targets [{B}] or [{B}, {C}], got {tuple(labels.shape)}")
    for name, t in (("running", running), ("prev_coeffs", prev_coeffs)):
        check_float_tensor(t, name, f"[{M}]", F.device)
        if tuple(t.shape) != (M,):
            raise ValueError(f"{name}: expected shape [{M}] (one value per modality), got {tuple(t.shape)}")
    check_float_tensor(count, "count", "[] or [1]", F.device)
    if tuple(count.shape) not in ((), (1,)):
        raise ValueError(f"count: expected a step count of shape [] or [1], got {tuple(count.shape)}")
    alpha = check_alpha(alpha)
    if cap is not None:
        if isinstance(cap, (Tensor, bool)) or not isinstance(cap, (int, float)):
            raise TypeError(f"cap: expected a Python float or None, got {type(cap).__name__}")
        if math.isnan(cap):
            raise ValueError("cap: expected a number or None, got NaN")
        cap = float(cap)
    in_window, hold_last = bool(in_window), bool(hold_last)
    out = shapley_scores_op(F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last,
                            task == "regression")
    if process_group is None or not distributed.is_active(process_group):
        return out
    # The op's scores are this rank's batch means: one collective turns them into the global batch mean, and the
    # running means and coefficients follow from it (device arithmetic, as agm_fast.AGMCoefficients does).
    psi, scores = out[0], distributed.global_mean_scores(out[1].detach(), B, process_group)
    running_new, count_new, coeffs = agm_coefficients_torch(
        scores, running, count, prev_coeffs, alpha, cap, in_window, hold_last
    )
    return psi, scores, running_new, count_new.reshape(count.shape), coeffs


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
    M, S = check_subset_logits(F, W)
    check_float_tensor(coeffs, "coeffs", f"[{M}]", F.device)
    if tuple(coeffs.shape) != (M,):
        raise ValueError(f"coeffs: expected shape [{M}] (one coefficient per modality), got {tuple(coeffs.shape)}")
    if isinstance(full_index, bool) or not isinstance(full_index, int) or not -S <= full_index < S:
        raise ValueError(f"full_index: expected an int row of F in [-{S}, {S}), got {full_index!r}")
    return shapley_combine_op(F, W, coeffs.detach(), full_index % S)


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
    M = check_modalities(num_modalities, shapley)
    if shapley == "sampled":
        if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or num_permutations < 1:
            raise ValueError(f"num_permutations: expected a positive int, got {num_permutations!r}")
        masks, W = sampled_shapley_weights(M, num_permutations, generator)
        return masks, W.to(torch.float32)
    masks = subset_masks(M, shapley)
    return masks, shapley_weights(M, masks, torch.float32)


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
        M = check_modalities(num_modalities, "exact")
        masks = list(masks)
        if sorted(masks) not in (subset_masks(M, "reference"), subset_masks(M, "exact")):
            raise ValueError(
                f"masks: expected every non-empty subset of {M} modalities (psi) or every subset (phi), "
                f"each once; got {masks}"
            )
        if not isinstance(F, Tensor):
            raise TypeError(f"F: expected a Tensor [S, B, C] of subset logits, got {type(F).__name__}")
        W = shapley_weights(M, masks, torch.float32).to(F.device)
    check_subset_logits(F, W)
    return shapley_outputs_torch(F, W)


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
    check_target(labels, psi.shape[1], psi.shape[2], task, psi.device, name="labels")
    return agm_scores_torch(psi, labels, task)


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
    check_float_tensor(scores, "scores", f"[{M}]", scores.device)
    for name, t in (("running", running), ("prev_coeffs", prev_coeffs)):
        check_float_tensor(t, name, f"[{M}]", scores.device)
        if tuple(t.shape) != (M,):
            raise ValueError(f"{name}: expected shape [{M}] (one value per modality), got {tuple(t.shape)}")
    check_float_tensor(count, "count", "[] or [1]", scores.device)
    if tuple(count.shape) not in ((), (1,)):
        raise ValueError(f"count: expected a step count of shape [] or [1], got {tuple(count.shape)}")
    alpha = check_alpha(alpha)
    if cap is not None:
        if isinstance(cap, (Tensor, bool)) or not isinstance(cap, (int, float)) or math.isnan(cap):
            raise TypeError(f"cap: expected a Python float or None, got {cap!r}")
        cap = float(cap)
    running_new, count_new, coeffs = agm_coefficients_torch(
        scores, running, count, prev_coeffs, alpha, cap, bool(in_window), bool(hold_last)
    )
    return running_new, count_new.reshape(count.shape), coeffs
