"""Argument checks shared by every method and function: one message style, one exception type per kind of mistake.

Every message reads ``"<arg>: expected <what>, got <value>"``. A value of the wrong type (a string for a number, a
float for an int, a bool for a number) raises :class:`TypeError`; a value of the right type that is out of range,
not finite, or not one of the choices raises :class:`ValueError`. Hyper-parameters are checked once, when a method
is constructed, never on the per-step path.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

__all__ = ["check_bool", "check_choice", "check_float", "check_int", "check_seed", "describe"]

SEED_LIMIT = 1 << 63


def describe(value) -> str:
    """A short printable form of ``value`` for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value) -> str:
    return type(value).__name__


def check_choice(name: str, value, choices: Sequence) -> object:
    """``value`` must be one of ``choices`` (ValueError otherwise); returns it."""
    if value not in tuple(choices):
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {describe(value)}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` must be a bool (TypeError otherwise); returns it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {_type_name(value)} {describe(value)}")
    return value


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _in_range(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def check_int(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` must be an int (not a bool; TypeError) in ``[low, high]`` (ValueError); returns it as an int."""
    what = "an int" + _range_text(low, high, False, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {what}, got {_type_name(value)} {describe(value)}")
    value = int(value)
    if not _in_range(value, low, high, False, False):
        raise ValueError(f"{name}: expected {what}, got {value}")
    return value


def check_float(
    name: str,
    value,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> Optional[float]:
    """``value`` must be a real number (TypeError otherwise), finite and in range (ValueError otherwise).

    Args:
        name: the argument's name, as the user wrote it.
        value: the value to check (a Python or NumPy number; a bool or a tensor is a TypeError).
        low, high: bounds, inclusive unless ``low_open`` / ``high_open``.
        allow_none: None is accepted (and returned).
        allow_inf: infinities are accepted when within the bounds.

    Returns:
        ``float(value)``, or None.
    """
    kind = "a finite number" if not allow_inf else "a number"
    what = kind + _range_text(low, high, low_open, high_open) + (" or None" if allow_none else "")
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {_type_name(value)} {describe(value)}")
    value = float(value)
    bad = math.isnan(value) or (math.isinf(value) and not allow_inf)
    if bad or not _in_range(value, low, high, low_open, high_open):
        raise ValueError(f"{name}: expected {what}, got {value}")
    return value


def check_seed(name: str, value) -> int:
    """A random seed: an int in ``[0, 2**63)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int in [0, 2**63), got {_type_name(value)} {describe(value)}")
    value = int(value)
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name}: expected an int in [0, 2**63), got {value}")
    return value


def check_floats(name: str, values, count: int, **bounds) -> Tuple[float, ...]:
    """``count`` numbers, each checked as :func:`check_float` with ``bounds``; named ``name[i]`` in messages."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a sequence of {count} numbers, got {_type_name(values)}")
    if len(values) != count:
        raise ValueError(f"{name}: expected {count} values (one per modality), got {len(values)}")
    return tuple(check_float(f"{name}[{i}]", v, **bounds) for i, v in enumerate(values))
