"""MSES, a baseline of the AGM paper (docs/methods.md, section 1.7)."""

from ..registry import register
from .core import MSES
from .method import MSESMethod

__all__ = ["MSES", "MSESMethod"]

register("mses", MSESMethod)
