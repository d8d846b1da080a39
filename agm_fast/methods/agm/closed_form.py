"""AGM's closed form for an additive head (docs/methods.md, section 5): f(S) from per-modality pieces ``[B, C]``.

A fusion that is an ``nn.Linear`` over the concatenated features, or has ``contributions(*features) -> (pieces,
bias)`` with ``fusion(*features) == sum(pieces) + bias``, gives every subset's output as the bias plus, per modality,
the piece of its real or of its muted features: no head call per subset.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


def contributions(fusion: nn.Module, features: Sequence[Tensor], rows: int, M: int,
                  check_out: Callable[..., Tensor]) -> Tuple[List[Tensor], Optional[Tensor]]:
    """The head's pieces ``[rows, C]`` on M features ``[rows, d_m]``, and its bias (or None)."""
    if isinstance(fusion, nn.Linear):
        dims = []
        for m, f in enumerate(features):
            if f.dim() != 2:
                raise ValueError(
                    f"encoders[{m}]: expected features [B, d_m] (an nn.Linear fusion runs on their "
                    f"concatenation), got shape {tuple(f.shape)}"
                )
            dims.append(f.shape[1])
        if sum(dims) != fusion.in_features:
            raise ValueError(
                f"fusion: expected an nn.Linear with in_features={sum(dims)} (the features' dims {dims}), got "
                f"in_features={fusion.in_features}"
            )
        pieces, off = [], 0
        for f, d in zip(features, dims):
            pieces.append(nn.functional.linear(f, fusion.weight[:, off : off + d]))
            off += d
        return pieces, fusion.bias
    result = fusion.contributions(*features)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(
            "fusion.contributions: expected to return (list of M tensors [B, C], bias [C] or None), got "
            f"{type(result).__name__}"
        )
    pieces, bias = result
    if len(pieces) != M:
        raise ValueError(f"fusion.contributions: expected one piece per modality ({M}), got {len(pieces)} pieces")
    for m, p in enumerate(pieces):
        check_out(p, rows, None, f"fusion.contributions (piece {m})")
    return list(pieces), bias


def assemble(P: Sequence[Tensor], Q: Sequence[Tensor], bias: Optional[Tensor], sel: Tensor, B: int) -> Tensor:
    """``bias + sum_m (P[m] if m in S else Q[m])`` for every subset S, a row of the 0/1 presence matrix ``sel [k, M]``:
    ``[k, B, C]`` from pieces ``P[m] [B, C]`` and ``Q[m] [1, C]``."""
    C = P[0].shape[1]
    P = torch.stack(list(P))
    Q = torch.cat(list(Q))
    out = (sel @ P.reshape(P.shape[0], -1)).reshape(sel.shape[0], B, C) + ((1 - sel) @ Q).unsqueeze(1)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out
