"""MLA: alternating unimodal sub-steps through a shared head, entropy-weighted fusion at test time."""

from ..registry import register
from .core import fuse, fusion_weights, owm_update
from .method import MLAMethod

__all__ = ["MLAMethod", "fusion_weights", "fuse", "owm_update"]

register("mla", MLAMethod)
