"""MLB: multi-loss balanced gradient modulation (docs/methods.md, MLB section)."""

from ..registry import register
from .core import mlb_coefficients
from .method import MLBMethod

__all__ = ["MLBMethod", "mlb_coefficients"]

register("mlb", MLBMethod)
