"""Per-step seeds: one generator seed per ``(seed, step)`` for every method that draws random numbers on the host or
seeds a device generator each step (AGM's sampled permutations, OPM's drop decisions)."""

from __future__ import annotations

__all__ = ["step_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit generator seed for step ``step`` of a run seeded with ``seed``.

    The seed is mixed before the step is folded in, so neighbouring steps (and neighbouring seeds) get unrelated
    streams; the result fits ``torch.Generator.manual_seed``.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 1
