"""AMSS and AMSS+ (Yang et al., TPAMI 2025): adaptive mask-based stochastic gradient sampling of output channels."""

from ..registry import register
from .core import channel_energy, keep_ratios, mask_channels
from .method import AMSSMethod, masked_weights

__all__ = ["AMSSMethod", "channel_energy", "keep_ratios", "mask_channels", "masked_weights"]

register("amss", AMSSMethod, plus=False)
register("amss_plus", AMSSMethod, plus=True)
