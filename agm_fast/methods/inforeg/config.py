"""InfoReg's hyper-parameters, declared once (docs/methods.md, section 10)."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

from ..._parse import float_list
from ..hparams import HParam, HParams, choice, integer, number

__all__ = ["HPARAMS", "SCORES", "TRACE_MODALITIES"]

TRACE_MODALITIES = ("first", "leader")
SCORES = ("sum", "mean")


def _bases(name: str, value: Any) -> Optional[Tuple[float, ...]]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a sequence of M numbers > 0 (one per modality), got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}[{i}]: expected a finite number > 0, got {v!r}")
        out.append(float(v))
    if len(out) < 2:
        raise ValueError(f"{name}: expected M >= 2 numbers (one per modality), got {len(out)}")
    return tuple(out)


HPARAMS = HParams(
    HParam("beta_bases", None, "base of the leader's proximal strength per modality, comma-separated (None: the "
           "code's 0.95 for modality 0 and 0.1 for every other)", _bases, parse=float_list, flag="--beta-bases"),
    HParam("threshold", 0.05, "regulate only while the trace growth ratio k exceeds it", number(), parse=float),
    HParam("trace_window", 10, "epochs the trace growth ratio k averages over (and zero padding)", integer(low=1),
           parse=int),
    HParam("trace_modality", "first", "whose trace gives k: 'first' (modality 0, the code) or 'leader' (the paper)",
           choice(*TRACE_MODALITIES), parse=str, choices=TRACE_MODALITIES),
    HParam("score", "sum", "per-modality score: 'sum' (the code: batch sum of true-class probabilities) or 'mean'",
           choice(*SCORES), parse=str, choices=SCORES, flag="--inforeg-score"),
)
