"""MMPareto: Pareto integration of the multimodal and unimodal gradients per encoder (docs/methods.md)."""

from ..registry import register
from .core import combine_, pareto_weights
from .method import MMParetoMethod

__all__ = ["MMParetoMethod", "combine_", "pareto_weights"]

register("mmpareto", MMParetoMethod)
