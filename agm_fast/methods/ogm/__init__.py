"""OGM and OGM-GE, and the journal OGM / OGM+ (docs/methods.md, sections 2 and 3)."""

from ..registry import register
from .config import MODULATION_MODES
from .core import OGMGE, calculate_coefficient, update_model_with_OGM_GE
from .method import OGMMethod

__all__ = ["MODULATION_MODES", "OGMGE", "OGMMethod", "calculate_coefficient", "update_model_with_OGM_GE"]

register("ogm", OGMMethod, mode="OGM")
register("ogm_ge", OGMMethod, mode="OGM_GE")
