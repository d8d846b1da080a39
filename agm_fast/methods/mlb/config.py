"""MLB's hyper-parameters, declared once (docs/methods.md, section 11)."""

from __future__ import annotations

from ..._parse import float_or_none
from ..hparams import HParam, HParams, boolean, number

__all__ = ["HPARAMS"]

HPARAMS = HParams(
    HParam("alpha", 0.8, "modulation strength in k = 1 + tanh(alpha (r - 1)) (CREMA-D, AVE 0.8; UCF101 1.0)",
           number(low=0.0), parse=float),
    HParam("beta", None, "cap the boost of a weaker modality at beta: k = 1 + (beta - 1) tanh(alpha (r - 1)) when "
           "r > 1 (the reference's tanh_mode 2; 'none': no cap, the released configs)",
           number(low=0.0, low_open=True, allow_none=True), parse=float_or_none),
    HParam("multi_loss_only", False, "train with the unimodal losses but scale no gradient (what the later release "
           "config runs, its method name falling through to no modulation)", boolean, parse=bool),
)
