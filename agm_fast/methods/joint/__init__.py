"""Plain joint training: the null method, every hook at its default."""

from __future__ import annotations

from ..base import Method
from ..registry import register

__all__ = ["Joint"]


class Joint(Method):
    """Joint training: one loss on the fused logits, no modulation; coefficients are always 1.

    Args:
        encoders, fusion, seed, task: as :class:`agm_fast.methods.Method`.

    Example::

        method = agm_fast.methods.create("joint", encoders=[enc_a, enc_v], fusion=head)
    """

    accumulation = "exact"

    windowed = False

    def __init__(self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification") -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)


register("joint", Joint)
