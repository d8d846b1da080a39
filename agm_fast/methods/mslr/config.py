"""MSLR's hyper-parameters, declared once (docs/methods.md, section 1.7)."""

from __future__ import annotations

from ..._parse import float_list
from ..hparams import HParam, HParams, any_value, integer

__all__ = ["HPARAMS"]

HPARAMS = HParams(
    HParam("init_lr_scales", None, "initial gradient scale per modality, comma-separated (None: 1 each)", any_value,
           parse=float_list, flag="--lr-scales"),
    HParam("history", 5, "past epochs the accuracy ratio averages over", integer(low=1), parse=int),
)
