"""Diagnosing & Re-learning's maths: min-max scaling, k-means on the device, purity, the re-learning weights."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ... import sharding

__all__ = ["minmax_scale", "kmeans", "purity", "relearn_weights", "soft_reinit_"]


def minmax_scale(x: Tensor) -> Tensor:
    """Each column of ``x`` ``[N, D]`` mapped onto [-1, 1] by its own min and max (a constant column: -1)."""
    lo, hi = x.min(0).values, x.max(0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return (x - lo) / span * 2 - 1


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=gen, device=gen.device).to(x.device)
    centers = [x[first[0]]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if not bool(total > 0):
            idx = torch.randint(n, (1,), generator=gen, device=gen.device).to(x.device)[0]
        else:
            u = torch.rand((), generator=gen, device=gen.device).to(x.device) * total
            idx = torch.searchsorted(torch.cumsum(d2, 0), u).clamp(max=n - 1)
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centers)


def kmeans(x: Tensor, k: int, restarts: int = 10, iters: int = 300, seed: int = 0, tol: float = 1e-4,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Cluster labels ``[N]`` (int64) of ``x`` ``[N, D]`` into ``k`` clusters, on ``x``'s device.

    Lloyd's iterations from k-means++ starts (squared-distance sampling), ``restarts`` times; the labels of the
    lowest inertia win. A start stops when the centres move by at most ``tol`` times the mean per-column variance
    (squared), as scikit-learn's default. An empty cluster keeps its centre.
    """
    x = x.float()
    n = x.shape[0]
    k = min(k, n)
    gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(seed)
    limit = tol * float(x.var(0, unbiased=False).mean())
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centers = _kmeans_pp(x, k, gen)
        for _ in range(iters):
            labels = torch.cdist(x, centers).argmin(1)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            new = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], centers)
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= limit:
                break
        labels = torch.cdist(x, centers).argmin(1)
        inertia = float(((x - centers[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def purity(labels: Tensor, clusters: Tensor) -> Tensor:
    """The share of rows whose label is their cluster's most frequent one (``[]`` float32)."""
    L = int(labels.max()) + 1
    K = int(clusters.max()) + 1
    table = torch.bincount(clusters * L + labels, minlength=K * L).view(K, L)
    return table.max(1).values.sum().float() / labels.numel()


def relearn_weights(train_purity: Tensor, val_purity: Tensor, move_lambda: float) -> Tensor:
    """``w_m = tanh(move_lambda * |train_purity_m - val_purity_m|)``, ``[M]``."""
    return torch.tanh(move_lambda * (train_purity - val_purity).abs())


def _local(t: Tensor, p: Tensor, i: int) -> Tensor:
    # theta_0 of a parameter sharded by FSDP2 is a shard of the same layout: the update is element-wise on shards.
    if sharding.is_sharded(p) != sharding.is_sharded(t) or (sharding.is_sharded(p) and (
            t.placements != p.placements or t.device_mesh != p.device_mesh or t.shape != p.shape)):
        got = f"placements {tuple(t.placements)}" if sharding.is_sharded(t) else f"a whole {type(t).__name__}"
        want = f"placements {tuple(p.placements)}" if sharding.is_sharded(p) else "a whole tensor"
        raise ValueError(f"initial[{i}]: expected theta_0 laid out as its parameter ({want}; build the method after "
                         f"fully_shard), got {got}")
    return t.to_local() if sharding.is_sharded(t) else t


def soft_reinit_(params: Sequence[Tensor], initial: Sequence[Tensor], w: float) -> None:
    """``theta <- w theta_0 + (1 - w) theta`` in place, for every parameter (one multi-tensor op); parameters sharded
    by FSDP2 with theta_0 sharded alike, on the local shards."""
    with torch.no_grad():
        theta0 = [_local(t, p, i) for i, (t, p) in enumerate(zip(initial, params))]
        params = [p.to_local() if sharding.is_sharded(p) else p.data for p in params]
        torch._foreach_lerp_(params, [t.to(p.device, p.dtype) for t, p in zip(theta0, params)], float(w))
