"""OPM: on-the-fly prediction modulation, the journal's feature dropping (docs/methods.md, section 3.3)."""

from ..registry import register
from .config import THETA_GRADS
from .core import OPM, opm_apply, opm_drop_probs, opm_loss, opm_scores, opm_theta
from .method import OPMMethod

__all__ = ["OPM", "OPMMethod", "THETA_GRADS", "opm_apply", "opm_drop_probs", "opm_loss", "opm_scores", "opm_theta"]

register("opm", OPMMethod)
