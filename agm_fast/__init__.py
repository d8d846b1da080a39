"""agm_fast: fast, reference-exact balanced multimodal training.

Every balancing method behind one training-step interface (:mod:`agm_fast.methods`), its building blocks (``AGM``,
``OGMGE``, ``OPM``, ``CGGM``, ``MSLR``, ``MSES``), the ops they run on (:mod:`agm_fast.ops`), fusion heads, metrics
and the trainer integrations, for any number of modalities. ``import agm_fast`` works without a GPU, a compiler or
the built extension; :func:`backend_info` says what is available.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# The public names and the module each comes from. Nothing is imported until a name is used, so that a command line
# answers --help without loading torch.
_FROM = {
    "backend_info": "._backend",
    "get_ext": "._backend",
    "Method": ".methods",
    "StepOutput": ".methods",
    "training_step": ".methods",
    **{n: ".methods.agm" for n in ("AGM", "AGMCoefficients", "AGMResult", "GradMod")},
    "CGGM": ".methods.cggm",
    "MSES": ".methods.mses",
    "MSLR": ".methods.mslr",
    **{n: ".methods.ogm" for n in ("MODULATION_MODES", "OGMGE", "calculate_coefficient", "update_model_with_OGM_GE")},
    **{n: ".methods.opm" for n in ("OPM", "THETA_GRADS", "opm_apply", "opm_drop_probs", "opm_loss", "opm_scores",
                                   "opm_theta")},
    **{n: ".distributed" for n in ("ReduceHandle", "is_active", "all_reduce_sum", "global_mean_scores", "global_sums",
                                   "broadcast_seed", "shard_moments", "merge_moments", "sharded_std")},
    **{n: ".fusion" for n in ("ConcatFusion", "SumFusion", "MLPFusion", "GatedFusion", "FiLMFusion",
                              "FUSION_METHODS", "build_fusion", "output_layer", "per_modality_logits", "HeadSplit",
                              "head_split")},
    **{n: ".metrics" for n in ("competition_strength", "extract_features", "shapley_accuracy", "ShapleyAccuracy")},
    **{n: ".probe" for n in ("linear_probe", "probe_encoders")},
    **{n: ".window" for n in ("Window", "WindowLike")},
}
_MODULES = ("distributed", "functional", "fusion", "methods", "metrics", "models", "ops", "probe", "window")

__all__ = ["__version__", "functional", "methods", "models", "ops", *_FROM]


def __getattr__(name: str) -> Any:
    if name in _FROM:
        value = getattr(importlib.import_module(_FROM[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'agm_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_MODULES))
