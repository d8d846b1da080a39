"""``subset_batch``: one modality's input (or feature) stacked once per subset, muted where the subset lacks it.

The custom op ``agm_fast::subset_batch`` (Triton on CUDA, :func:`subset_batch_torch` elsewhere), its fake, its
backward op and the validated public function :func:`subset_batch` (docs/methods.md, section 5).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend

__all__ = ["subset_batch", "subset_batch_op", "subset_batch_bwd_op", "subset_batch_torch"]


def subset_batch_torch(xs: Sequence[Tensor], masks: Sequence[int], mutes: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """Stack every subset's version of each modality along the batch.

    Args:
        xs: M tensors ``[B, ...]`` (inputs or features; shapes may differ between modalities, B may not).
        masks: S subset bitmasks.
        mutes: per modality, the muted value ``[...]`` (one sample, broadcast over the batch), or None for zeros.

    Returns:
        M tensors ``[S * B, ...]``: block s of modality m is ``xs[m]`` when bit m of ``masks[s]`` is set, else the
        muted value. Differentiable with respect to ``xs`` and ``mutes``.
    """
    out = []
    for m, x in enumerate(xs):
        mute = mutes[m] if mutes is not None else None
        muted = x.new_zeros(()).expand_as(x) if mute is None else mute.to(x.dtype).expand_as(x)
        out.append(torch.cat([x if (mask >> m) & 1 else muted for mask in masks], dim=0))
    return out


@torch.library.custom_op("agm_fast::subset_batch", mutates_args=())
def subset_batch_op(x: Tensor, mute: Optional[Tensor], masks: List[int], modality: int) -> Tensor:
    """Stack ``x [B, ...]`` once per subset in ``masks``: a copy where bit ``modality`` is set, else the muted
    value (``mute [...]`` broadcast over the batch, or zeros). Returns ``[len(masks) * B, ...]``."""
    if _backend.select(x.device) == "triton":
        from agm_fast.kernels import subset_batch as k

        return k.subset_batch_fwd(x, mute, masks, modality)
    return subset_batch_torch([x], [(mask >> modality) & 1 for mask in masks], [mute])[0].contiguous()


@subset_batch_op.register_fake
def _(x, mute, masks, modality):
    return x.new_empty((len(masks) * x.shape[0],) + tuple(x.shape[1:]))


@torch.library.custom_op("agm_fast::subset_batch_bwd", mutates_args=())
def subset_batch_bwd_op(
    grad: Tensor, mute_shape: Optional[List[int]], masks: List[int], modality: int
) -> Tuple[Tensor, Tensor]:
    """Backward of :func:`subset_batch_op`: ``dx [B, ...]`` sums the gradient of the subsets that hold the modality;
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


@subset_batch_bwd_op.register_fake
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
    dx, dmute = subset_batch_bwd_op(grad.contiguous(), ctx.mute_shape, ctx.masks, ctx.modality)
    return dx, (None if ctx.mute_shape is None else dmute), None, None


subset_batch_op.register_autograd(_subset_batch_backward, setup_context=_subset_batch_setup)


def subset_batch(x: Tensor, mute: Optional[Tensor], masks: Sequence[int], modality: int) -> Tensor:
    """One modality's stacked subset batch: ``x`` once per subset, or its muted value where the subset mutes it.

    Differentiable with respect to ``x`` and ``mute``; the backward sums over subsets (and the batch, for ``mute``).

    Args:
        x: ``[B, ...]`` the modality's inputs or features.
        mute: ``x.shape[1:]`` muted value (one sample, broadcast over the batch), or None for zeros.
        masks: S subset bitmasks (bit ``modality`` set = the modality is present), e.g.
            :func:`agm_fast.coalitions.subset_masks`.
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
    return subset_batch_op(x, mute, masks, modality)
