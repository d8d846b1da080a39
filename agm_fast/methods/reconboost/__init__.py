"""ReconBoost: alternating boosting stages per modality and a joint rectification of the ensemble."""

from ..registry import register
from .method import ReconBoostMethod

__all__ = ["ReconBoostMethod"]

register("reconboost", ReconBoostMethod)
