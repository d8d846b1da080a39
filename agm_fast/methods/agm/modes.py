"""Whether an encoder computes the same features in train and eval mode, so that AGM may reuse its full-pass features
for the masked subsets (docs/methods.md, section 5).

The reference runs every masked pass in eval mode. For an encoder whose forward does not depend on ``training`` (no
active dropout, no normalisation from batch statistics, no stochastic depth) the eval-mode features are the
train-mode features, and the second pass can be skipped with no deviation at all. Three sources decide:

1. the user's override per encoder (``mode_invariant=[True, None, False]``);
2. a structural scan over the module tree for known mode-dependent modules (:func:`mode_dependence`): a hit makes
   the encoder mode-dependent at once;
3. otherwise a one-time check on the first training step: both passes run, as the reference does, and the
   features are compared bitwise; equal features make the encoder mode-invariant from the next step on. This also
   catches custom code that reads ``self.training``.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..._validate import describe

__all__ = ["ModeInvariance", "fixed_mode", "mode_dependence", "still_fixed", "uses_batch_statistics"]

# timm's stochastic-depth and dropout modules, found by name so that timm need not be imported.
_TIMM_DROPS = {"DropPath": "drop_prob", "DropBlock2d": "drop_prob", "PatchDropout": "prob"}


_READS_TRAINING: Dict[type, bool] = {}


def _reads_training(cls: type) -> bool:
    """Whether the Python source of ``cls.forward`` reads ``.training`` (a LayerDrop, a functional dropout, any
    train-only branch). torch's own modules are judged by the rules below instead."""
    if cls not in _READS_TRAINING:
        found = False
        if not cls.__module__.startswith("torch.nn"):
            try:
                found = ".training" in inspect.getsource(cls.forward)
            except (OSError, TypeError):
                found = False
        _READS_TRAINING[cls] = found
    return _READS_TRAINING[cls]


_BATCH_STATS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalises over the batch in eval mode too (a batch norm without running statistics), so
    that its output on a row depends on the other rows."""
    if module not in _BATCH_STATS:
        _BATCH_STATS[module] = any(
            isinstance(sub, nn.modules.batchnorm._BatchNorm) and not sub.track_running_stats for sub in module.modules()
        )
    return _BATCH_STATS[module]


def _dropouts(module: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """The dropout-like submodules whose probability can be raised later: ``(name, module, attribute)``."""
    out = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            out.append((name, sub, "p"))
        elif isinstance(sub, nn.MultiheadAttention):
            out.append((name, sub, "dropout"))
        elif type(sub).__name__ in _TIMM_DROPS:
            out.append((name, sub, _TIMM_DROPS[type(sub).__name__]))
    return out


def _why(name: str, module: nn.Module) -> Optional[str]:
    where = name or "the encoder"
    if isinstance(module, nn.RReLU):
        return f"{where} is RReLU (a random slope in train mode)"
    if _reads_training(type(module)):
        return f"{where} ({type(module).__name__}) reads self.training in its forward"
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
        return f"{where} is {type(module).__name__}(p={module.p})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        return f"{where} is {type(module).__name__} with running statistics (batch statistics in train mode)"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return f"{where} is {type(module).__name__} with running statistics"
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        return f"{where} is MultiheadAttention(dropout={module.dropout})"
    attr = _TIMM_DROPS.get(type(module).__name__)
    if attr is not None and float(getattr(module, attr, 0.0) or 0.0) > 0:
        return f"{where} is {type(module).__name__}({attr}={getattr(module, attr)})"
    return None


def mode_dependence(module: nn.Module) -> Optional[str]:
    """Why ``module``'s forward depends on ``training`` (the first known mode-dependent submodule), or None.

    Known mode-dependent modules: torch's dropout family with p > 0, batch and instance norms that keep running
    statistics, ``MultiheadAttention`` with dropout > 0 (``Transformer*Layer`` s hold both), and timm's
    ``DropPath`` / ``DropBlock2d`` / ``PatchDropout`` with a non-zero probability. None means only that no known
    module was found: custom code may still read ``self.training`` (the first-step check looks for that).
    """
    for name, sub in module.named_modules():
        reason = _why(name, sub)
        if reason is not None:
            return reason
    return None


# torch.nn modules that take another code path in eval mode even without dropout (the native "fast path" kernels).
_EVAL_FAST_PATH = ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
                   "TransformerDecoder", "Transformer")


def fixed_mode(module: nn.Module) -> Optional[List[Tuple[str, nn.Module, str]]]:
    """Whether ``module`` computes the same in train and eval mode by construction, so that switching it to eval mode
    for the masked passes can be skipped: every submodule is one of torch's own (or agm_fast's) modules with no
    mode-dependent behaviour, and its own forward does not read ``self.training``. Returns the dropout-like modules to
    watch (a probability raised above 0 later makes the module mode-dependent: :func:`still_fixed`), or None when the
    module may depend on the mode (then the switch always runs)."""
    for name, sub in module.named_modules():
        cls = type(sub)
        if not (cls.__module__.startswith("torch.nn") or cls.__module__.startswith("agm_fast.")):
            return None
        if cls.__name__ in _EVAL_FAST_PATH or _why(name, sub) is not None:
            return None
    return _dropouts(module)


def still_fixed(watch: List[Tuple[str, nn.Module, str]]) -> bool:
    """True while every watched dropout-like module of :func:`fixed_mode` keeps probability 0."""
    return all(not float(getattr(sub, attr, 0.0) or 0.0) for _, sub, attr in watch)


class ModeInvariance:
    """The per-encoder decision: reuse the full pass's features (True), run the eval-mode pass (False), or check on
    the first training step (None).

    Args:
        encoders: the M encoders.
        override: None (decide every encoder), a bool for all, or M values of True / False / None.
    """

    def __init__(self, encoders: Sequence[nn.Module], override: Union[None, bool, Sequence[Optional[bool]]]):
        M = len(encoders)
        if override is None or isinstance(override, bool):
            override = [override] * M
        elif isinstance(override, (str, bytes)) or not isinstance(override, Sequence):
            raise TypeError(
                "mode_invariant: expected None, a bool, or one True / False / None per encoder, got "
                f"{describe(override)}"
            )
        if len(override) != M:
            raise ValueError(f"mode_invariant: expected {M} values (one per encoder), got {len(override)}")
        self.decided: List[Optional[bool]] = []
        self.reasons: List[str] = []
        # What decided each encoder: "override", "scan" (a mode-dependent module) or "check" (the first step).
        self.source: List[str] = []
        # Dropout-like modules at probability 0 when the encoder was found invariant: raising one later makes the
        # encoder mode-dependent, which watch() sees at the next step.
        self._watch: List[List[Tuple[str, nn.Module, str]]] = [_dropouts(enc) for enc in encoders]
        for m, (enc, value) in enumerate(zip(encoders, override)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"mode_invariant[{m}]: expected True, False or None, got {describe(value)}")
            if value is not None:
                self.decided.append(value)
                self.reasons.append("set by mode_invariant")
                self.source.append("override")
                continue
            reason = mode_dependence(enc)
            if reason is not None:
                self.decided.append(False)
                self.reasons.append(f"mode-dependent: {reason}")
                self.source.append("scan")
            else:
                self.decided.append(None)
                self.reasons.append("no mode-dependent module found; checked on the first training step")
                self.source.append("check")

    def watch(self) -> None:
        """Re-check the dropout probabilities of the encoders that reuse their full pass (a loop over their dropout
        modules, no tensor work): one raised above 0 makes that encoder mode-dependent from this step on."""
        for m, mods in enumerate(self._watch):
            if self.decided[m] is not True or self.source[m] == "override":
                continue
            for name, sub, attr in mods:
                value = float(getattr(sub, attr, 0.0) or 0.0)
                if value > 0:
                    self.decided[m] = False
                    self.source[m] = "scan"
                    self.reasons[m] = f"mode-dependent: {name or 'the encoder'} is {type(sub).__name__}({attr}={value})"
                    break

    def reuse(self, m: int) -> Optional[bool]:
        """True: reuse the full pass's features; False: run the eval-mode pass; None: check at this step."""
        return self.decided[m]

    def record(self, m: int, equal: bool, max_diff: float) -> None:
        """The outcome of the first-step check of encoder ``m``."""
        self.decided[m] = equal
        if equal:
            self.reasons[m] = "first-step check: eval-mode features equal the train-mode ones bitwise"
        else:
            self.reasons[m] = f"first-step check: eval-mode features differ (max |difference| {max_diff:.3g})"

    def state(self) -> dict:
        return {"decided": list(self.decided), "reasons": list(self.reasons)}

    def load(self, state: dict) -> None:
        if len(state["decided"]) != len(self.decided):
            raise ValueError(
                f"state: expected mode decisions for {len(self.decided)} encoders, got {len(state['decided'])}"
            )
        # An explicit override and a module found by the scan win over the checkpoint: they describe the encoders as
        # they are now. Only what the first-step check decided comes from the checkpoint.
        for m, (decided, reason) in enumerate(zip(state["decided"], state["reasons"])):
            if self.source[m] == "check":
                self.decided[m] = decided
                self.reasons[m] = reason
