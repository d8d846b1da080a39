"""AGM's factorized evaluation through a split head (docs/methods.md, section 5).

A head whose first layer is linear in each modality's features (:class:`agm_fast.fusion.HeadSplit`) gives every
subset's pre-activation as the bias plus, per modality, the partial product of its real or its muted features. The
partial products run once per modality; only the tail runs per subset, as one batched call. When every subset is
needed the pre-activations are built by doubling, one modality at a time, so building them costs one addition per
subset row.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def _exhaustive(masks: Sequence[int], M: int) -> Optional[Tuple[int, int]]:
    """``(first, stop)`` when ``masks`` is ``range(first, stop)`` with ``first`` 0 or 1 and ``stop`` 2^M - 1 (every
    masked subset) or 2^M (the full set too); None otherwise."""
    n = 1 << M
    for stop in (n - 1, n):
        for first in (0, 1):
            if len(masks) == stop - first and masks[0] == first and masks[-1] == stop - 1:
                return first, stop
    return None


class _Doubling(torch.autograd.Function):
    """Rows ``[first, stop)`` of ``z [2^M, B, H]``: ``z[0] = z0`` and rows ``[2^m, 2^(m+1))`` = rows ``[0, 2^m)``
    + ``D[m]``, written in place into one buffer; the backward walks the levels back, adding each upper half onto the
    lower one."""

    @staticmethod
    def forward(ctx, z0: Tensor, first: int, stop: int, *D: Tensor) -> Tensor:
        M = len(D)
        B, H = D[0].shape
        z = D[0].new_empty((1 << M, B, H))
        z[0] = z0
        for m, d in enumerate(D):
            torch.add(z[: 1 << m], d, out=z[1 << m : 2 << m])
        ctx.M, ctx.first, ctx.stop = M, first, stop
        return z[first:stop]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        M, first, stop = ctx.M, ctx.first, ctx.stop
        G = g.new_empty((1 << M,) + tuple(g.shape[1:]))
        G[first:stop] = g
        G[:first].zero_()
        G[stop:].zero_()
        dD = [None] * M
        for m in reversed(range(M)):
            upper = G[1 << m : 2 << m]
            dD[m] = upper.sum(0)
            G[: 1 << m] += upper
        return (G[0], None, None, *dD)


def full_preactivation(pieces: Sequence[Tensor], bias: Optional[Tensor], layout: str) -> Tensor:
    """``z`` of the full set ``[B, H]``."""
    if layout == "concat":
        z = torch.cat(list(pieces), dim=1)
    else:
        z = pieces[0]
        for p in pieces[1:]:
            z = z + p
    return z if bias is None else z + bias.to(z.dtype)


def subset_preactivations(
    P: Sequence[Tensor], Q: Sequence[Tensor], bias: Optional[Tensor], layout: str, masks: Sequence[int],
    sel: Tensor,
) -> Tensor:
    """Pre-activations ``[k, B, H]`` of the subsets ``masks``: modality m contributes ``P[m] [B, H_m]`` when present
    and ``Q[m] [1, H_m]`` (its muted value's piece) when absent. ``sel [k, M]`` is the 0/1 presence matrix."""
    M = len(P)
    B = P[0].shape[0]
    if layout == "concat":
        present = sel.bool()
        k = present.shape[0]
        blocks = [torch.where(present[:, m].view(k, 1, 1), P[m].unsqueeze(0), Q[m].unsqueeze(0)) for m in range(M)]
        z = torch.cat(blocks, dim=2)
        return z if bias is None else z + bias.to(z.dtype)
    span = _exhaustive(masks, M)
    if span is not None:
        # Doubling: rows [2^m, 2^(m+1)) are rows [0, 2^m) with modality m's muted piece swapped for its real one.
        z0 = Q[0]
        for q in Q[1:]:
            z0 = z0 + q
        if bias is not None:
            z0 = z0 + bias.to(z0.dtype)
        return _Doubling.apply(z0.expand(B, z0.shape[1]), *span, *[P[m] - Q[m] for m in range(M)])
    H = P[0].shape[1]
    stacked = torch.stack(list(P)).reshape(M, B * H)
    out = (sel @ stacked).reshape(sel.shape[0], B, H) + ((1 - sel) @ torch.cat(list(Q))).unsqueeze(1)
    return out if bias is None else out + bias.to(out.dtype)
