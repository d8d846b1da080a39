"""``ogm_ge_``: OGM / OGM-GE's in-place update of a list of gradient tensors, ``g <- k_m g`` plus Gaussian noise with
each tensor's std, drawn from counter-based Philox normals (docs/methods.md, section 2.5).

The custom op ``agm_fast::ogm_ge_`` (the C++/CUDA extension when built, :func:`ogm_ge_torch` otherwise), its fake,
the Philox noise in PyTorch (:func:`philox_normal`, what the extension draws, bit for bit in the uniforms) and the
validated public function :func:`ogm_ge_`.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend

__all__ = ["check_ogm_ge_args", "ogm_ge_", "ogm_ge_op", "ogm_ge_torch", "philox4x32", "philox_normal"]

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


def philox4x32(counters: Tensor, key: Sequence[int]) -> Tensor:
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


def philox_normal(numel: int, seed: int, offset: int, index: int, device=None, start: int = 0) -> Tensor:
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
    x = philox4x32(counters, (seed & _MASK32, (seed >> 32) & _MASK32))
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


def ogm_ge_torch(
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
    ``sigma = std_unbiased(g before scaling) + 1e-8`` and ``z = philox_normal(g.numel(), seed, offset, i)``.
    The unbiased std of a one-element tensor is undefined; it is taken as 0. A non-finite gradient gives a NaN std,
    so the tensor stays non-finite. Computed in float32 and written back in g's dtype.

    Args:
        grads: contiguous float tensors, modified in place.
        group: ``len(grads)`` modality indices.
        coeffs: ``[M]`` coefficients (indexed on the device: no host sync).
        noise: add the noise (OGM-GE) or only scale (OGM).
        seed, offset: the noise key (see :func:`philox_normal`).
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
            z = philox_normal(x.numel(), seed, offset, i, device=g.device, start=0 if starts is None else starts[i])
            y = k * x + s * z
        else:
            y = k * x
        g.copy_(y.view_as(g))


# The custom op: in-place noisy gradient scaling over a list of gradient tensors.

_OGM_GE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Philox counter holds the element-quad index in 32 bits: 2^32 quads of 4 elements.
_OGM_GE_MAX_NUMEL = 1 << 34


def check_ogm_ge_args(
    grads: List[Tensor],
    group: List[int],
    coeffs: Tensor,
    starts: Optional[List[int]] = None,
    sigma: Optional[Tensor] = None,
) -> None:
    """Metadata checks of :func:`ogm_ge_` (no tensor values are read); raises TypeError / ValueError."""
    if len(grads) == 0:
        raise ValueError("grads: expected at least one gradient tensor, got an empty list")
    if len(group) != len(grads):
        raise ValueError(f"group: expected one modality index per gradient tensor ({len(grads)}), got {len(group)}")
    for i, m in enumerate(group):
        if m < 0:
            raise ValueError(f"group[{i}]: expected a modality index >= 0, got {m}")
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.dtype not in _OGM_GE_DTYPES:
            raise TypeError(f"grads[{i}]: expected a float32, float16 or bfloat16 tensor, got {g.dtype}")
        if g.device != device:
            raise ValueError(
                f"grads: all tensors must be on one device; grads[0] is on {device}, grads[{i}] is on {g.device}"
            )
        if not g.is_contiguous():
            raise ValueError(f"grads[{i}]: expected a contiguous tensor (it is modified in place)")
        if g.numel() >= _OGM_GE_MAX_NUMEL:
            raise ValueError(f"grads[{i}]: at most 2^34 - 1 elements are supported, got {g.numel()}")
    num_groups = max(group) + 1
    if coeffs.dtype != torch.float32:
        raise TypeError(f"coeffs: expected a float32 tensor, got {coeffs.dtype}")
    if coeffs.dim() != 1 or coeffs.shape[0] != num_groups:
        raise ValueError(
            f"coeffs: expected shape [{num_groups}] (one coefficient per modality, max(group) + 1), "
            f"got {tuple(coeffs.shape)}"
        )
    if coeffs.device != device:
        raise ValueError(f"coeffs: expected a tensor on the grads' device {device}, got {coeffs.device}")
    if starts is not None:
        if len(starts) != len(grads):
            raise ValueError(
                f"starts: expected one element offset per gradient tensor ({len(grads)}), got {len(starts)}"
            )
        for i, (s0, g) in enumerate(zip(starts, grads)):
            if s0 < 0 or s0 + g.numel() >= _OGM_GE_MAX_NUMEL:
                raise ValueError(f"starts[{i}]: expected an offset >= 0 that keeps the shard below 2^34, got {s0}")
    if sigma is not None:
        if sigma.dtype != torch.float32 or tuple(sigma.shape) != (len(grads),):
            raise ValueError(
                f"sigma: expected a float32 tensor [{len(grads)}] (one std per tensor), got {sigma.dtype} "
                f"{tuple(sigma.shape)}"
            )
        if sigma.device != device:
            raise ValueError(f"sigma: expected a tensor on the grads' device {device}, got {sigma.device}")


# seed and offset are SymInts: under torch.compile a per-step offset then becomes a dynamic int after one recompile,
# instead of a guard (and a recompile) per value.
@torch.library.custom_op(
    "agm_fast::ogm_ge_",
    mutates_args={"grads"},
    schema=(
        "(Tensor(a!)[] grads, int[] group, Tensor coeffs, bool noise, SymInt seed, SymInt offset, "
        "int[]? starts=None, Tensor? sigma=None) -> ()"
    ),
)
def ogm_ge_op(
    grads: List[Tensor],
    group: List[int],
    coeffs: Tensor,
    noise: bool,
    seed: int,
    offset: int,
    starts: Optional[List[int]] = None,
    sigma: Optional[Tensor] = None,
) -> None:
    """In place, for tensor i of modality ``m = group[i]``: ``g <- coeffs[m] * g``, plus ``sigma * z`` with noise.

    ``sigma = std_unbiased(g before scaling) + 1e-8`` (std 0 for a one-element tensor) and ``z`` the Philox normals of
    :func:`philox_normal` keyed on ``(seed, offset, i, element index)``. Runs the compiled extension when it is
    available (or forced), else :func:`ogm_ge_torch`.

    Args:
        grads: contiguous float32 / float16 / bfloat16 tensors on one device, modified in place.
        group: ``len(grads)`` modality indices >= 0.
        coeffs: ``[max(group) + 1]`` float32 coefficients on the grads' device (read by the kernel, never synced).
        noise: add the Gaussian noise (OGM-GE) or only scale (OGM).
        seed: noise seed, ``0 <= seed < 2^63``.
        offset: noise offset (advance it every step), ``0 <= offset < 2^63``.
        starts: per tensor, the global index of its first element when it is a shard of a larger tensor (its noise
            is then the slice of the whole tensor's); None: 0 for every tensor.
        sigma: ``[len(grads)]`` float32 stds to use instead of computing them (a shard's std is the whole tensor's,
            from merged moments); None: computed.
    """
    check_ogm_ge_args(grads, group, coeffs, starts, sigma)
    if _backend.select(grads[0].device, has=("ext", "torch")) == "ext":
        # Loading agm_fast._C registers agm_fast::_ogm_ge_impl (csrc/agm_fast.cpp) for CPU and, if built, CUDA.
        _backend.get_ext()
        torch.ops.agm_fast._ogm_ge_impl(grads, group, coeffs, noise, seed, offset, starts, sigma)
    else:
        ogm_ge_torch(grads, group, coeffs, noise, seed, offset, starts, sigma)


@ogm_ge_op.register_fake
def _(grads, group, coeffs, noise, seed, offset, starts=None, sigma=None):
    check_ogm_ge_args(grads, group, coeffs, starts, sigma)


def _check_key_int(value, name: str) -> int:
    if isinstance(value, (bool, Tensor)) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name}: expected an int in [0, 2^63), got {value}")
    return value


def ogm_ge_(
    grads: Sequence[Tensor],
    group: Sequence[int],
    coeffs: Tensor,
    noise: bool = True,
    seed: int = 0,
    offset: int = 0,
    starts: Optional[Sequence[int]] = None,
    sigma: Optional[Tensor] = None,
) -> None:
    """OGM / OGM-GE gradient update, in place, between ``backward()`` and ``optimizer.step()``.

    For tensor i of modality ``m = group[i]``: ``g <- coeffs[m] * g`` (OGM), plus ``sigma * z`` with noise (OGM-GE),
    where ``sigma = std_unbiased(g before scaling) + 1e-8`` (std 0 for a one-element tensor) and ``z`` standard
    normal noise from Philox4x32-10 keyed on ``(seed, offset, i, element index)``: the same key gives the same noise
    on every device and every data-parallel replica (see :func:`philox_normal`). The
    coefficients are read from device memory; nothing synchronises with the host. Runs the compiled extension when
    it is built, else :func:`ogm_ge_torch` (``AGM_FAST_BACKEND=torch|ext`` forces one).

    Args:
        grads: contiguous float32 / float16 / bfloat16 tensors (e.g. ``p.grad``) on one device, not overlapping in
            memory; statistics are accumulated in float32 whatever their dtype.
        group: ``len(grads)`` modality indices (ints >= 0), one per tensor.
        coeffs: ``[M]`` float32 coefficients on the grads' device, ``M = max(group) + 1``.
        noise: add the Gaussian noise (OGM-GE, default) or only scale (OGM).
        seed: noise seed in [0, 2^63). Default 0.
        offset: noise offset in [0, 2^63); advance it every step for fresh noise. Default 0.
        starts: for shards of larger tensors (FSDP), the global index of each tensor's first element: element j then
            draws the noise of element ``starts[i] + j``, bitwise the slice of the whole tensor's noise. Empty
            tensors (empty shards) are allowed and keep their index. Default: every tensor is whole.
        sigma: ``[len(grads)]`` float32 stds on the grads' device to use instead of computing each tensor's (a
            shard's std must be the whole tensor's: :func:`agm_fast.distributed.sharded_std`). Default: computed.

    Returns:
        None; ``grads`` are modified in place.
    """
    if isinstance(grads, Tensor) or not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads: expected a list of gradient tensors, got {type(grads).__name__}")
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(
                f"grads[{i}]: expected a Tensor, got {type(g).__name__} (a parameter without a gradient?)"
            )
    if isinstance(group, Tensor):
        if group.device.type != "cpu" or group.dim() != 1 or group.is_floating_point():
            raise TypeError("group: expected a list of ints or a 1-D integer CPU tensor")
        group = group.tolist()
    if not isinstance(group, (list, tuple)):
        raise TypeError(f"group: expected a list of modality indices, got {type(group).__name__}")
    for i, m in enumerate(group):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"group[{i}]: expected an int modality index, got {type(m).__name__}")
    if not isinstance(coeffs, Tensor):
        raise TypeError(f"coeffs: expected a float32 tensor [M], got {type(coeffs).__name__}")
    if not isinstance(noise, bool):
        raise TypeError(f"noise: expected a bool, got {type(noise).__name__}")
    seed = _check_key_int(seed, "seed")
    offset = _check_key_int(offset, "offset")
    if starts is not None:
        if isinstance(starts, (str, bytes)) or not isinstance(starts, Sequence):
            raise TypeError(f"starts: expected a list of element offsets, got {type(starts).__name__}")
        starts = [_check_key_int(v, f"starts[{i}]") for i, v in enumerate(starts)]
    if sigma is not None and not isinstance(sigma, Tensor):
        raise TypeError(f"sigma: expected a float32 tensor [len(grads)], got {type(sigma).__name__}")
    grads, group = list(grads), list(group)
    # The op checks the tensors' metadata itself (it is public as torch.ops.agm_fast.ogm_ge_ too).
    ogm_ge_op(grads, group, coeffs, noise, seed, offset, starts, sigma)
