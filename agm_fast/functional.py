"""The ops' validated functions under the name other libraries call them by (:mod:`agm_fast.ops`)."""

from .ops import *  # noqa: F401,F403
from .ops import __all__  # noqa: F401
