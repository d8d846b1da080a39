"""GDL: disentangled gradient learning (docs/methods.md, section 12)."""

from ..registry import register
from .method import GDLMethod

__all__ = ["GDLMethod"]

register("gdl", GDLMethod)
