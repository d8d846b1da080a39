"""MMPareto's hyper-parameters, declared once (docs/methods.md, section 9)."""

from __future__ import annotations

from ..hparams import HParam, HParams, choice, number

__all__ = ["HPARAMS", "RESCALES"]

RESCALES = ("tensor", "encoder", "none")

HPARAMS = HParams(
    HParam("encoder_scale", 1.5, "factor on the encoders' combined gradients (the reference: 1.5; 1.0: none)",
           number(low=0.0, low_open=True), parse=float),
    HParam("rescale", "tensor", "raise the combined gradient's norm to that of g_mm + g_u, never lower it: per "
           "parameter tensor (the reference), per encoder, or not at all", choice(*RESCALES), parse=str,
           choices=RESCALES),
)
