"""AMSS / AMSS+'s arithmetic: the per-modality keep ratios c_m and the channel masking of one weight gradient.

:func:`keep_ratios` runs on the device without host reads; under data parallelism :func:`keep_ratio_sums` gives the
per-rank sums and counts that :func:`keep_ratios_from_sums` turns into the global batch's ratios. :func:`channel_mask`
needs the kept count as a Python int (``ceil(C * c_m)``). docs/methods.md (section 13) has the formulas and the
released code's quirks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["keep_ratios", "keep_ratio_sums", "keep_ratios_from_sums", "channel_energy", "channel_mask", "mask_channels",
           "kept_count"]


def _label_term(target: Tensor, num_classes: int) -> Tensor:
    """-sum_c p_c log softmax(p)_c over the classes 0..max(target), p the batch's label frequencies."""
    counts = torch.zeros(num_classes, dtype=torch.float32, device=target.device)
    counts.scatter_add_(0, target, torch.ones_like(target, dtype=torch.float32))
    p = counts / target.numel()
    present = torch.arange(num_classes, device=target.device) <= target.max()
    logp = torch.log_softmax(p.masked_fill(~present, float("-inf")), dim=0)
    return -torch.where(present, p * logp, torch.zeros_like(p)).sum()


def keep_ratios(unimodal_logits: Tensor, features: Sequence[Tensor], target: Tensor, temperature: float,
                offset: float = 0.5) -> Tuple[Tensor, Tensor]:
    """The fraction of channels each modality keeps.

    Args:
        unimodal_logits: ``[M, B, C]`` per-modality logits (detached).
        features: M tensors ``[B, d_m]`` (detached).
        target: ``[B]`` int64 class indices.
        temperature: T.
        offset: added to the ratio numerators (0.5).

    Returns:
        ``(c, ratio)``: ``[M]`` float32 keep ratios and ``[M]`` float32 ratios (ones in the fallback).
    """
    M, _, C = unimodal_logits.shape
    logits = unimodal_logits.float()
    hy = _label_term(target, C)
    scores = torch.stack([-F.cross_entropy(logits[m], target) for m in range(M)])
    ent = torch.stack([F.cross_entropy(z.float(), torch.softmax(z.float(), dim=1)) for z in features])
    return _ratios(scores, hy, ent, temperature, offset)


def keep_ratio_sums(unimodal_logits: Tensor, features: Sequence[Tensor], target: Tensor) -> Tensor:
    """What :func:`keep_ratios` needs from a shard of the batch, as sums: ``[C + 2M]`` float32, the label counts
    ``[C]``, then the M cross-entropy sums and the M feature-entropy sums. Summed over the ranks, they give
    :func:`keep_ratios_from_sums` the global batch (unequal local batches included)."""
    M, _, C = unimodal_logits.shape
    logits = unimodal_logits.float()
    counts = torch.zeros(C, dtype=torch.float32, device=target.device)
    counts.scatter_add_(0, target, torch.ones_like(target, dtype=torch.float32))
    ce = [F.cross_entropy(logits[m], target, reduction="sum") for m in range(M)]
    ent = [F.cross_entropy(z.float(), torch.softmax(z.float(), dim=1), reduction="sum") for z in features]
    return torch.cat([counts, torch.stack(ce + ent).to(counts.device)])


def keep_ratios_from_sums(sums: Tensor, num_modalities: int, temperature: float,
                          offset: float = 0.5) -> Tuple[Tensor, Tensor]:
    """:func:`keep_ratios` from :func:`keep_ratio_sums` added over the ranks (batch means = sums / global count)."""
    M = num_modalities
    counts, ce, ent = sums[:-2 * M], sums[-2 * M:-M], sums[-M:]
    n = counts.sum()
    p = counts / n
    classes = torch.arange(counts.numel(), device=counts.device)
    present = classes <= torch.where(counts > 0, classes, torch.zeros_like(classes)).max()
    logp = torch.log_softmax(p.masked_fill(~present, float("-inf")), dim=0)
    hy = -torch.where(present, p * logp, torch.zeros_like(p)).sum()
    return _ratios(-ce / n, hy, ent / n, temperature, offset)


def _ratios(scores: Tensor, hy: Tensor, ent: Tensor, temperature: float, offset: float) -> Tuple[Tensor, Tensor]:
    M = scores.numel()
    num = scores + hy + offset
    ratio = num / ent
    e = torch.exp(ratio / temperature)                       # plain exp as the released code: overflow -> nan -> 0.5
    eye = torch.eye(M, dtype=torch.bool, device=e.device)
    others = torch.where(eye, torch.zeros_like(e).expand(M, M), e.expand(M, M)).sum(dim=1)
    c = others / e.sum()                                     # 1 - softmax(t)_m, for M = 2 exactly e_other / sum
    c = torch.where(torch.isnan(c), torch.full_like(c, 0.5), c.clamp(0.1, 0.9))
    fallback = (num <= 0).any()
    c = torch.where(fallback, torch.full_like(c, 0.5), c)
    ratio = torch.where(fallback, torch.ones_like(ratio), ratio)
    return c, ratio


def channel_energy(grad: Tensor, weight: Tensor, energy: str = "gn") -> Tensor:
    """``[C]`` float32 gradient energy per output channel (dim 0)."""
    dims = tuple(range(1, grad.dim()))
    g = grad.float()
    gn = (g * g).sum(dim=dims)
    if energy == "gn_wn":
        w = weight.detach().float()
        return gn / (w * w).sum(dim=dims)
    if energy == "sqrt_gn":
        return gn.sqrt()
    return gn


def mask_channels(grad: Tensor, mu: Tensor, k: int, nonzero: int, *, sample: bool, plus: bool,
                  generator: Optional[torch.Generator]) -> Tensor:
    """Keep ``k`` output channels of ``grad`` in place (zero the others); returns the ``[C]`` float32 mask
    (:func:`channel_mask`)."""
    mask = channel_mask(mu, k, nonzero, sample=sample, plus=plus, generator=generator)
    grad.mul_(mask.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))))
    return mask


def channel_mask(mu: Tensor, k: int, nonzero: int, *, sample: bool, plus: bool,
                 generator: Optional[torch.Generator]) -> Tensor:
    """The ``[C]`` float32 factors of the output channels whose energies are ``mu``: ``k`` of them non-zero.

    ``sample``: draw without replacement in proportion to ``mu`` (``torch.multinomial``); else the top-k of ``mu``.
    ``plus``: kept channels scaled by ``1 / (q_o + 1 / C)`` (sampling only). ``nonzero``: channels with ``mu > 0``;
    when it is below ``k`` every such channel is kept (the other channels have zero gradient); none: all ones.
    """
    C = mu.numel()
    q = mu / mu.sum()
    mask = torch.zeros_like(mu)
    if sample:
        n = min(k, nonzero)
        if n <= 0:
            return torch.ones_like(mu)                      # all-zero gradient: nothing to mask
        idx = torch.multinomial(q, n, replacement=False, generator=generator)
    else:
        idx = torch.topk(mu, min(k, C)).indices
    if plus and sample:
        mask[idx] = 1 / (q[idx] + 1 / C)
    else:
        mask[idx] = 1
    return mask


def kept_count(channels: int, c: float) -> int:
    """``ceil(C * c)`` with ``c`` the float32 value as a Python float (0.1 keeps 2 of 10 channels)."""
    return math.ceil(channels * c)
