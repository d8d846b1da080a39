"""InfoReg (Huang, Wei, Yang, Hu, CVPR 2025): proximal regulation of the leading modality (docs/methods.md)."""

from ..registry import register
from .method import InfoRegMethod, trace_ratio

__all__ = ["InfoRegMethod", "trace_ratio"]

register("inforeg", InfoRegMethod)
