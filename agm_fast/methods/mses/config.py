"""MSES's hyper-parameters, declared once (docs/methods.md, section 1.7)."""

from __future__ import annotations

from ..hparams import HParam, HParams, boolean, integer, number

__all__ = ["HPARAMS"]

HPARAMS = HParams(
    HParam("patience", 5, "epochs without improvement of the smoothed loss before a stop", integer(low=0),
           parse=int),
    HParam("smoothing", 0.6, "weight of the previous raw loss in the smoothed loss", number(low=0.0, high=1.0),
           parse=float),
    HParam("skip_optimizer", True, "a stopped modality's gradients are removed, so the optimizer skips it", boolean),
)
