"""The ops of agm_fast, one module each: the ``torch.library`` custom op, its fake, its autograd, the pure-PyTorch
path (``*_torch``, the CPU fallback) and the validated public function, which the names below are.

The custom ops are ``torch.ops.agm_fast.<name>`` (``*_op`` in each module); :mod:`agm_fast.functional` is another
name for this module's functions.
"""

from .ogm_ge import ogm_ge_
from .ogm_scores import ogm_scores
from .shapley import agm_coefficients, agm_scores, shapley_combine, shapley_outputs, shapley_scores, shapley_subsets
from .subset_batch import subset_batch

__all__ = [
    "agm_coefficients",
    "agm_scores",
    "ogm_ge_",
    "ogm_scores",
    "shapley_combine",
    "shapley_outputs",
    "shapley_scores",
    "shapley_subsets",
    "subset_batch",
]
