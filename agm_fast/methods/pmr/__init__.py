"""PMR: prototypical modal rebalance (docs/methods.md, the PMR section)."""

from ..registry import register
from .core import pmr_strength, prototype_logits, update_prototypes
from .method import PMRMethod

__all__ = ["PMRMethod", "pmr_strength", "prototype_logits", "update_prototypes"]

register("pmr", PMRMethod)
