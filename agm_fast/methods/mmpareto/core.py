"""MMPareto's gradient integration: per encoder, the multimodal gradient g_mm and the unimodal one g_u become
``scale * max(1, ||g_mm + g_u|| / ||h||) * h`` with ``h = 2 (w g_mm + (1 - w) g_u)`` (docs/methods.md).

Everything runs on the device, without a host sync: the branch on the cosine is a ``torch.where`` and the per-tensor
work is multi-tensor (``torch._foreach_*``) over an encoder's gradients. On FSDP2 shards the inner products come from
:func:`tensor_stats` summed over the shards (``stats=``), and the norms from them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["combine_", "pareto_weights", "tensor_stats"]

# torch.nn.functional.cosine_similarity's default eps.
COS_EPS = 1e-8


def pareto_weights(a: Tensor, b: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The weight of g_mm per encoder from the inner products.

    Args:
        a: ``[M]`` <g_mm, g_mm>.
        b: ``[M]`` <g_mm, g_u>.
        c: ``[M]`` <g_u, g_u>.

    Returns:
        ``(cos, weight, pareto)``, each ``[M]``: the cosine of g_mm and g_u; the weight w of g_mm (1/2 where
        cos > 0, else the two-objective min-norm weight, clamped to 0.999 / 0.001 at the ends); and whether the
        min-norm branch ran (cos <= 0 or NaN).
    """
    cos = b / (a.sqrt().clamp_min(COS_EPS) * c.sqrt().clamp_min(COS_EPS))
    pareto = ~(cos > 0)
    min_norm = torch.where(b >= a, 0.999, torch.where(b >= c, 0.001, (c - b) / (a + c - 2 * b)))
    return cos, torch.where(pareto, min_norm, 0.5), pareto


def _acc_dtype(grads: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _dots(x: Sequence[Tensor], y: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    # One reduction per tensor and no copy of the gradients (a _foreach_mul would allocate one).
    return torch.stack([torch.dot(u.reshape(-1).to(dtype), v.reshape(-1).to(dtype)) for u, v in zip(x, y)])


def _sq(norms: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(norms)).square()


@torch.no_grad()
def tensor_stats(g_mm: Sequence[List[Tensor]], g_u: Sequence[List[Tensor]]) -> Tensor:
    """``[3, T]`` float64: ``<g_mm, g_mm>``, ``<g_mm, g_u>`` and ``<g_u, g_u>`` of each of the T tensors (the encoders'
    tensors in order); on shards, the shard's part of each sum."""
    G = [t for ts in g_mm for t in ts]
    U = [t for ts in g_u for t in ts]
    if not G:
        return torch.zeros(3, 0, dtype=torch.float64)
    dt = _acc_dtype(G)
    return torch.stack([_sq(torch._foreach_norm(G, 2, dtype=torch.float64)),
                        _dots(G, U, dt).to(torch.float64),
                        _sq(torch._foreach_norm(U, 2, dtype=torch.float64))])


@torch.no_grad()
def combine_(g_mm: Sequence[List[Tensor]], g_u: Sequence[List[Tensor]], *, scale: float = 1.5,
             rescale: str = "tensor", stats: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Replace each encoder's multimodal gradients by MMPareto's combination, in place.

    Args:
        g_mm: per encoder, its gradients of the multimodal loss (the ``.grad`` tensors, overwritten).
        g_u: per encoder, its gradients of its unimodal loss, aligned with ``g_mm`` (used as scratch: overwritten).
        scale: the factor on every combined gradient (the reference: 1.5).
        rescale: ``"tensor"`` (the reference), ``"encoder"`` or ``"none"``: where the norm of the combination is
            raised to that of ``g_mm + g_u`` when it is smaller.
        stats: the :func:`tensor_stats` of the whole gradients when ``g_mm`` and ``g_u`` are shards of them (summed
            over the shards); the weights and every norm then come from these sums (None: from the tensors).

    Returns:
        ``(cos, weight, pareto, rescaled)``, each ``[M]``: as :func:`pareto_weights`, and the fraction of the
        encoder's tensors whose norm was raised (float32).
    """
    M = len(g_mm)
    dev = next((t.device for ts in g_mm for t in ts), torch.device("cpu"))
    per: List[Tensor] = []
    if stats is not None:
        # Per encoder, its tensors' [3, T_m] sums; the encoder's sums are theirs.
        per = list(stats.to(dev).split([len(G) for G in g_mm], dim=1))
        enc = torch.stack([p.sum(1) for p in per], 1) if M else stats.new_zeros(3, 0)
    else:
        enc = torch.zeros(3, M, dtype=torch.float64 if any(_acc_dtype(ts) == torch.float64 for ts in g_mm)
                          else torch.float32, device=dev)
        for m, (G, U) in enumerate(zip(g_mm, g_u)):
            if not G:
                continue
            dt = _acc_dtype(G)
            enc[0, m] = _sq(torch._foreach_norm(G, 2, dtype=dt)).sum()
            enc[1, m] = _dots(G, U, dt).sum()
            enc[2, m] = _sq(torch._foreach_norm(U, 2, dtype=dt)).sum()
    cos, weight, pareto = pareto_weights(enc[0], enc[1], enc[2])
    # h = 2 w g_mm + 2 (1 - w) g_u = (alpha - beta) g_mm + beta (g_mm + g_u), built in the .grad tensors with g_u as
    # the only other buffer; at w = 1/2 it is g_mm + g_u exactly.
    beta = 2 * (1 - weight)
    diff = 2 * weight - beta
    rescaled = torch.zeros(M, dtype=torch.float32, device=dev)
    for m, (G, U) in enumerate(zip(g_mm, g_u)):
        if not G:
            continue
        dt = _acc_dtype(G)
        torch._foreach_add_(U, G)
        if stats is None:
            n_sum = torch.stack(torch._foreach_norm(U, 2, dtype=dt))
        else:
            # ||g_mm + g_u||^2 = a + 2b + c and ||h||^2 = 4 w^2 a + 8 w (1 - w) b + 4 (1 - w)^2 c per tensor.
            a, b, c = per[m]
            w = weight[m]
            n_sum = (a + 2 * b + c).clamp_min(0).sqrt()
            n_h_sharded = (4 * w * w * a + 8 * w * (1 - w) * b + 4 * (1 - w) ** 2 * c).clamp_min(0).sqrt()
        torch._foreach_mul_(G, diff[m])
        torch._foreach_mul_(U, beta[m])
        torch._foreach_add_(G, U)
        if rescale == "none":
            if scale != 1.0:
                torch._foreach_mul_(G, scale)
            continue
        n_h = torch.stack(torch._foreach_norm(G, 2, dtype=dt)) if stats is None else n_h_sharded
        if rescale == "tensor":
            ratio = n_sum / n_h
        else:
            ratio = n_sum.square().sum().sqrt() / n_h.square().sum().sqrt()
        up = ratio > 1
        rescaled[m] = up.to(torch.float32).mean()
        factor = torch.where(up, ratio, 1.0) * scale
        if stats is not None:
            factor = factor.to(G[0].dtype)
        if rescale == "tensor":
            torch._foreach_mul_(G, list(factor.unbind()))
        else:
            torch._foreach_mul_(G, factor)
    return cos.to(torch.float32), weight.to(torch.float32), pareto, rescaled
