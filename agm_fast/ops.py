"""Every ``torch.library`` custom op of agm_fast, with its fake (meta) implementation and its autograd.

Each op body picks the Triton kernels, the compiled extension or the reference via :mod:`agm_fast._backend`.
Inputs are assumed validated by :mod:`agm_fast.functional` (metadata checks only, so nothing here syncs).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _backend
from . import reference as ref

__all__ = [
    "subset_batch",
    "shapley_scores",
    "shapley_bwd",
    "shapley_combine",
    "shapley_combine_bwd",
    "ogm_scores",
    "ogm_ge_",
]


def _task(regression: bool) -> str:
    return "regression" if regression else "classification"


# subset_batch: the stacked batch of every needed subset for one modality
@torch.library.custom_op("agm_fast::subset_batch", mutates_args=())
def subset_batch(x: Tensor, mute: Optional[Tensor], masks: List[int], modality: int) -> Tensor:
    """Stack ``x [B, ...]`` once per subset in ``masks``: a copy where bit ``modality`` is set, else the muted
    value (``mute [...]`` broadcast over the batch, or zeros). Returns ``[len(masks) * B, ...]``."""
    if _backend.select(x.device) == "triton":
        from agm_fast.kernels import subset_batch as k

        return k.subset_batch_fwd(x, mute, masks, modality)
    return ref.subset_batch_ref([x], [(mask >> modality) & 1 for mask in masks], [mute])[0].contiguous()


@subset_batch.register_fake
def _(x, mute, masks, modality):
    return x.new_empty((len(masks) * x.shape[0],) + tuple(x.shape[1:]))


@torch.library.custom_op("agm_fast::subset_batch_bwd", mutates_args=())
def subset_batch_bwd(
    grad: Tensor, mute_shape: Optional[List[int]], masks: List[int], modality: int
) -> Tuple[Tensor, Tensor]:
    """Backward of :func:`subset_batch`: ``dx [B, ...]`` sums the gradient of the subsets that hold the modality;
    ``dmute [...]`` sums it over the subsets that mute it and over the batch (zeros when ``mute_shape`` is None)."""
    if _backend.select(grad.device) == "triton":
        from agm_fast.kernels import subset_batch as k

        return k.subset_batch_bwd(grad, mute_shape, masks, modality)
    S = len(masks)
    g = grad.reshape((S, grad.shape[0] // S) + tuple(grad.shape[1:])).to(torch.float32)
    bits = torch.tensor([(mask >> modality) & 1 for mask in masks], dtype=torch.float32)
    keep = _backend.to_device(bits, grad.device)
    view = (S,) + (1,) * (g.dim() - 1)
    dx = (g * keep.view(view)).sum(0).to(grad.dtype)
    if mute_shape is None:
        dmute = grad.new_zeros(())
    else:
        dmute = (g * (1 - keep).view(view)).sum((0, 1)).reshape(mute_shape).to(grad.dtype)
    return dx, dmute


@subset_batch_bwd.register_fake
def _(grad, mute_shape, masks, modality):
    S = len(masks)
    dx = grad.new_empty((grad.shape[0] // S,) + tuple(grad.shape[1:]))
    dmute = grad.new_empty(()) if mute_shape is None else grad.new_empty(tuple(mute_shape))
    return dx, dmute


def _subset_batch_setup(ctx, inputs, output):
    x, mute, masks, modality = inputs
    ctx.mute_shape = None if mute is None else list(mute.shape)
    ctx.masks = masks
    ctx.modality = modality


def _subset_batch_backward(ctx, grad):
    dx, dmute = subset_batch_bwd(grad.contiguous(), ctx.mute_shape, ctx.masks, ctx.modality)
    return dx, (None if ctx.mute_shape is None else dmute), None, None


subset_batch.register_autograd(_subset_batch_backward, setup_context=_subset_batch_setup)


# shapley_scores: psi, scores, running means and coefficients in one pass over the subset logits
@torch.library.custom_op("agm_fast::shapley_scores", mutates_args=())
def shapley_scores(
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
    """See :func:`agm_fast.reference.shapley_scores_ref`. Returns ``(psi, scores, running_new, count_new, coeffs)``."""
    if _backend.select(F.device) == "triton":
        from agm_fast.kernels import shapley as k

        return k.shapley_scores_fwd(
            F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression
        )
    psi, scores, running_new, count_new, coeffs = ref.shapley_scores_ref(
        F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, _task(regression)
    )
    return psi.contiguous(), scores, running_new, count_new.reshape(count.shape), coeffs


@shapley_scores.register_fake
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
def shapley_bwd(dpsi: Tensor, W: Tensor, dtype_like: Tensor) -> Tensor:
    """Backward of the Shapley combination: ``dF[s] = sum_m W[m, s] dpsi[m]``, in ``dtype_like``'s dtype."""
    if _backend.select(dpsi.device) == "triton":
        from agm_fast.kernels import shapley as k

        return k.shapley_bwd(dpsi, W, dtype_like.dtype)
    return torch.einsum("ms,mbc->sbc", W.to(torch.float32), dpsi.to(torch.float32)).to(dtype_like.dtype)


@shapley_bwd.register_fake
def _(dpsi, W, dtype_like):
    return dpsi.new_empty((W.shape[1], dpsi.shape[1], dpsi.shape[2]), dtype=dtype_like.dtype)


def _shapley_scores_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.F_meta = inputs[0].new_empty((0,))


def _shapley_scores_backward(ctx, dpsi, dscores, drunning, dcount, dcoeffs):
    (W,) = ctx.saved_tensors
    if dpsi is None:
        return (None,) * 11
    dF = shapley_bwd(dpsi.contiguous(), W, ctx.F_meta)
    return (dF,) + (None,) * 10


shapley_scores.register_autograd(_shapley_scores_backward, setup_context=_shapley_scores_setup)


# shapley_combine: the loss logits f(A) whose gradient reaches F through the scaled mono-modal outputs
@torch.library.custom_op("agm_fast::shapley_combine", mutates_args=())
def shapley_combine(F: Tensor, W: Tensor, coeffs: Tensor, full_index: int) -> Tensor:
    """Value ``F[full_index]``; gradient ``dF[s] = (sum_m coeffs[m] W[m, s]) g`` (see ``shapley_combine_ref``)."""
    return F[full_index].clone()


@shapley_combine.register_fake
def _(F, W, coeffs, full_index):
    return F.new_empty(tuple(F.shape[1:]))


@torch.library.custom_op("agm_fast::shapley_combine_bwd", mutates_args=())
def shapley_combine_bwd(g: Tensor, W: Tensor, coeffs: Tensor) -> Tensor:
    """``dF [S, B, C] = (coeffs @ W)[s] * g``, computed in float32 and returned in g's dtype."""
    if _backend.select(g.device) == "triton":
        from agm_fast.kernels import shapley as k

        return k.shapley_combine_bwd(g, W, coeffs)
    v = coeffs.to(torch.float32) @ W.to(torch.float32)
    return (v.view(-1, 1, 1) * g.to(torch.float32).unsqueeze(0)).to(g.dtype)


@shapley_combine_bwd.register_fake
def _(g, W, coeffs):
    return g.new_empty((W.shape[1],) + tuple(g.shape))


def _shapley_combine_setup(ctx, inputs, output):
    F, W, coeffs, full_index = inputs
    ctx.save_for_backward(W, coeffs)


def _shapley_combine_backward(ctx, g):
    W, coeffs = ctx.saved_tensors
    return shapley_combine_bwd(g.contiguous(), W, coeffs), None, None, None


shapley_combine.register_autograd(_shapley_combine_backward, setup_context=_shapley_combine_setup)


# ogm_scores: softmax-at-label sums and OGM coefficients in one launch
@torch.library.custom_op("agm_fast::ogm_scores", mutates_args=())
def ogm_scores(logits: Tensor, labels: Tensor, alpha: float, continuous: bool) -> Tuple[Tensor, Tensor]:
    """See :func:`agm_fast.reference.ogm_scores_ref`. Returns ``(scores [M], coeffs [M])``, float32."""
    if _backend.select(logits.device) == "triton":
        from agm_fast.kernels import ogm_scores as k

        return k.ogm_scores_fwd(logits, labels, alpha, continuous)
    return ref.ogm_scores_ref(logits, labels, alpha, continuous)


@ogm_scores.register_fake
def _(logits, labels, alpha, continuous):
    M = logits.shape[0]
    return (
        torch.empty((M,), dtype=torch.float32, device=logits.device),
        torch.empty((M,), dtype=torch.float32, device=logits.device),
    )


# ogm_ge_: in-place noisy gradient scaling over a list of gradient tensors (C++ extension)


_OGM_GE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Philox counter holds the element-quad index in 32 bits: 2^32 quads of 4 elements.
_OGM_GE_MAX_NUMEL = 1 << 34


def _ogm_ge_check(
    grads: List[Tensor],
    group: List[int],
    coeffs: Tensor,
    starts: Optional[List[int]] = None,
    sigma: Optional[Tensor] = None,
) -> None:
    """Metadata checks of :func:`ogm_ge_` (no tensor values are read); raises TypeError / ValueError."""
    if len(grads) == 0:
        raise ValueError("grads: expected at least one gradient tensor, got an empty list")
    if len(group) != len(grads):
        raise ValueError(f"group: expected one modality index per gradient tensor ({len(grads)}), got {len(group)}")
    for i, m in enumerate(group):
        if m < 0:
            raise ValueError(f"group[{i}]: expected a modality index >= 0, got {m}")
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.dtype not in _OGM_GE_DTYPES:
            raise TypeError(f"grads[{i}]: expected a float32, float16 or bfloat16 tensor, got {g.dtype}")
        if g.device != device:
            raise ValueError(
                f"grads: all tensors must be on one device; grads[0] is on {device}, grads[{i}] is on {g.device}"
            )
        if not g.is_contiguous():
            raise ValueError(f"grads[{i}]: expected a contiguous tensor (it is modified in place)")
        if g.numel() >= _OGM_GE_MAX_NUMEL:
            raise ValueError(f"grads[{i}]: at most 2^34 - 1 elements are supported, got {g.numel()}")
    num_groups = max(group) + 1
    if coeffs.dtype != torch.float32:
        raise TypeError(f"coeffs: expected a float32 tensor, got {coeffs.dtype}")
    if coeffs.dim() != 1 or coeffs.shape[0] != num_groups:
        raise ValueError(
            f"coeffs: expected shape [{num_groups}] (one coefficient per modality, max(group) + 1), "
            f"got {tuple(coeffs.shape)}"
        )
    if coeffs.device != device:
        raise ValueError(f"coeffs: expected a tensor on the grads' device {device}, got {coeffs.device}")
    if starts is not None:
        if len(starts) != len(grads):
            raise ValueError(
                f"starts: expected one element offset per gradient tensor ({len(grads)}), got {len(starts)}"
            )
        for i, (s0, g) in enumerate(zip(starts, grads)):
            if s0 < 0 or s0 + g.numel() >= _OGM_GE_MAX_NUMEL:
                raise ValueError(f"starts[{i}]: expected an offset >= 0 that keeps the shard below 2^34, got {s0}")
    if sigma is not None:
        if sigma.dtype != torch.float32 or tuple(sigma.shape) != (len(grads),):
            raise ValueError(
                f"sigma: expected a float32 tensor [{len(grads)}] (one std per tensor), got {sigma.dtype} "
                f"{tuple(sigma.shape)}"
            )
        if sigma.device != device:
            raise ValueError(f"sigma: expected a tensor on the grads' device {device}, got {sigma.device}")


# seed and offset are SymInts: under torch.compile a per-step offset then becomes a dynamic int after one recompile,
# instead of a guard (and a recompile) per value.
@torch.library.custom_op(
    "agm_fast::ogm_ge_",
    mutates_args={"grads"},
    schema=(
        "(Tensor(a!)[] grads, int[] group, Tensor coeffs, bool noise, SymInt seed, SymInt offset, "
        "int[]? starts=None, Tensor? sigma=None) -> ()"
    ),
)
def ogm_ge_(
    grads: List[Tensor],
    group: List[int],
    coeffs: Tensor,
    noise: bool,
    seed: int,
    offset: int,
    starts: Optional[List[int]] = None,
    sigma: Optional[Tensor] = None,
) -> None:
    """In place, for tensor i of modality ``m = group[i]``: ``g <- coeffs[m] * g``, plus ``sigma * z`` with noise.

    ``sigma = std_unbiased(g before scaling) + 1e-8`` (std 0 for a one-element tensor) and ``z`` the Philox normals of
    :func:`agm_fast.reference.philox_normal_ref` keyed on ``(seed, offset, i, element index)``. Runs the compiled
    extension when it is available (or forced), else :func:`agm_fast.reference.ogm_ge_ref`.

    Args:
        grads: contiguous float32 / float16 / bfloat16 tensors on one device, modified in place.
        group: ``len(grads)`` modality indices >= 0.
        coeffs: ``[max(group) + 1]`` float32 coefficients on the grads' device (read by the kernel, never synced).
        noise: add the Gaussian noise (OGM-GE) or only scale (OGM).
        seed: noise seed, ``0 <= seed < 2^63``.
        offset: noise offset (advance it every step), ``0 <= offset < 2^63``.
        starts: per tensor, the global index of its first element when it is a shard of a larger tensor (its noise
            is then the slice of the whole tensor's); None: 0 for every tensor.
        sigma: ``[len(grads)]`` float32 stds to use instead of computing them (a shard's std is the whole tensor's,
            from merged moments); None: computed.
    """
    _ogm_ge_check(grads, group, coeffs, starts, sigma)
    if _backend.select(grads[0].device, has=("ext", "torch")) == "ext":
        # Loading agm_fast._C registers agm_fast::_ogm_ge_impl (csrc/agm_fast.cpp) for CPU and, if built, CUDA.
        _backend.get_ext()
        torch.ops.agm_fast._ogm_ge_impl(grads, group, coeffs, noise, seed, offset, starts, sigma)
    else:
        ref.ogm_ge_ref(grads, group, coeffs, noise, seed, offset, starts, sigma)


@ogm_ge_.register_fake
def _(grads, group, coeffs, noise, seed, offset, starts=None, sigma=None):
    _ogm_ge_check(grads, group, coeffs, starts, sigma)
