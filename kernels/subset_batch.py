"""Triton kernels that stack one modality's tensor once per subset, and scatter the gradient back.

Forward (``_subset_batch_fwd_kernel``, one launch): each program loads a ``[BLOCK_B, BLOCK_D]`` tile of ``x``
(samples flattened to D values) and the matching slice of the muted row once, then writes that tile into every
subset block of the ``[S * B, D]`` output: a copy where the subset keeps the modality, the muted value elsewhere.

Backward (two launches, deterministic): ``_subset_batch_bwd_kernel`` sums each ``[BLOCK_B, BLOCK_D]`` tile of the
incoming gradient over the subsets that keep the modality (``dx``) and, over the subsets that mute it and the tile's
samples, into one partial row per block of samples; ``_subset_batch_bwd_reduce_kernel`` adds those partial rows in
a fixed order into ``dmute``.

The per-subset keep bits (bit ``modality`` of each mask) are an int32 tensor on the device, cached per bit pattern
and device so that a training loop copies it to the device once.

Strides: the batch dimension of ``x`` and of the gradient may have any stride; the per-sample part is flattened with
``reshape``, which copies only when it cannot be viewed as one strided dimension.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from agm_fast._backend import to_device

from ._common import GATE_BS, GATE_DS, GATE_DTYPES, GATE_MS, gate_meta

__all__ = ["subset_batch_fwd", "subset_batch_bwd"]

_TILE = 2048
_MAX_BLOCK_D = 1024


@functools.lru_cache(maxsize=256)
def _keep_bits_cached(keep: Tuple[int, ...], device: torch.device) -> Tensor:
    return to_device(torch.tensor(keep, dtype=torch.int32), device)


def _keep_bits(masks: Sequence[int], modality: int, device: torch.device) -> Tensor:
    return _keep_bits_cached(tuple((int(mask) >> modality) & 1 for mask in masks), device)


def _blocks(B: int, D: int) -> Tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), _TILE // block_d))
    return block_b, block_d


@triton.jit
def _subset_batch_fwd_kernel(
    x_ptr,
    mute_ptr,
    keep_ptr,
    out_ptr,
    S,
    B,
    D,
    stride_xb,
    stride_xd,
    stride_mute,
    stride_out_s,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MUTE: tl.constexpr,
):
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_b < B)[:, None] & mask_d[None, :]
    x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
    if HAS_MUTE:
        muted = tl.load(mute_ptr + offs_d * stride_mute, mask=mask_d, other=0.0)
    else:
        muted = tl.zeros((BLOCK_D,), dtype=x.dtype)
    muted = tl.broadcast_to(muted[None, :], (BLOCK_B, BLOCK_D))
    out_tile = out_ptr + offs_b[:, None] * D + offs_d[None, :]
    for s in range(0, S):
        keep = tl.load(keep_ptr + s)
        tl.store(out_tile, tl.where(keep != 0, x, muted), mask=mask)
        # Advancing the pointer keeps the offset arithmetic 64-bit for outputs past 2^31 elements.
        out_tile += stride_out_s


def subset_batch_fwd(
    x: Tensor, mute: Optional[Tensor], masks: List[int], modality: int, *, out: Optional[Tensor] = None
) -> Tensor:
    """Stack ``x`` once per subset: a copy where bit ``modality`` of the subset's mask is set, else the muted value.

    Args:
        x: ``[B, ...]`` one modality's inputs or features; the batch dimension may have any stride.
        mute: the muted value, ``x.shape[1:]`` numel (one sample, broadcast over the batch, cast to x's dtype), or
            None for zeros.
        masks: S subset bitmasks.
        modality: which bit of the masks is this modality.
        out: optional preallocated contiguous ``[S * B, ...]`` result.

    Returns:
        ``[S * B, ...]`` contiguous, in x's dtype.
    """
    S, B = len(masks), x.shape[0]
    D = math.prod(x.shape[1:])
    result = x.new_empty((S * B,) + tuple(x.shape[1:])) if out is None else out
    if S == 0 or B == 0 or D == 0:
        return result
    x2 = x.reshape(B, D)
    mute1 = None
    if mute is not None:
        if mute.numel() != D:
            raise ValueError(f"mute: expected one sample of x ({D} values), got shape {tuple(mute.shape)}")
        # One sample: cast here so that the kernel copies values already rounded exactly as torch rounds them.
        mute1 = mute.reshape(D).to(x.dtype)
    block_b, block_d = _blocks(B, D)
    _subset_batch_fwd_kernel[(triton.cdiv(B, block_b), triton.cdiv(D, block_d))](
        x2,
        x2 if mute1 is None else mute1,
        _keep_bits(masks, modality, x.device),
        result,
        S,
        B,
        D,
        x2.stride(0),
        x2.stride(1),
        0 if mute1 is None else mute1.stride(0),
        B * D,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        HAS_MUTE=mute1 is not None,
        num_warps=4,
    )
    return result


@triton.jit
def _subset_batch_bwd_kernel(
    g_ptr,
    keep_ptr,
    dx_ptr,
    part_ptr,
    S,
    B,
    D,
    stride_gs,
    stride_gb,
    stride_gd,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MUTE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_b < B)[:, None] & mask_d[None, :]
    g_tile = g_ptr + offs_b[:, None] * stride_gb + offs_d[None, :] * stride_gd
    dx = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    dmute = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for s in range(0, S):
        keep = tl.load(keep_ptr + s) != 0
        g = tl.load(g_tile, mask=mask, other=0.0).to(tl.float32)
        g_tile += stride_gs
        dx += tl.where(keep, g, 0.0)
        if HAS_MUTE:
            dmute += tl.where(keep, 0.0, g)
    tl.store(dx_ptr + offs_b[:, None] * D + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_MUTE:
        tl.store(part_ptr + pid_b * D + offs_d, tl.sum(dmute, axis=0), mask=mask_d)


@triton.jit
def _subset_batch_bwd_reduce_kernel(part_ptr, dmute_ptr, num_parts, D, BLOCK_D: tl.constexpr):
    offs_d = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p in range(0, num_parts):
        acc += tl.load(part_ptr + p * D + offs_d, mask=mask_d, other=0.0)
    tl.store(dmute_ptr + offs_d, acc.to(dmute_ptr.dtype.element_ty), mask=mask_d)


def subset_batch_bwd(
    grad: Tensor,
    mute_shape: Optional[List[int]],
    masks: List[int],
    modality: int,
    *,
    out: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """Backward of :func:`subset_batch_fwd`, accumulated in float32.

    Args:
        grad: ``[S * B, ...]`` gradient of the stacked batch; the batch dimension may have any stride.
        mute_shape: the muted value's shape, or None when the modality is muted with zeros.
        masks: S subset bitmasks.
        modality: which bit of the masks is this modality.
        out: optional preallocated contiguous ``(dx, dmute)``.

    Returns:
        ``(dx [B, ...], dmute)`` in grad's dtype: ``dx`` sums the subsets that keep the modality; ``dmute`` (of
        ``mute_shape``) sums the subsets that mute it over the batch, and is a 0-d zero when ``mute_shape`` is None.
    """
    S = len(masks)
    B = grad.shape[0] // S if S else 0
    inner = tuple(grad.shape[1:])
    D = math.prod(inner)
    if out is None:
        dx = grad.new_empty((B,) + inner)
        dmute = grad.new_zeros(()) if mute_shape is None else grad.new_empty(tuple(mute_shape))
    else:
        dx, dmute = out
        if mute_shape is None:
            dmute.zero_()
    if B == 0 or D == 0:
        dx.zero_()
        if mute_shape is not None:
            dmute.zero_()
        return dx, dmute
    g3 = grad.reshape(S, B, D)
    block_b, block_d = _blocks(B, D)
    num_parts = triton.cdiv(B, block_b)
    has_mute = mute_shape is not None
    partials = torch.empty((num_parts, D) if has_mute else (1,), dtype=torch.float32, device=grad.device)
    _subset_batch_bwd_kernel[(num_parts, triton.cdiv(D, block_d))](
        g3,
        _keep_bits(masks, modality, grad.device),
        dx,
        partials,
        S,
        B,
        D,
        g3.stride(0),
        g3.stride(1),
        g3.stride(2),
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        HAS_MUTE=has_mute,
        num_warps=4,
    )
    if has_mute:
        _subset_batch_bwd_reduce_kernel[(triton.cdiv(D, _MAX_BLOCK_D),)](
            partials, dmute, num_parts, D, BLOCK_D=_MAX_BLOCK_D, num_warps=4
        )
    return dx, dmute


def gate_cases():
    """The launches the compile gate drives: ``(case, launcher, args, kwargs)`` over meta tensors."""
    for M, B, D, dtype in itertools.product(GATE_MS, GATE_BS, GATE_DS, GATE_DTYPES):
        masks = list(range(1, 1 << M))
        for muted in (False, True):
            mute = gate_meta((D,), dtype) if muted else None
            yield (f"subset_batch_fwd M={M} B={B} D={D} {dtype} mute={muted}", subset_batch_fwd,
                   (gate_meta((B, D), dtype), mute, masks, 0), {})
            yield (f"subset_batch_bwd M={M} B={B} D={D} {dtype} mute={muted}", subset_batch_bwd,
                   (gate_meta((len(masks) * B, D), dtype), [D] if muted else None, masks, 0), {})
