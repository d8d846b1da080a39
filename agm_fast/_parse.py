"""Parsers of command-line text for hyper-parameters, by name (the methods' declarations and the command line's
catalog share them; nothing here imports torch)."""

from __future__ import annotations

import argparse
import math
from typing import List, Optional

__all__ = ["PARSERS", "cap_or_none", "float_or_none", "float_list", "parser_name"]


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


# Every parser a declaration may use, by the name the command line's catalog records.
PARSERS = {"float": float, "int": int, "str": str, "bool": bool, "cap_or_none": cap_or_none, "float_list": float_list}


def parser_name(parse) -> str:
    """The name of ``parse`` in :data:`PARSERS`."""
    for name, fn in PARSERS.items():
        if fn is parse:
            return name
    raise ValueError(f"parse: expected one of the parsers of agm_fast._parse.PARSERS, got {parse!r}")
