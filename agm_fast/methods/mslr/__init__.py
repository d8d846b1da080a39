"""MSLR, a baseline of the AGM paper (docs/methods.md, section 1.7)."""

from ..registry import register
from .core import MSLR
from .method import MSLRMethod

__all__ = ["MSLR", "MSLRMethod"]

register("mslr", MSLRMethod)
