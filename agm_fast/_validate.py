"""Argument checks shared by every method and function: one message style, one exception type per kind of mistake.

Every message reads ``"<arg>: expected <what>, got <value>"``. A value of the wrong type (a string for a number, a
float for an int, a bool for a number) raises :class:`TypeError`; a value of the right type that is out of range,
not finite, or not one of the choices raises :class:`ValueError`. Hyper-parameters are checked once, when a method
is constructed, never on the per-step path.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def _torch():
    # Imported on first use: the hyper-parameter checks above run without torch.
    import torch

    return torch

__all__ = [
    "check_alpha",
    "check_bool",
    "check_choice",
    "check_class_labels",
    "check_float",
    "check_float_tensor",
    "check_int",
    "check_per_modality_logits",
    "check_seed",
    "check_target",
    "describe",
]

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


# Tensor checks of the ops (metadata only, except label ranges on CPU tensors or with AGM_FAST_DEBUG=1).


def check_class_labels(labels: Tensor, batch: int, num_classes: int, device: torch.device, name: str = "labels"):
    """``labels`` must be ``[batch]`` int64 class indices on ``device``; values are checked on CPU (or in debug)."""
    torch = _torch()
    Tensor = torch.Tensor
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected a Tensor of int64 class indices, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name}: expected int64 class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [{batch}] (one class index per sample), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name}: on {labels.device}, but the logits are on {device}")
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    if labels.device.type == "cpu" or os.environ.get("AGM_FAST_DEBUG", "0") == "1":
        low, high = torch.aminmax(labels)
        low, high = int(low), int(high)
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name}: expected class indices in [0, {num_classes}), got values in [{low}, {high}]")


def check_per_modality_logits(logits: Tensor, name: str = "logits") -> None:
    """Per-modality logits ``[M, B, C]``, M >= 2, B >= 1, C >= 1, floating point."""
    torch = _torch()
    Tensor = torch.Tensor
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name}: expected a Tensor [M, B, C], got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{name}: expected per-modality logits [M, B, C], got shape {tuple(logits.shape)}")
    if logits.shape[0] < 2:
        raise ValueError(f"{name}: expected at least two modalities (M >= 2) for OGM, got M = {logits.shape[0]}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name}: expected a batch of at least one sample, got B = 0")
    if logits.shape[2] < 1:
        raise ValueError(f"{name}: expected at least one class, got C = {logits.shape[2]}")
    if not logits.is_floating_point():
        raise TypeError(f"{name}: expected floating-point logits, got {logits.dtype}")


def check_alpha(alpha: float) -> float:
    """A finite Python float >= 0 (an op's modulation strength)."""
    torch = _torch()
    Tensor = torch.Tensor
    if isinstance(alpha, Tensor) or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha: expected a Python float, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha: expected a finite value >= 0, got {alpha}")
    return float(alpha)


def check_float_tensor(
    t: Tensor, name: str, shape: str, device: torch.device, other: str = "the subset logits"
) -> None:
    """``t`` must be a floating-point tensor on ``device`` (its shape is the caller's to check)."""
    torch = _torch()
    Tensor = torch.Tensor
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor {shape}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but {other} are on {device}")


def check_target(
    labels: Tensor,
    batch: int,
    num_classes: Optional[int],
    task: str,
    device: Optional[torch.device],
    name: str = "target",
) -> None:
    """AGM targets: ``[B]`` int64 class indices, or ``[B]`` / ``[B, C]`` float regression targets.

    With ``num_classes`` and ``device`` None only the dtype and batch size are checked (before the model runs);
    with both given the check is complete, including the value range on CPU tensors.
    """
    torch = _torch()
    Tensor = torch.Tensor
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected a Tensor [{batch}], got {type(labels).__name__}")
    if task == "classification":
        if num_classes is not None and device is not None:
            check_class_labels(labels, batch, num_classes, device, name)
            return
        if labels.dtype != torch.int64:
            raise TypeError(f"{name}: expected int64 class indices, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(f"{name}: expected shape [{batch}] (one class index per sample), got {list(labels.shape)}")
        return
    if not labels.is_floating_point():
        raise TypeError(f"{name}: expected floating-point regression targets, got {labels.dtype}")
    if labels.dim() not in (1, 2) or labels.shape[0] != batch:
        raise ValueError(f"{name}: expected regression targets [{batch}] or [{batch}, C], got {tuple(labels.shape)}")
    if num_classes is not None and labels.dim() == 2 and labels.shape[1] != num_classes:
        raise ValueError(f"{name}: expected regression targets [{batch}] or [{batch}, {num_classes}], "
                         f"got {tuple(labels.shape)}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name}: on {labels.device}, but the logits are on {device}")
