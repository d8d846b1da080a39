"""AGM: Shapley mono-modal outputs and adaptive gradient modulation (docs/methods.md, sections 1 and 5)."""

from ..registry import register
from .core import AGM, AGMCoefficients, AGMResult, GradMod
from .method import AGMMethod

__all__ = ["AGM", "AGMCoefficients", "AGMResult", "GradMod", "AGMMethod"]

register("agm", AGMMethod)
