"""Subsets of modalities (coalitions) and their Shapley weights: the maths AGM's ops and metrics share.

A subset of the M modalities is an int bitmask (bit m set = modality m present); the full set is ``2^M - 1``.
``W [M, S]`` weights a stack of subset outputs ``F [S, B, C]`` into mono-modal outputs ``psi[m] = sum_s W[m, s] F[s]``
(docs/methods.md, section 1.3).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "MAX_EXACT_MODALITIES",
    "check_modalities",
    "full_mask",
    "mean_of_others",
    "sampled_shapley_weights",
    "shapley_weights",
    "stratified_shapley_variance",
    "stratified_shapley_weights",
    "subset_masks",
]

# The exact variants evaluate all 2^M subsets.
MAX_EXACT_MODALITIES = 8


def full_mask(num_modalities: int) -> int:
    """Bitmask of the full modality set A."""
    return (1 << num_modalities) - 1


def subset_masks(num_modalities: int, shapley: str = "reference") -> List[int]:
    """The subsets whose outputs the exact Shapley combination needs, in ascending mask order.

    Args:
        num_modalities: M.
        shapley: ``"reference"`` (every non-empty subset, 2^M - 1 of them) or ``"exact"`` (all 2^M, with the empty).

    Returns:
        A list of int bitmasks.
    """
    start = 1 if shapley == "reference" else 0
    return list(range(start, 1 << num_modalities))


def _coalition_weight(num_modalities: int, size: int) -> float:
    return math.factorial(size) * math.factorial(num_modalities - size - 1) / math.factorial(num_modalities)


def shapley_weights(num_modalities: int, masks: Sequence[int], dtype=torch.float64) -> Tensor:
    """Exact Shapley weights ``W [M, S]`` over the given subsets.

    For ``masks`` = all 2^M subsets this is the exact Shapley value phi. Leaving out the empty subset (mask 0) gives
    the reference variant psi = phi + f(empty)/M, whose sum over modalities is f(A).

    Args:
        num_modalities: M.
        masks: the subsets (bitmasks) that the columns stand for.
        dtype: dtype of the result.

    Returns:
        ``[M, len(masks)]`` tensor on the CPU.
    """
    w = torch.zeros(num_modalities, len(masks), dtype=torch.float64)
    for s, mask in enumerate(masks):
        size = bin(mask).count("1")
        for m in range(num_modalities):
            if mask >> m & 1:
                w[m, s] = _coalition_weight(num_modalities, size - 1)
            else:
                w[m, s] = -_coalition_weight(num_modalities, size) if size < num_modalities else 0.0
    return w.to(dtype)


def sampled_shapley_weights(
    num_modalities: int, num_permutations: int, generator: torch.Generator, include_empty: bool = False
) -> Tuple[List[int], Tensor]:
    """Permutation-sampling Shapley estimate as a weight matrix over the subsets it visits.

    Each sampled permutation adds, for every modality m, ``f(prefix + m) - f(prefix)`` divided by the number of
    permutations. With ``include_empty=False`` the empty coalition's output counts as zero (the reference variant:
    the estimates then sum to f(A) exactly); with True it is evaluated (an estimate of phi).

    Args:
        num_modalities: M.
        num_permutations: P, the number of permutations drawn.
        generator: a CPU ``torch.Generator`` (seeded by the caller) that draws the permutations.
        include_empty: whether f(empty) is part of the estimate.

    Returns:
        ``(masks, W)``: the visited subsets in ascending order and the ``[M, S]`` float64 weights.
    """
    perms = [torch.randperm(num_modalities, generator=generator).tolist() for _ in range(num_permutations)]
    acc = {}
    for perm in perms:
        prefix = 0
        for m in perm:
            with_m = prefix | (1 << m)
            acc[(m, with_m)] = acc.get((m, with_m), 0) + 1
            if prefix != 0 or include_empty:
                acc[(m, prefix)] = acc.get((m, prefix), 0) - 1
            prefix = with_m
    masks = sorted({mask for _, mask in acc})
    col = {mask: i for i, mask in enumerate(masks)}
    w = torch.zeros(num_modalities, len(masks), dtype=torch.float64)
    for (m, mask), count in acc.items():
        w[m, col[mask]] += count / num_permutations
    return masks, w


def stratified_shapley_weights(
    num_modalities: int, rounds: int, generator: torch.Generator, include_empty: bool = False
) -> Tuple[List[int], Tensor, Tensor]:
    """Stratified Shapley estimate that evaluates each distinct subset once (docs/methods.md, section 5).

    phi_m is (1/M) times the sum over sizes k of [mean f over k+1-subsets holding m] - [mean f over k-subsets without
    m]. Each round draws, for every size k in 1..M-1, one random permutation and takes its M cyclic windows of length
    k: every modality lies in exactly k of them, and given that, each is a uniform k-subset, so each round's estimate
    is unbiased. Sizes 1 and M-1 are then enumerated whole, f(A) is exact, and f(empty) counts as zero unless
    ``include_empty``. A subset drawn twice is evaluated once. The variance of the mean over rounds is estimated by
    :func:`stratified_shapley_variance` from the per-round weights.

    Args:
        num_modalities: M (>= 2).
        rounds: r >= 2 independent rounds (each at most M (M - 1) + 1 subsets).
        generator: a CPU ``torch.Generator`` (seeded by the caller).
        include_empty: whether f(empty) is evaluated (an estimate of phi) or counts as zero (of psi).

    Returns:
        ``(masks, W [M, S], W_rounds [r, M, S])`` float64; ``W`` is the mean of ``W_rounds``.
    """
    M = num_modalities
    full = (1 << M) - 1
    per_round = []
    for _ in range(rounds):
        acc = {full: [1.0 / M] * M}
        if include_empty:
            acc[0] = [-1.0 / M] * M
        for k in range(1, M):
            perm = torch.randperm(M, generator=generator).tolist()
            for i in range(M):
                mask = 0
                for j in range(k):
                    mask |= 1 << perm[(i + j) % M]
                w = acc.setdefault(mask, [0.0] * M)
                for m in range(M):
                    w[m] += 1.0 / (M * k) if mask >> m & 1 else -1.0 / (M * (M - k))
        per_round.append(acc)
    masks = sorted({mask for acc in per_round for mask in acc})
    col = {mask: i for i, mask in enumerate(masks)}
    W_rounds = torch.zeros(rounds, M, len(masks), dtype=torch.float64)
    for r, acc in enumerate(per_round):
        for mask, w in acc.items():
            W_rounds[r, :, col[mask]] = torch.tensor(w, dtype=torch.float64)
    return masks, W_rounds.mean(0), W_rounds


def stratified_shapley_variance(F: Tensor, W_rounds: Tensor) -> Tensor:
    """Estimated variance of the stratified estimate ``W F`` (the mean over rounds): the sample variance of the
    per-round estimates over r, ``[M, ...]`` for ``F [S, ...]``."""
    est = torch.einsum("rms,s...->rm...", W_rounds.to(F.dtype), F)
    r = W_rounds.shape[0]
    return est.var(dim=0, unbiased=True) / r


def mean_of_others(values: Tensor) -> Tensor:
    """``[M]``: entry m is the mean of every entry but m, ``(sum_j v_j - v_m) / (M - 1)`` (the leave-one-out mean that
    AGM's ratios, OGM's M > 2 rule and OPM's drop probabilities compare each modality with)."""
    return (values.sum() - values) / (values.shape[0] - 1)


def check_modalities(num_modalities: int, shapley: str) -> int:
    """M, checked: an int >= 2, and at most :data:`MAX_EXACT_MODALITIES` unless ``shapley`` is ``"sampled"`` or
    ``"stratified"``."""
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, int):
        raise TypeError(f"num_modalities: expected an int, got {type(num_modalities).__name__}")
    if num_modalities < 2:
        raise ValueError(f"num_modalities: AGM needs at least two modalities (M >= 2), got {num_modalities}")
    if shapley not in ("sampled", "stratified") and num_modalities > MAX_EXACT_MODALITIES:
        raise ValueError(
            f"num_modalities: shapley={shapley!r} evaluates all 2^M subsets and supports M <= "
            f"{MAX_EXACT_MODALITIES}, got M = {num_modalities}; use shapley='sampled' or 'stratified'"
        )
    return num_modalities
