"""CGGM's hyper-parameters, declared once (docs/methods.md, section 4)."""

from __future__ import annotations

from ..._parse import float_or_none
from ..hparams import HParam, HParams, choice, number

__all__ = ["DIRECTIONS", "HPARAMS", "METHOD_HPARAMS"]

DIRECTIONS = ("weights", "gradient")

HPARAMS = HParams(
    HParam("rho", 1.3, "gradient magnitude scale", number(low=0.0, low_open=True), parse=float),
    HParam("lam", 0.1, "weight of the direction loss term", number(low=0.0), parse=float),
    HParam("direction", "weights", "cosine between head weights (the reference) or gradients (the paper)",
           choice(*DIRECTIONS), parse=str, choices=DIRECTIONS),
    HParam("bound", None, "clamp every B_m to [-bound, bound] ('none': no bound, the reference)",
           number(low=0.0, low_open=True, allow_none=True), parse=float_or_none),
    HParam("min_coeff", None, "clamp every B_m from below, e.g. 0 so that no encoder's gradient is reversed ('none': "
           "the reference)", number(allow_none=True), parse=float_or_none),
)

# What the training-step adapter adds: how the heads are trained and the reference's gradient-norm clip.
METHOD_HPARAMS = HPARAMS + HParams(
    HParam("head_lr_scale", 0.5, "the heads' learning rate over the main one (the reference: 0.5)",
           number(low=0.0, low_open=True), parse=float),
    HParam("clip_grad_norm", 0.8, "clip the global gradient norm after the scaling ('none': no clip; the "
           "reference: 0.8)", number(low=0.0, low_open=True, allow_none=True),
           parse=float_or_none),
)
