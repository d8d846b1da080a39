"""Triton kernels of the AGM step on stacked subset logits: Shapley combination, scores, running means, coefficients.

Forward (:func:`shapley_scores_fwd`), two launches and no host synchronisation:

1. ``_shapley_scores_fwd_kernel``: one program per block of ``BLOCK_B`` samples reads every subset logit once, forms
   all M mono-modal outputs ``psi[m] = sum_s W[m, s] F[s]`` in float32 registers (a ``[BLOCK_M, BLOCK_B, BLOCK_C]``
   tile per class chunk), writes psi, and folds the chunk into an online log-sum-exp per (modality, sample), so
   that any number of classes is handled by looping. It writes one partial score sum per (program, modality).
2. ``_shapley_scores_reduce_kernel``: a single program adds the partials in a fixed order (deterministic, no
   atomics) and computes the scores, the running-mean update and the coefficients.

Backward: ``_shapley_bwd_kernel`` (``dF[s] = sum_m W[m, s] dpsi[m]``) and ``_shapley_combine_bwd_kernel``
(``dF[s] = (sum_m c_m W[m, s]) g``), one launch each; a program reads its block of the incoming gradient once and
writes it to every subset, ``BLOCK_S`` subsets at a time.

Every launcher accepts inputs of any strides (the kernels take the strides as arguments; nothing is copied, except
that ``shapley_combine_bwd`` flattens a gradient that is not 2-D with ``reshape``) and writes contiguous outputs.
Labels are only compared with class indices, never used as addresses, so an out-of-range label cannot cause an
out-of-bounds read: its sample gets a NaN loss, hence a NaN score.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import GATE_BS, GATE_CS, GATE_DTYPES, GATE_MS, gate_meta, online_softmax_step

__all__ = ["shapley_scores_fwd", "shapley_bwd", "shapley_combine_bwd"]

# Elements of the [BLOCK_M, BLOCK_B, BLOCK_C] float32 tile one program keeps in registers.
_TILE = 2048
# Elements of each [BLOCK_M, BLOCK_B] running row statistic (max, sum, logit at the label, NaN poison).
_ROWS = 512
_MAX_BLOCK_C = 128
_BLOCK_P = 64
# Backward: subsets written per step of the loop, and elements of the float32 product tile.
_MAX_BLOCK_S = 16
_BWD_TILE = 4096


def _scores_blocks(M: int, B: int, C: int) -> Tuple[int, int, int]:
    block_m = triton.next_power_of_2(M)
    block_c = min(triton.next_power_of_2(max(C, 1)), _MAX_BLOCK_C)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), _TILE // (block_m * block_c), _ROWS // block_m))
    return block_m, block_b, block_c


@triton.jit
def _shapley_scores_fwd_kernel(
    f_ptr,
    w_ptr,
    y_ptr,
    psi_ptr,
    part_ptr,
    S,
    M,
    B,
    C,
    stride_fs,
    stride_fb,
    stride_fc,
    stride_wm,
    stride_ws,
    stride_yb,
    stride_yc,
    log_floor,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    REGRESSION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_b = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_m = offs_m < M
    mask_b = offs_b < B
    psi_rows = psi_ptr + offs_m.to(tl.int64)[:, None, None] * B * C + offs_b[None, :, None] * C

    if REGRESSION:
        sq_err = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    else:
        labels = tl.load(y_ptr + offs_b * stride_yb, mask=mask_b, other=0)
        label_ok = (labels >= 0) & (labels < C)
        row_max = tl.full((BLOCK_M, BLOCK_B), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        at_label = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        # Sum of (x - x) over the row: 0 when every logit is finite, NaN otherwise (the reference's poison term).
        poison = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)

    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask_bc = mask_b[:, None] & mask_c[None, :]
        f_tile = f_ptr + offs_b[:, None] * stride_fb + offs_c[None, :] * stride_fc
        acc = tl.zeros((BLOCK_M, BLOCK_B, BLOCK_C), dtype=tl.float32)
        w_col = w_ptr + offs_m * stride_wm
        for _ in range(0, S):
            w = tl.load(w_col, mask=mask_m, other=0.0).to(tl.float32)
            f = tl.load(f_tile, mask=mask_bc, other=0.0).to(tl.float32)
            acc += w[:, None, None] * f[None, :, :]
            # Pointer increments keep the offsets 64-bit however large S * stride_fs is.
            w_col += stride_ws
            f_tile += stride_fs
        psi = acc.to(psi_ptr.dtype.element_ty)
        mask3 = mask_m[:, None, None] & mask_bc[None, :, :]
        tl.store(psi_rows + offs_c[None, None, :], psi, mask=mask3)
        # Scores are those of the psi that is returned (rounded to F's dtype), as in the reference.
        x = psi.to(tl.float32)
        if REGRESSION:
            y_tile = y_ptr + offs_b[:, None] * stride_yb + offs_c[None, :] * stride_yc
            y = tl.load(y_tile, mask=mask_bc, other=0.0).to(tl.float32)
            d = x - y[None, :, :]
            sq_err += tl.sum(tl.where(mask3, d * d, 0.0), axis=2)
        else:
            row_max, row_sum, at_label = online_softmax_step(x, offs_c, C, labels[None, :], row_max, row_sum, at_label)
            poison += tl.sum(tl.where(mask_c[None, None, :], x - x, 0.0), axis=2)

    keep = mask_m[:, None] & mask_b[None, :]
    if REGRESSION:
        loss = tl.where(keep, sq_err, 0.0)
    else:
        logp = (at_label - row_max) - tl.log(row_sum)
        # where() rather than maximum(): a NaN log-probability must stay NaN, as torch.clamp keeps it.
        logp = tl.where(logp < log_floor, log_floor, logp)
        loss = -logp + poison
        loss = tl.where(label_ok[None, :], loss, float("nan"))
        loss = tl.where(keep, loss, 0.0)
    tl.store(part_ptr + pid * BLOCK_M + offs_m, tl.sum(loss, axis=1))


@triton.jit
def _shapley_scores_reduce_kernel(
    part_ptr,
    running_ptr,
    count_ptr,
    prev_ptr,
    scores_ptr,
    running_out_ptr,
    count_out_ptr,
    coeffs_ptr,
    num_parts,
    M,
    stride_run,
    stride_prev,
    denom,
    alpha,
    cap,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    IN_WINDOW: tl.constexpr,
    HOLD_LAST: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        part_mask = offs_p[:, None] < num_parts
        part = tl.load(part_ptr + offs_p[:, None] * BLOCK_M + offs_m[None, :], mask=part_mask, other=0.0)
        total += tl.sum(part, axis=0)
    s = total / denom

    run = tl.load(running_ptr + offs_m * stride_run, mask=mask_m, other=0.0).to(tl.float32)
    others = (tl.sum(tl.where(mask_m, s, 0.0), axis=0) - s) / (M - 1)
    others_run = (tl.sum(run, axis=0) - run) / (M - 1)
    diff = tl.exp(others_run - run) - tl.exp(others - s)
    diff = tl.where(diff > cap, cap, diff)
    coeffs = tl.exp(alpha * diff)
    # x - x is 0 exactly for finite x: this step's update is applied only when every score is finite.
    n_bad = tl.sum(tl.where(mask_m & ((s - s) != 0.0), 1, 0), axis=0)
    ok = n_bad == 0
    if not IN_WINDOW:
        if HOLD_LAST:
            coeffs = tl.load(prev_ptr + offs_m * stride_prev, mask=mask_m, other=1.0).to(tl.float32)
        else:
            coeffs = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        coeffs = tl.where(ok, coeffs, float("nan"))

    t = tl.load(count_ptr).to(tl.float32)
    new_run = run * (t / (t + 1.0)) + s / (t + 1.0)
    tl.store(scores_ptr + offs_m, s, mask=mask_m)
    tl.store(running_out_ptr + offs_m, tl.where(ok, new_run, run), mask=mask_m)
    tl.store(coeffs_ptr + offs_m, coeffs, mask=mask_m)
    tl.store(count_out_ptr, tl.where(ok, t + 1.0, t))


def shapley_scores_fwd(
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
    *,
    out: Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Mono-modal outputs, scores, running means and coefficients of one AGM step (see
    ``agm_fast.ops.shapley.shapley_scores_torch``).

    Args:
        F: ``[S, B, C]`` subset logits, float32, bfloat16 or float16, any strides (accumulated in float32).
        W: ``[M, S]`` Shapley weights (any float dtype, read as float32), 2 <= M.
        labels: ``[B]`` integer class indices; with ``regression``, float targets ``[B]`` or ``[B, C]``.
        running: ``[M]`` running mean scores before this step.
        count: ``[]`` or ``[1]`` number of steps done before this one.
        prev_coeffs: ``[M]`` the last step's coefficients (read only with ``hold_last`` outside the window).
        alpha: modulation strength.
        cap: upper bound on ``rbar - r``; None for no bound.
        in_window: whether this step is inside the modulation window.
        hold_last: outside the window, return ``prev_coeffs`` instead of ones.
        regression: score with the mean squared error instead of the clamped cross-entropy.
        out: optional preallocated ``(psi, scores, running_new, count_new, coeffs)``, contiguous, of the shapes
            and dtypes below.

    Returns:
        ``(psi [M, B, C] in F's dtype, scores [M], running_new [M], count_new (count's shape), coeffs [M])``, the
        last four float32.
    """
    S, B, C = F.shape
    M = W.shape[0]
    if out is None:
        f32 = dict(dtype=torch.float32, device=F.device)
        psi = torch.empty((M, B, C), dtype=F.dtype, device=F.device)
        scores = torch.empty((M,), **f32)
        running_new = torch.empty((M,), **f32)
        count_new = torch.empty(tuple(count.shape), **f32)
        coeffs = torch.empty((M,), **f32)
    else:
        psi, scores, running_new, count_new, coeffs = out

    block_m, block_b, block_c = _scores_blocks(M, B, C)
    num_parts = max(1, triton.cdiv(B, block_b))
    partials = torch.empty((num_parts, block_m), dtype=torch.float32, device=F.device)
    if regression:
        per_class = labels.dim() == 2 and labels.shape[1] != 1
        stride_yb, stride_yc = labels.stride(0), (labels.stride(1) if per_class else 0)
    else:
        stride_yb, stride_yc = labels.stride(0), 0
    _shapley_scores_fwd_kernel[(num_parts,)](
        F,
        W,
        labels,
        psi,
        partials,
        S,
        M,
        B,
        C,
        F.stride(0),
        F.stride(1),
        F.stride(2),
        W.stride(0),
        W.stride(1),
        stride_yb,
        stride_yc,
        # The reference clamps the probability at 1e-8 before the log.
        math.log(1e-8),
        BLOCK_M=block_m,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
        REGRESSION=bool(regression),
        num_warps=4,
        # Without an explicit budget ptxas settles on 64-72 registers for some block shapes on sm_80 and spills a
        # few; with the whole register file allowed it spills none (tests/test_compile_gate.py).
        maxnreg=255,
    )
    _shapley_scores_reduce_kernel[(1,)](
        partials,
        running,
        count,
        prev_coeffs,
        scores,
        running_new,
        count_new,
        coeffs,
        num_parts,
        M,
        running.stride(0),
        prev_coeffs.stride(0),
        float(B * C if regression else B),
        float(alpha),
        math.inf if cap is None else float(cap),
        BLOCK_M=block_m,
        BLOCK_P=_BLOCK_P,
        IN_WINDOW=bool(in_window),
        HOLD_LAST=bool(hold_last),
        num_warps=1,
    )
    return psi, scores, running_new, count_new, coeffs


def _bwd_blocks(M: int, S: int, N: int, per_m: bool) -> Tuple[int, int, int]:
    block_m = triton.next_power_of_2(M)
    block_s = min(triton.next_power_of_2(S), _MAX_BLOCK_S)
    # shapley_bwd holds a [BLOCK_M, BLOCK_S, BLOCK_N] product, shapley_combine_bwd a [BLOCK_S, BLOCK_N] one.
    tile = _BWD_TILE // block_m if per_m else _BWD_TILE
    block_n = max(16, min(triton.next_power_of_2(N), tile // block_s))
    return block_m, block_s, block_n


@triton.jit
def _shapley_bwd_kernel(
    dpsi_ptr,
    w_ptr,
    df_ptr,
    S,
    M,
    C,
    N,
    stride_dm,
    stride_db,
    stride_dc,
    stride_wm,
    stride_ws,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    b = offs_n // C
    c = offs_n % C
    d = tl.load(
        dpsi_ptr + offs_m[:, None] * stride_dm + (b * stride_db + c * stride_dc)[None, :],
        mask=mask_m[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    # The incoming gradient is read once; every block of subsets is written from it.
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        w = tl.load(
            w_ptr + offs_m[:, None] * stride_wm + offs_s[None, :] * stride_ws,
            mask=mask_m[:, None] & mask_s[None, :],
            other=0.0,
        ).to(tl.float32)
        dF = tl.sum(w[:, :, None] * d[:, None, :], axis=0)
        tl.store(
            df_ptr + offs_s.to(tl.int64)[:, None] * N + offs_n[None, :],
            dF.to(df_ptr.dtype.element_ty),
            mask=mask_s[:, None] & mask_n[None, :],
        )


def shapley_bwd(dpsi: Tensor, W: Tensor, dtype: torch.dtype, *, out: Optional[Tensor] = None) -> Tensor:
    """Gradient of the Shapley combination: ``dF[s] = sum_m W[m, s] dpsi[m]``, accumulated in float32.

    Args:
        dpsi: ``[M, B, C]`` gradient of psi, any strides.
        W: ``[M, S]`` Shapley weights.
        dtype: dtype of the result (F's dtype).
        out: optional preallocated contiguous ``[S, B, C]`` result.

    Returns:
        ``[S, B, C]`` contiguous, in ``dtype``.
    """
    M, B, C = dpsi.shape
    S = W.shape[1]
    dF = torch.empty((S, B, C), dtype=dtype, device=dpsi.device) if out is None else out
    N = B * C
    if N == 0 or S == 0:
        return dF
    block_m, block_s, block_n = _bwd_blocks(M, S, N, per_m=True)
    _shapley_bwd_kernel[(triton.cdiv(N, block_n),)](
        dpsi,
        W,
        dF,
        S,
        M,
        C,
        N,
        dpsi.stride(0),
        dpsi.stride(1),
        dpsi.stride(2),
        W.stride(0),
        W.stride(1),
        BLOCK_M=block_m,
        BLOCK_S=block_s,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return dF


@triton.jit
def _shapley_combine_bwd_kernel(
    g_ptr,
    w_ptr,
    c_ptr,
    df_ptr,
    S,
    M,
    C,
    N,
    stride_gb,
    stride_gc,
    stride_wm,
    stride_ws,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    g = tl.load(g_ptr + (offs_n // C) * stride_gb + (offs_n % C) * stride_gc, mask=mask_n, other=0.0).to(tl.float32)
    coeffs = tl.load(c_ptr + offs_m * stride_cm, mask=mask_m, other=0.0).to(tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        w = tl.load(
            w_ptr + offs_m[:, None] * stride_wm + offs_s[None, :] * stride_ws,
            mask=mask_m[:, None] & mask_s[None, :],
            other=0.0,
        ).to(tl.float32)
        v = tl.sum(coeffs[:, None] * w, axis=0)
        tl.store(
            df_ptr + offs_s.to(tl.int64)[:, None] * N + offs_n[None, :],
            (v[:, None] * g[None, :]).to(df_ptr.dtype.element_ty),
            mask=mask_s[:, None] & mask_n[None, :],
        )


def shapley_combine_bwd(g: Tensor, W: Tensor, coeffs: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    """Gradient of ``shapley_combine``: ``dF[s] = (sum_m coeffs[m] W[m, s]) * g``, computed in float32.

    Args:
        g: ``[B, C]`` gradient of the combined logits, any strides (another rank is flattened with ``reshape``).
        W: ``[M, S]`` Shapley weights.
        coeffs: ``[M]`` coefficients.
        out: optional preallocated contiguous ``[S, *g.shape]`` result.

    Returns:
        ``[S, *g.shape]`` contiguous, in g's dtype.
    """
    M, S = W.shape
    dF = torch.empty((S,) + tuple(g.shape), dtype=g.dtype, device=g.device) if out is None else out
    g2 = g if g.dim() == 2 else g.reshape(1, -1)
    C = g2.shape[1]
    N = g2.numel()
    if N == 0 or S == 0:
        return dF
    block_m, block_s, block_n = _bwd_blocks(M, S, N, per_m=False)
    _shapley_combine_bwd_kernel[(triton.cdiv(N, block_n),)](
        g2,
        W,
        coeffs,
        dF,
        S,
        M,
        C,
        N,
        g2.stride(0),
        g2.stride(1),
        W.stride(0),
        W.stride(1),
        coeffs.stride(0),
        BLOCK_M=block_m,
        BLOCK_S=block_s,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return dF


def gate_cases():
    """The launches the compile gate drives: ``(case, launcher, args, kwargs)`` over meta tensors."""
    for M, B, C, dtype in itertools.product(GATE_MS, GATE_BS, GATE_CS, GATE_DTYPES):
        labels = gate_meta((B,), torch.int64)
        S = (1 << M) - 1
        W = gate_meta((M, S))
        F = gate_meta((S, B, C), dtype)
        state = (gate_meta((M,)), gate_meta(()), gate_meta((M,)))
        for regression in (False, True):
            y = gate_meta((B, C)) if regression else labels
            yield (f"shapley_scores M={M} B={B} C={C} {dtype} regression={regression}", shapley_scores_fwd,
                   (F, W, y, *state, 1.5, 10.0, True, False, regression), {})
        yield f"shapley_bwd M={M} B={B} C={C} {dtype}", shapley_bwd, (gate_meta((M, B, C), dtype), W, dtype), {}
        yield (f"shapley_combine_bwd M={M} B={B} C={C} {dtype}", shapley_combine_bwd,
               (gate_meta((B, C), dtype), W, gate_meta((M,))), {})
