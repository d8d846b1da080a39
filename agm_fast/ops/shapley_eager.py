"""The AGM step's two ops as ``torch.autograd.Function`` s for eager training (docs/methods.md, section 5.4).

The custom ops of :mod:`agm_fast.ops.shapley` are what ``torch.compile`` sees (opaque, with fakes). In eager mode
their Python dispatch costs more than the arithmetic at the sizes AGM meets (F is ``[2^M - 1, B, C]``): about 0.5 ms
per step on a CPU core. :func:`scores` and :func:`combine` run the same bodies (Triton on CUDA, the torch functions
elsewhere), forward and backward, through plain autograd Functions when not compiling, and the custom ops when
compiling, so the numbers are the same either way.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .shapley import combine_bwd_impl, scores_bwd_impl, scores_impl, shapley_combine_op, shapley_scores_op

__all__ = ["combine", "scores"]


class _Scores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression):
        psi, scores_, running_new, count_new, coeffs = scores_impl(
            F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression
        )
        count_new = count_new.reshape(count.shape)
        ctx.save_for_backward(W)
        ctx.dtype = F.dtype
        ctx.mark_non_differentiable(scores_, running_new, count_new, coeffs)
        return psi.contiguous(), scores_, running_new, count_new, coeffs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dpsi, *_):
        if dpsi is None:
            return (None,) * 11
        (W,) = ctx.saved_tensors
        return (scores_bwd_impl(dpsi.contiguous(), W, ctx.dtype),) + (None,) * 10


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, F, W, coeffs, full_index):
        ctx.save_for_backward(W, coeffs)
        return F[full_index].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        W, coeffs = ctx.saved_tensors
        return combine_bwd_impl(g.contiguous(), W, coeffs), None, None, None


def scores(F: Tensor, W: Tensor, labels: Tensor, running: Tensor, count: Tensor, prev_coeffs: Tensor, alpha: float,
           cap: Optional[float], in_window: bool, hold_last: bool,
           regression: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`agm_fast.ops.shapley.shapley_scores_op` (the same arguments, unchecked, and the same results)."""
    if torch.compiler.is_compiling():
        return shapley_scores_op(F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last,
                                 regression)
    return _Scores.apply(F, W, labels, running, count, prev_coeffs, alpha, cap, in_window, hold_last, regression)


def combine(F: Tensor, W: Tensor, coeffs: Tensor, full_index: int) -> Tensor:
    """:func:`agm_fast.ops.shapley.shapley_combine_op` (the same arguments, unchecked, and the same result)."""
    if torch.compiler.is_compiling():
        return shapley_combine_op(F, W, coeffs, full_index)
    return _Combine.apply(F, W, coeffs.detach(), full_index)
