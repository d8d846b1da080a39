"""Pure-PyTorch ground truth for every op of agm_fast, written from the specification.

These functions are what the Triton kernels and the C++ extension are tested against, and they are the CPU
fallback: vectorised, no Python loop over the batch, no ``.item()``.

Conventions used throughout:
    M    number of modalities, indexed 0..M-1 in the order the user passes them.
    mask a subset of modalities as an int bitmask (bit m set = modality m present); the full set is 2^M - 1.
    F    stacked subset logits ``[S, B, C]``, row s holding f(masks[s]).
    W    Shapley weights ``[M, S]``: the mono-modal output of modality m is ``psi[m] = sum_s W[m, s] F[s]``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "LOG_PROB_FLOOR",
    "full_mask",
    "subset_masks",
    "shapley_weights",
    "sampled_shapley_weights",
    "subset_batch_ref",
    "shapley_ref",
    "agm_scores_ref",
    "agm_coefficients_ref",
    "shapley_scores_ref",
    "shapley_combine_ref",
    "ogm_coefficients_ref",
    "ogm_scores_ref",
    "philox4x32_ref",
    "philox_normal_ref",
    "ogm_ge_ref",
]

# The reference clamps the softmax probability at 1e-8 before the log.
LOG_PROB_FLOOR = math.log(1e-8)

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


def subset_batch_ref(xs: Sequence[Tensor], masks: Sequence[int], mutes: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """Stack every subset's version of each modality along the batch.

    Args:
        xs: M tensors ``[B, ...]`` (inputs or features; shapes may differ between modalities, B may not).
        masks: S subset bitmasks.
        mutes: per modality, the muted value ``[...]`` (one sample, broadcast over the batch), or None for zeros.

    Returns:
        M tensors ``[S * B, ...]``: block s of modality m is ``xs[m]`` when bit m of ``masks[s]`` is set, else the
        muted value. Differentiable with respect to ``xs`` and ``mutes``.
    """
    out = []
    for m, x in enumerate(xs):
        mute = mutes[m] if mutes is not None else None
        muted = x.new_zeros(()).expand_as(x) if mute is None else mute.to(x.dtype).expand_as(x)
        out.append(torch.cat([x if (mask >> m) & 1 else muted for mask in masks], dim=0))
    return out


def shapley_ref(F: Tensor, W: Tensor) -> Tensor:
    """Mono-modal outputs ``psi[m] = sum_s W[m, s] F[s]``, accumulated in float32.

    Args:
        F: ``[S, B, C]`` subset logits (any float dtype).
        W: ``[M, S]`` weights.

    Returns:
        ``[M, B, C]`` in F's dtype.
    """
    return torch.einsum("ms,sbc->mbc", W.to(torch.float32), F.to(torch.float32)).to(F.dtype)


def agm_scores_ref(psi: Tensor, labels: Tensor, task: str = "classification") -> Tensor:
    """Per-modality batch scores of AGM.

    Classification: ``s_m = mean_b -log(max(softmax(psi_m)[b, y_b], 1e-8))``. Regression (beyond the reference):
    ``s_m = mean((psi_m - y)^2)``. A modality whose outputs hold a non-finite value gets a NaN score.

    Args:
        psi: ``[M, B, C]`` mono-modal outputs.
        labels: ``[B]`` int64 class indices (classification) or ``[B]`` / ``[B, C]`` float targets (regression).
        task: ``"classification"`` or ``"regression"``.

    Returns:
        ``[M]`` float32 scores.
    """
    x = psi.to(torch.float32)
    if task == "regression":
        y = labels.to(torch.float32).reshape(1, x.shape[1], -1).expand_as(x)
        return ((x - y) ** 2).mean(dim=(1, 2))
    logp = torch.log_softmax(x, dim=-1)
    idx = labels.view(1, -1, 1).expand(x.shape[0], -1, 1)
    at_label = logp.gather(-1, idx).squeeze(-1)
    # NaN for a row with any non-finite logit (x - x is 0 for finite x), as softmax would give.
    poison = (x - x).sum(-1)
    return (-torch.clamp(at_label, min=LOG_PROB_FLOOR) + poison).mean(dim=1)


def agm_coefficients_ref(
    scores: Tensor,
    running: Tensor,
    count: Tensor,
    prev_coeffs: Tensor,
    alpha: float,
    cap: Optional[float],
    in_window: bool,
    hold_last: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """AGM coefficients and the running-mean update of one step.

    ``r_m = exp(mean_{j!=m} s_j - s_m)``, ``rbar_m`` the same on the running means S (before this step's update),
    ``c_m = exp(alpha * min(rbar_m - r_m, cap))``; outside the window ``c = 1`` (or the previous coefficients with
    ``hold_last``, the reference behaviour). ``S <- S t/(t+1) + s/(t+1)``, ``t <- t+1``, every step; a step whose
    scores are not all finite leaves S and t unchanged (its coefficients are NaN, so an AMP step that is skipped
    leaves the state as it was).

    Args:
        scores: ``[M]`` this step's scores.
        running: ``[M]`` running means S before this step.
        count: ``[]`` or ``[1]`` steps done before this one (t), float32.
        prev_coeffs: ``[M]`` the last step's coefficients (used with ``hold_last``).
        alpha: the modulation strength.
        cap: upper bound on ``rbar - r``, or None.
        in_window: whether this step lies in the modulation window.
        hold_last: outside the window, keep ``prev_coeffs`` instead of 1.

    Returns:
        ``(running_new [M], count_new (count's shape), coeffs [M])``, float32.
    """
    s = scores.to(torch.float32)
    S = running.to(torch.float32)
    others = mean_of_others(s)
    others_run = mean_of_others(S)
    diff = torch.exp(others_run - S) - torch.exp(others - s)
    if cap is not None:
        diff = torch.clamp(diff, max=cap)
    coeffs = torch.exp(alpha * diff)
    if not in_window:
        coeffs = prev_coeffs.to(torch.float32).clone() if hold_last else torch.ones_like(coeffs)
        coeffs = torch.where(torch.isfinite(s).all(), coeffs, torch.full_like(coeffs, float("nan")))
    t = count.to(torch.float32)
    new_running = S * (t / (t + 1)) + s / (t + 1)
    ok = torch.isfinite(s).all()
    running_new = torch.where(ok, new_running, S)
    count_new = torch.where(ok, t + 1, t)
    return running_new, count_new, coeffs


def shapley_scores_ref(
    F: Tensor,
    W: Tensor,
    labels: Tensor,
    running: Tensor,
    count: Tensor,
    prev_coeffs: Tensor,
    alpha: float,
    cap: Optional[float],
    in_window: bool,
    hold_last: bool = False,
    task: str = "classification",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole AGM step on subset logits: mono-modal outputs, scores, running means and coefficients.

    Args:
        F: ``[S, B, C]`` subset logits.
        W: ``[M, S]`` Shapley weights (:func:`shapley_weights`).
        labels, task: as :func:`agm_scores_ref`.
        running, count, prev_coeffs, alpha, cap, in_window, hold_last: as :func:`agm_coefficients_ref`.

    Returns:
        ``(psi [M, B, C] in F's dtype, scores [M], running_new [M], count_new, coeffs [M])``.
    """
    psi = shapley_ref(F, W)
    scores = agm_scores_ref(psi, labels, task)
    running_new, count_new, coeffs = agm_coefficients_ref(
        scores, running, count, prev_coeffs, alpha, cap, in_window, hold_last
    )
    return psi, scores, running_new, count_new, coeffs


def shapley_combine_ref(F: Tensor, W: Tensor, coeffs: Tensor, full_index: int) -> Tensor:
    """Loss logits of AGM: value ``f(A) = F[full_index]``, gradient routed through the scaled mono-modal outputs.

    ``out = sum_m c_m psi_m + stopgrad(f(A) - sum_m c_m psi_m)``, so ``dF[s] = (sum_m c_m W[m, s]) * g``.

    Args:
        F: ``[S, B, C]`` subset logits.
        W: ``[M, S]`` Shapley weights.
        coeffs: ``[M]`` coefficients (treated as constants).
        full_index: the row of F that holds the full set.

    Returns:
        ``[B, C]`` in F's dtype.
    """
    v = (coeffs.detach().to(torch.float32) @ W.to(torch.float32)).to(F.dtype)
    scaled = torch.einsum("s,sbc->bc", v, F)
    return scaled + (F[full_index] - scaled).detach()


def mean_of_others(values: Tensor) -> Tensor:
    """``[M]``: entry m is the mean of every entry but m, ``(sum_j v_j - v_m) / (M - 1)`` (the leave-one-out mean that
    AGM's ratios, OGM's M > 2 rule and OPM's drop probabilities compare each modality with)."""
    return (values.sum() - values) / (values.shape[0] - 1)


def ogm_damped_ref(scores: Tensor, journal: bool = False) -> Tensor:
    """``[M]`` bool: which modalities OGM damps (the dominant ones).

    M = 2, CVPR code: modality 1 when ``s_1 / s_0 > 1``, else modality 0, so a tie damps modality 0. M = 2, journal
    code (``journal=True``): modality 0 when ``s_0 / s_1 > 1``, else modality 1, so a tie damps modality 1. M > 2:
    every m with ``s_m / mean_{j != m} s_j > 1`` (no modality on an exact tie).
    """
    s = scores.to(torch.float32)
    if s.shape[0] == 2:
        if journal:
            damp0 = s[0] / s[1] > 1
            return torch.stack([damp0, ~damp0])
        damp1 = s[1] / s[0] > 1
        return torch.stack([~damp1, damp1])
    return s / mean_of_others(s) > 1


def ogm_coefficients_ref(
    scores: Tensor,
    alpha: float,
    continuous: bool = False,
    journal: bool = False,
    plus_factor: Optional[float] = None,
) -> Tensor:
    """OGM coefficients from per-modality scores (docs/methods.md, sections 2 and 3).

    M = 2: the damped modality m (see :func:`ogm_damped_ref`; the tie rule follows ``journal``) gets
    ``1 - tanh(alpha * relu(rho_m))`` with ``rho_m = s_m / s_other`` (``relu(rho_m - 1)`` with ``continuous``), the
    other 1. M > 2: ``rho_m = s_m / mean_{j!=m} s_j`` and every m with ``rho_m > 1`` is damped. With ``plus_factor``
    (the journal's OGM+) the damping is replaced: damped modalities get 1 and the others ``plus_factor``. Any
    non-finite score makes every coefficient NaN.

    Args:
        scores: ``[M]`` softmax-at-label sums.
        alpha: the modulation strength.
        continuous: use ``relu(rho - 1)`` (continuous at rho = 1).
        journal: the journal code's tie rule (M = 2: a tie damps modality 1).
        plus_factor: OGM+'s coefficient of the weak modalities, or None for OGM.

    Returns:
        ``[M]`` float32 coefficients.
    """
    s = scores.to(torch.float32)
    M = s.shape[0]
    shift = 1.0 if continuous else 0.0
    damped = ogm_damped_ref(s, journal)
    if plus_factor is not None:
        k = torch.where(damped, torch.ones_like(s), torch.full_like(s, float(plus_factor)))
    elif M == 2:
        # rho_m of each modality against the other, in the form the reference computes it: s_1 / s_0 and its
        # reciprocal (CVPR), or s_0 / s_1 and its reciprocal (journal).
        if journal:
            rho0 = s[0] / s[1]
            rho = torch.stack([rho0, 1 / rho0])
        else:
            rho1 = s[1] / s[0]
            rho = torch.stack([1 / rho1, rho1])
        k = torch.where(damped, 1 - torch.tanh(alpha * torch.relu(rho - shift)), torch.ones_like(s))
    else:
        rho = s / mean_of_others(s)
        k = torch.where(damped, 1 - torch.tanh(alpha * torch.relu(rho - shift)), torch.ones_like(s))
    # A non-finite score makes every coefficient NaN, so that a step with overflowing logits cannot pass silently.
    return torch.where(torch.isfinite(s).all(), k, torch.full_like(k, float("nan")))


def ogm_scores_ref(logits: Tensor, labels: Tensor, alpha: float, continuous: bool = False) -> Tuple[Tensor, Tensor]:
    """OGM scores ``s_m = sum_b softmax(out_m)[b, y_b]`` and coefficients.

    Args:
        logits: ``[M, B, C]`` per-modality logits.
        labels: ``[B]`` int64 class indices.
        alpha, continuous: as :func:`ogm_coefficients_ref`.

    Returns:
        ``(scores [M], coeffs [M])``, float32.
    """
    p = torch.softmax(logits.to(torch.float32), dim=-1)
    idx = labels.view(1, -1, 1).expand(p.shape[0], -1, 1)
    scores = p.gather(-1, idx).squeeze(-1).sum(dim=1)
    return scores, ogm_coefficients_ref(scores, alpha, continuous)


# OGM-GE noise: Philox4x32-10 normals and the in-place noisy gradient scaling

_MASK32 = 0xFFFFFFFF
# Philox4x32 multipliers and Weyl key increments (Salmon et al., SC 2011).
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: Tensor) -> Tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 ``b`` in [0, 2^32).

    ``b`` is split in 16-bit halves so that no int64 product overflows: ``a * b = t * 2^16 + (a * b_lo mod 2^16)``
    with ``t = a * b_hi + (a * b_lo >> 16) < 2^49``.
    """
    p_lo = a * (b & 0xFFFF)
    t = a * (b >> 16) + (p_lo >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_ref(counters: Tensor, key: Sequence[int]) -> Tensor:
    """Philox4x32-10 on a batch of 128-bit counters.

    Args:
        counters: ``[..., 4]`` int64 tensor, each word in [0, 2^32).
        key: two Python ints, the 32-bit key words ``(k0, k1)``.

    Returns:
        ``[..., 4]`` int64 tensor of output words in [0, 2^32).
    """
    c0, c1, c2, c3 = counters.to(torch.int64).unbind(-1)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


# Cephes float32 coefficients of the kernels' logarithm (on [sqrt(1/2) - 1, sqrt(2) - 1)) and sine/cosine (|a| <= pi/4),
# as in csrc/philox.h.
_LOG_POLY = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)
_SIN_POLY = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_POLY = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)


def _log_positive(x: Tensor) -> Tensor:
    """ln x for float32 x in [2^-24, 1], the kernels' polynomial, one rounding per operation (bitwise theirs)."""
    b = x.view(torch.int32)
    mant = b & 0x007FFFFF
    # Mantissas above sqrt(2) get the exponent of [0.5, 1) and one more in e.
    fold = (mant > 0x003504F3).to(torch.int32)
    m = (mant | (0x3F800000 - (fold << 23))).view(torch.float32)
    e = ((b >> 23) + fold - 127).to(torch.float32)
    f = m - 1.0
    z = f * f
    y = torch.full_like(f, _LOG_POLY[0])
    for c in _LOG_POLY[1:]:
        y = y * f + c
    y = y * f * z
    y = y + (-2.12194440e-4 * e)
    y = y + (-0.5 * z)
    return (f + y) + 0.693359375 * e


def _sincos_2pi(u: Tensor) -> Tuple[Tensor, Tensor]:
    """sin(2 pi u), cos(2 pi u) for float32 u in [0, 1), the kernels' polynomials (bitwise theirs)."""
    n = (4.0 * u + 0.5).to(torch.int32)
    a = (u - 0.25 * n.to(torch.float32)) * (2.0 * math.pi)
    z = a * a
    sp = a + a * z * (_SIN_POLY[2] + z * (_SIN_POLY[1] + z * _SIN_POLY[0]))
    cp = (1.0 - 0.5 * z) + z * z * (_COS_POLY[2] + z * (_COS_POLY[1] + z * _COS_POLY[0]))
    # Rotate by n quarter turns: odd n swaps sine and cosine, then the quadrant gives the signs.
    odd = (n & 1) != 0
    s, c = torch.where(odd, cp, sp), torch.where(odd, sp, cp)
    return torch.where((n & 2) != 0, -s, s), torch.where(((n + 1) & 2) != 0, -c, c)


def philox_normal_ref(numel: int, seed: int, offset: int, index: int, device=None, start: int = 0) -> Tensor:
    """The standard normal noise of tensor ``index`` under ``(seed, offset)``, bitwise as the kernels draw it.

    Element ``e`` belongs to counter ``q = e // 4``: ``(q, index, offset & 0xFFFFFFFF, offset >> 32)`` under the key
    ``(seed & 0xFFFFFFFF, seed >> 32)``. The output words ``x0..x3`` give elements ``4q..4q+3`` by Box-Muller on
    24-bit uniforms, in float32: for the pairs ``(x0, x1)`` and ``(x2, x3)``, ``u1 = ((xa >> 8) + 1) 2^-24``,
    ``u2 = (xb >> 8) 2^-24``, ``r = sqrt(-2 ln u1)``, ``z_a = r cos(2 pi u2)``, ``z_b = r sin(2 pi u2)``, with ln,
    sin and cos the kernels' float32 polynomials (about one ulp) and every operation rounded on its own.

    Args:
        numel: number of elements N.
        seed: the noise seed (its low 64 bits are used).
        offset: the noise offset (its low 64 bits are used).
        index: the tensor's position in the gradient list (its low 32 bits are used).
        device: where to compute.
        start: the global index of the first element (a shard of a larger tensor): the elements are
            ``start .. start + N - 1`` of the whole tensor's noise.

    Returns:
        ``[N]`` float32.
    """
    first_q = start // 4
    nq = (start + numel + 3) // 4 - first_q
    q = torch.arange(first_q, first_q + nq, dtype=torch.int64, device=device)
    words = (index & _MASK32, offset & _MASK32, (offset >> 32) & _MASK32)
    counters = torch.stack([q & _MASK32] + [torch.full_like(q, w) for w in words], dim=-1)
    x = philox4x32_ref(counters, (seed & _MASK32, (seed >> 32) & _MASK32))
    # 24-bit integers and a power-of-two scale: the uniforms are exact in float32.
    u1 = ((x[:, 0::2] >> 8) + 1).to(torch.float32) * 2.0**-24
    u2 = (x[:, 1::2] >> 8).to(torch.float32) * 2.0**-24
    # torch.sqrt of float32 is not always correctly rounded on CPU; in float64 it is, and so is its rounding to float32
    # (53 bits are more than the 2 * 24 + 2 that make the double rounding of a square root harmless).
    r = torch.sqrt((-2.0 * _log_positive(u1)).double()).float()
    s, c = _sincos_2pi(u2)
    z = torch.stack([r * c, r * s], dim=-1)
    lane = start % 4
    return z.reshape(-1)[lane : lane + numel]


def ogm_ge_ref(
    grads: Sequence[Tensor],
    group: Sequence[int],
    coeffs: Tensor,
    noise: bool,
    seed: int,
    offset: int,
    starts: Optional[Sequence[int]] = None,
    sigma: Optional[Tensor] = None,
) -> None:
    """OGM / OGM-GE gradient update, in place, for tensor i of modality ``m = group[i]``.

    OGM: ``g <- coeffs[m] * g``. OGM-GE: ``g <- coeffs[m] * g + sigma * z`` with
    ``sigma = std_unbiased(g before scaling) + 1e-8`` and ``z = philox_normal_ref(g.numel(), seed, offset, i)``.
    The unbiased std of a one-element tensor is undefined; it is taken as 0. A non-finite gradient gives a NaN std,
    so the tensor stays non-finite. Computed in float32 and written back in g's dtype.

    Args:
        grads: contiguous float tensors, modified in place.
        group: ``len(grads)`` modality indices.
        coeffs: ``[M]`` coefficients (indexed on the device: no host sync).
        noise: add the noise (OGM-GE) or only scale (OGM).
        seed, offset: the noise key (see :func:`philox_normal_ref`).
        starts: per tensor the global index of its first element (a shard), or None (0).
        sigma: ``[len(grads)]`` stds to use instead of computing them, or None.
    """
    for i, g in enumerate(grads):
        if g.numel() == 0:
            continue
        x = g.reshape(-1).to(torch.float32)
        k = coeffs[group[i]].to(torch.float32)
        if noise:
            if sigma is not None:
                s = sigma[i].to(torch.float32)
            else:
                s = (torch.std(x) if x.numel() > 1 else x.new_zeros(())) + 1e-8
            z = philox_normal_ref(x.numel(), seed, offset, i, device=g.device, start=0 if starts is None else starts[i])
            y = k * x + s * z
        else:
            y = k * x
        g.copy_(y.view_as(g))
