"""Parsers of command-line text for method options (shared by the method files)."""

from __future__ import annotations

import argparse
import math
from typing import List, Optional


def cap_or_none(text: str) -> Optional[float]:
    """A number, or ``none`` for no cap."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def float_list(text: str) -> List[float]:
    """Comma-separated finite numbers."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values
