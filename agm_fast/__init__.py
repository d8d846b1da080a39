"""agm_fast: fast, reference-exact balanced multimodal training.

Every balancing method behind one training-step interface (:mod:`agm_fast.methods`), its building blocks (``AGM``,
``OGMGE``, ``OPM``, ``CGGM``, ``MSLR``, ``MSES``), the ops they run on (:mod:`agm_fast.ops`), fusion heads, metrics
and the trainer integrations, for any number of modalities. ``import agm_fast`` works without a GPU, a compiler or
the built extension; :func:`backend_info` says what is available.
"""

from . import distributed, functional, fusion, methods, metrics, models, ops, probe, window
from ._backend import backend_info, get_ext
from .distributed import *  # noqa: F401,F403
from .fusion import *  # noqa: F401,F403
from .methods import Method, StepOutput, training_step
from .methods.agm import AGM, AGMCoefficients, AGMResult, GradMod
from .methods.cggm import CGGM
from .methods.mses import MSES
from .methods.mslr import MSLR
from .methods.ogm import MODULATION_MODES, OGMGE, calculate_coefficient, update_model_with_OGM_GE
from .methods.opm import OPM, THETA_GRADS, opm_apply, opm_drop_probs, opm_loss, opm_scores, opm_theta
from .metrics import *  # noqa: F401,F403
from .probe import *  # noqa: F401,F403
from .window import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = (
    ["backend_info", "get_ext", "functional", "methods", "models", "ops", "__version__"]
    + ["Method", "StepOutput", "training_step"]
    + ["AGM", "AGMCoefficients", "AGMResult", "GradMod", "CGGM", "MSES", "MSLR"]
    + ["MODULATION_MODES", "OGMGE", "calculate_coefficient", "update_model_with_OGM_GE"]
    + ["OPM", "THETA_GRADS", "opm_apply", "opm_drop_probs", "opm_loss", "opm_scores", "opm_theta"]
    + distributed.__all__
    + fusion.__all__
    + metrics.__all__
    + probe.__all__
    + window.__all__
)
