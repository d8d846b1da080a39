"""Diagnosing & Re-learning (docs/methods.md, the relearning section)."""

from ..registry import register
from .core import kmeans, minmax_scale, purity, relearn_weights, soft_reinit_
from .method import RelearningMethod

__all__ = ["RelearningMethod", "kmeans", "minmax_scale", "purity", "relearn_weights", "soft_reinit_"]

register("relearning", RelearningMethod)
