"""GDL: disentangled gradient learning (docs/methods.md, GDL section)."""

from ..registry import register
from .method import GDLMethod

__all__ = ["GDLMethod"]

register("gdl", GDLMethod)
