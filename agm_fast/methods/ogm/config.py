"""OGM / OGM-GE's hyper-parameters, declared once (docs/methods.md, sections 2 and 3)."""

from __future__ import annotations

from ..hparams import HParam, HParams, boolean, choice, integer, number

__all__ = ["MODULATION_MODES", "HPARAMS"]

MODULATION_MODES = ("Normal", "OGM", "OGM_GE")

HPARAMS = HParams(
    HParam("alpha", 0.8, "modulation strength (CREMA-D 0.8, VGGSound 0.1; journal CREMA-D 2.6)", number(low=0.0),
           parse=float),
    HParam("mode", "OGM_GE", "Normal (no modulation), OGM (scaling) or OGM_GE (scaling plus noise)",
           choice(*MODULATION_MODES)),
    HParam("conv_only", False, "modulate only 4-D (conv) weights, as the reference", boolean, parse=bool),
    HParam("continuous", False, "relu(rho - 1) in the coefficient (the code before May 2022)", boolean, parse=bool),
    HParam("journal", False, "the journal code's rules: a tie damps modality 1, a 6-epoch warm-up", boolean,
           parse=bool),
    HParam("ogm_plus", False, "the journal's OGM+: the dominant modality gets 1, the weak one plus_factor", boolean,
           parse=bool),
    HParam("warmup_epochs", None, "no modulation before this epoch (None: 6 with journal, else 0)",
           integer(low=0, allow_none=True)),
    HParam("plus_factor", 4.0, "OGM+'s coefficient of the weak modality", number(low=0.0, low_open=True),
           parse=float),
)
