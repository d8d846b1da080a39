"""agm_fast: fast, reference-exact balanced multimodal training.

AGM (Shapley mono-modal outputs, adaptive coefficients), OGM / OGM-GE, OPM and CGGM, for any number of modalities
and any fusion module. ``import agm_fast`` works without a GPU, a compiler or the built extension;
:func:`backend_info` says what is available.
"""

from . import (
    _backend,
    agm,
    cggm,
    distributed,
    functional,
    fusion,
    methods,
    metrics,
    models,
    mslr,
    ogm,
    opm,
    ops,
    probe,
    reference,
    window,
)
from ._backend import backend_info, get_ext
from .agm import *  # noqa: F401,F403
from .cggm import *  # noqa: F401,F403
from .distributed import *  # noqa: F401,F403
from .fusion import *  # noqa: F401,F403
from .methods import Method, StepOutput, training_step
from .metrics import *  # noqa: F401,F403
from .mslr import *  # noqa: F401,F403
from .ogm import *  # noqa: F401,F403
from .opm import *  # noqa: F401,F403
from .probe import *  # noqa: F401,F403
from .window import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = (
    ["backend_info", "get_ext", "functional", "methods", "models", "ops", "reference", "__version__"]
    + ["Method", "StepOutput", "training_step"]
    + agm.__all__
    + cggm.__all__
    + distributed.__all__
    + fusion.__all__
    + metrics.__all__
    + mslr.__all__
    + ogm.__all__
    + opm.__all__
    + probe.__all__
    + window.__all__
)
del _backend
