"""GDL's hyper-parameters, declared once (docs/methods.md, section 12)."""

from __future__ import annotations

from ..._parse import float_or_none
from ..hparams import HParam, HParams, choice, number

__all__ = ["BIAS_RULES", "HEAD_UNIMODAL_GRAD", "HPARAMS"]

BIAS_RULES = ("full", "split", "none")
HEAD_UNIMODAL_GRAD = ("drop", "keep")

HPARAMS = HParams(
    HParam("alpha", 4.0, "weight of the unimodal losses (CREMA-D 4 or 5, Kinetics-Sounds 2-3, VGGSound 2)",
           number(low=0.0), parse=float),
    HParam("clip_grad_norm", 40.0, "clip the global gradient norm of the encoders and the fusion head ('none': no "
           "clip; the reference: 40)", number(low=0.0, low_open=True, allow_none=True), parse=float_or_none),
    HParam("bias", "full", "a concat head's bias in each unimodal logit: full (the reference), split (b / M) or none",
           choice(*BIAS_RULES), parse=str, choices=BIAS_RULES),
    HParam("head_unimodal_grad", "drop", "the fusion head's gradient from the unimodal losses: drop (the reference "
           "as run, under DataParallel) or keep (the same script without DataParallel)",
           choice(*HEAD_UNIMODAL_GRAD), parse=str, choices=HEAD_UNIMODAL_GRAD),
)
