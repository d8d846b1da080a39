"""MLB: multi-loss balanced gradient modulation (docs/methods.md, section 11)."""

from ..registry import register
from .core import mlb_coefficients
from .method import MLBMethod

__all__ = ["MLBMethod", "mlb_coefficients"]

register("mlb", MLBMethod)
