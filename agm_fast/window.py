"""The modulation window: the one type every method uses for "in which epochs does it modulate".

A :class:`Window` holds inclusive epochs ``[start, end]`` counted from 0, as the reference code's
``--modulation_starts`` / ``--modulation_ends``; ``end=None`` means no end. Outside its window a method behaves as
plain joint training: it leaves gradients and features alone, adds no loss term, and reports coefficients of 1
(AGM's ``hold_last=True`` keeps the last coefficients instead, as the reference does). State that has to keep
accumulating (AGM's running means, CGGM's head training) is still updated outside the window. The journal version's
warm-up (no modulation before epoch 6) is a window that starts at epoch 6 (docs/methods.md, section 0).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from ._validate import describe

__all__ = ["Window", "WindowLike"]


@dataclass(frozen=True)
class Window:
    """Inclusive epochs ``[start, end]`` (from 0) in which a method modulates; ``end=None``: no end.

    Args:
        start: the first modulated epoch (default 0).
        end: the last modulated epoch, inclusive, or None (default: every epoch from ``start`` on).
    """

    start: int = 0
    end: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, numbers.Integral):
            raise TypeError(f"window start: expected an int >= 0, got {describe(self.start)}")
        if self.start < 0:
            raise ValueError(f"window start: expected an int >= 0, got {self.start}")
        if self.end is not None:
            if isinstance(self.end, bool) or not isinstance(self.end, numbers.Integral):
                raise TypeError(f"window end: expected an int >= start or None, got {describe(self.end)}")
            if self.end < self.start:
                raise ValueError(f"window: expected start <= end (inclusive epochs), got ({self.start}, {self.end})")
        object.__setattr__(self, "start", int(self.start))
        object.__setattr__(self, "end", None if self.end is None else int(self.end))

    @classmethod
    def of(cls, value: "WindowLike", name: str = "window") -> "Window":
        """A :class:`Window` from what users pass: None (every epoch), a Window, or ``(start, end)``.

        In a tuple, ``end`` may be None or ``math.inf`` for "no end", and integral floats are accepted.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(
                f"{name}: expected None, an agm_fast.Window or (start_epoch, end_epoch), got {describe(value)}"
            )
        start, end = value
        start = _epoch(start, f"{name} start")
        end = None if end is None or end == math.inf else _epoch(end, f"{name} end")
        if end is not None and end < start:
            raise ValueError(f"{name}: expected start <= end (inclusive epochs), got ({start}, {end})")
        return cls(start, end)

    @property
    def unbounded(self) -> bool:
        """True when the window holds every epoch."""
        return self.start == 0 and self.end is None

    def starting_at(self, epoch: int) -> "Window":
        """This window with its start moved to at least ``epoch`` (a warm-up); empty windows are an error."""
        start = max(self.start, epoch)
        if self.end is not None and start > self.end:
            raise ValueError(f"window: a warm-up until epoch {epoch} leaves nothing of the window {self}")
        return Window(start, self.end)

    def contains(self, epoch: Optional[int]) -> bool:
        """Whether ``epoch`` lies in the window; ``epoch=None`` is allowed only when the window holds every epoch."""
        if epoch is None:
            if self.unbounded:
                return True
            raise ValueError(f"epoch: required because the modulation window is {self}, got None")
        epoch = _epoch(epoch, "epoch")
        return self.start <= epoch and (self.end is None or epoch <= self.end)

    def __contains__(self, epoch: int) -> bool:
        return self.contains(epoch)

    def __iter__(self) -> Iterator[Optional[int]]:
        # (start, end) unpacking, as the tuples this type replaced.
        return iter((self.start, self.end))

    def __str__(self) -> str:
        return f"[{self.start}, {'...' if self.end is None else self.end}]"


WindowLike = Union[Window, tuple, list, None]


def _epoch(value, name: str) -> int:
    """An epoch number: an int >= 0, or a float with an integral value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected an int >= 0, got {type(value).__name__} {describe(value)}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif math.isfinite(value) and float(value).is_integer():
        value = int(value)
    else:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")
    return value
