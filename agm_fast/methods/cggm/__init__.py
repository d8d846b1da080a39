"""CGGM: classifier-guided gradient modulation (docs/methods.md, section 4)."""

from ..registry import register
from .core import CGGM
from .method import CGGMMethod

__all__ = ["CGGM", "CGGMMethod"]

register("cggm", CGGMMethod)
