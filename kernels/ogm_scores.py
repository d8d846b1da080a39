"""Triton kernels of the OGM scores ``s_m = sum_b softmax(logits_m)[b, y_b]`` and the OGM coefficients.

Two launches, deterministic, no host synchronisation:

1. ``_ogm_scores_fwd_kernel``: one program per (block of ``BLOCK_B`` samples, modality) reads those logits once
   (a ``[BLOCK_B, BLOCK_C]`` tile per class chunk, online softmax over the chunks, so any number of classes is
   handled by looping) and writes one partial sum.
2. ``_ogm_scores_reduce_kernel``: a single program adds the partials in a fixed order and applies the coefficient
   rule of ``agm_fast.ops.ogm_scores.ogm_coefficients_torch`` (M = 2 reference rule, tie damping modality 0; M > 2 rule;
   ``continuous``).

The launcher accepts logits and labels of any strides (nothing is copied). Labels are only compared with class
indices, never used as addresses: an out-of-range label makes its sample's probability NaN, hence a NaN score.
"""

from __future__ import annotations

import itertools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import GATE_BS, GATE_CS, GATE_DTYPES, GATE_MS, gate_meta, online_softmax_step

__all__ = ["ogm_scores_fwd"]

_TILE = 2048
_MAX_BLOCK_C = 128
_BLOCK_P = 64


@triton.jit
def _ogm_scores_fwd_kernel(
    x_ptr,
    y_ptr,
    part_ptr,
    B,
    C,
    stride_xm,
    stride_xb,
    stride_xc,
    stride_yb,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    m = tl.program_id(1)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    labels = tl.load(y_ptr + offs_b * stride_yb, mask=mask_b, other=0)
    label_ok = (labels >= 0) & (labels < C)
    row_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    at_label = tl.zeros((BLOCK_B,), dtype=tl.float32)
    x_rows = x_ptr + m.to(tl.int64) * stride_xm + offs_b[:, None] * stride_xb

    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_ok = offs_c[None, :] < C
        x = tl.load(x_rows + offs_c[None, :] * stride_xc, mask=mask_b[:, None] & col_ok, other=0.0).to(tl.float32)
        row_max, row_sum, at_label = online_softmax_step(x, offs_c, C, labels, row_max, row_sum, at_label)

    # exp(x_y - max) / sum exp(x - max), the arithmetic of torch.softmax (NaN for a row of -inf or with +inf/NaN).
    prob = tl.exp(at_label - row_max) / row_sum
    prob = tl.where(label_ok, prob, float("nan"))
    prob = tl.where(mask_b, prob, 0.0)
    tl.store(part_ptr + pid_b * BLOCK_M + m, tl.sum(prob, axis=0))


@triton.jit
def _one_minus_tanh(x):
    # 1 - tanh(x) = 2 / (exp(2x) + 1): no cancellation near 0, 2 at -inf. Past x = 30 the value is below 1e-26
    # (torch rounds it to 0); the bound keeps exp finite and leaves NaN as NaN.
    return 2.0 / (tl.exp(2.0 * tl.where(x > 30.0, 30.0, x)) + 1.0)


@triton.jit
def _relu_keep_nan(x):
    # torch.relu keeps NaN; maximum(x, 0) would not on every backend.
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _ogm_scores_reduce_kernel(
    part_ptr,
    scores_ptr,
    coeffs_ptr,
    num_parts,
    M,
    alpha,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CONTINUOUS: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        part_mask = (offs_p[:, None] < num_parts) & mask_m[None, :]
        s += tl.sum(tl.load(part_ptr + offs_p[:, None] * BLOCK_M + offs_m[None, :], mask=part_mask, other=0.0), axis=0)
    if CONTINUOUS:
        shift = 1.0
    else:
        shift = 0.0

    # M = 2 (reference rule): rho = s_1 / s_0 damps modality 1 when rho > 1, otherwise modality 0.
    s0 = tl.sum(tl.where(offs_m == 0, s, 0.0), axis=0)
    s1 = tl.sum(tl.where(offs_m == 1, s, 0.0), axis=0)
    rho = s1 / s0
    damp1 = rho > 1.0
    k_dom = _one_minus_tanh(alpha * _relu_keep_nan(rho - shift))
    k_sub = _one_minus_tanh(alpha * _relu_keep_nan(1.0 / rho - shift))
    pair = tl.where(offs_m == 0, tl.where(damp1, 1.0, k_sub), tl.where(damp1, k_dom, 1.0))

    # M > 2: rho_m = s_m / mean_{j != m} s_j; every modality with rho_m > 1 is damped.
    rho_m = s / ((tl.sum(tl.where(mask_m, s, 0.0), axis=0) - s) / (M - 1))
    many = tl.where(rho_m > 1.0, _one_minus_tanh(alpha * _relu_keep_nan(rho_m - shift)), 1.0)

    # A non-finite score makes every coefficient NaN (s - s is 0 for finite s), so a skipped AMP step is visible.
    poison = tl.sum(tl.where(mask_m, s - s, 0.0), axis=0)
    coeffs = tl.where(M == 2, pair, many) + poison
    tl.store(scores_ptr + offs_m, s, mask=mask_m)
    tl.store(coeffs_ptr + offs_m, coeffs, mask=mask_m)


def ogm_scores_fwd(
    logits: Tensor,
    labels: Tensor,
    alpha: float,
    continuous: bool,
    *,
    out: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """OGM scores and coefficients (see ``agm_fast.ops.ogm_scores.ogm_scores_torch``).

    Args:
        logits: ``[M, B, C]`` per-modality logits, float32, bfloat16 or float16, any strides, M >= 2.
        labels: ``[B]`` integer class indices, any stride.
        alpha: modulation strength.
        continuous: use ``relu(rho - 1)`` instead of the reference's ``relu(rho)``.
        out: optional preallocated ``(scores [M], coeffs [M])`` float32.

    Returns:
        ``(scores [M], coeffs [M])``, float32.
    """
    M, B, C = logits.shape
    if out is None:
        scores = torch.empty((M,), dtype=torch.float32, device=logits.device)
        coeffs = torch.empty((M,), dtype=torch.float32, device=logits.device)
    else:
        scores, coeffs = out
    block_m = triton.next_power_of_2(M)
    block_c = min(triton.next_power_of_2(max(C, 1)), _MAX_BLOCK_C)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), _TILE // block_c))
    num_parts = max(1, triton.cdiv(B, block_b))
    partials = torch.empty((num_parts, block_m), dtype=torch.float32, device=logits.device)
    _ogm_scores_fwd_kernel[(num_parts, M)](
        logits,
        labels,
        partials,
        B,
        C,
        logits.stride(0),
        logits.stride(1),
        logits.stride(2),
        labels.stride(0),
        BLOCK_M=block_m,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
        num_warps=4,
    )
    _ogm_scores_reduce_kernel[(1,)](
        partials,
        scores,
        coeffs,
        num_parts,
        M,
        float(alpha),
        BLOCK_M=block_m,
        BLOCK_P=_BLOCK_P,
        CONTINUOUS=bool(continuous),
        num_warps=1,
    )
    return scores, coeffs


def gate_cases():
    """The launches the compile gate drives: ``(case, launcher, args, kwargs)`` over meta tensors."""
    for M, B, C, dtype in itertools.product(GATE_MS, GATE_BS, GATE_CS, GATE_DTYPES):
        labels = gate_meta((B,), torch.int64)
        yield f"ogm_scores M={M} B={B} C={C} {dtype}", ogm_scores_fwd, (gate_meta((M, B, C), dtype), labels, 0.8,
                                                                         False), {}
