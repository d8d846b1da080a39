"""Parsers of command-line text for hyper-parameters (shared by the methods' declarations)."""

from __future__ import annotations

import argparse
import math
from typing import List, Optional

__all__ = ["cap_or_none", "float_or_none", "float_list"]


def cap_or_none(text: str) -> Optional[float]:
    """A number, or ``none`` for no cap."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


float_or_none = cap_or_none


def float_list(text: str) -> List[float]:
    """Comma-separated finite numbers."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values
