"""AMSS / AMSS+'s hyper-parameters, declared once (docs/methods.md, section 13)."""

from __future__ import annotations

from ..hparams import HParam, HParams, boolean, choice, number

__all__ = ["HPARAMS", "LAYER_RULES", "SELECTIONS", "ENERGIES"]

LAYER_RULES = ("all", "reference")
SELECTIONS = ("sample", "topk")
ENERGIES = ("gn", "gn_wn", "sqrt_gn")

HPARAMS = HParams(
    HParam("plus", False, "AMSS+: kept channels scaled by 1 / (q_o + 1 / C) (sampling only)", boolean,
           parse=bool, flag="--amss-plus"),
    HParam("temperature", 0.2, "temperature T of the softmax over the modality ratios",
           number(low=0.0, low_open=True), parse=float),
    HParam("offset", 0.5, "added to -CE_m + H(Y) in the ratio numerator (a numerator <= 0 gives c = 0.5 for all)",
           number(), parse=float),
    HParam("layers", "all", "masked weights: every Linear/Conv weight of an encoder, or ResNet block convs "
           "('layer' and 'conv' in the name, 4-D)", choice(*LAYER_RULES), parse=str, choices=LAYER_RULES,
           flag="--amss-layers"),
    HParam("selection", "sample", "kept channels drawn without replacement by gradient energy, or the top-k",
           choice(*SELECTIONS), parse=str, choices=SELECTIONS, flag="--amss-selection"),
    HParam("energy", "gn", "channel energy: sum g^2, divided by sum w^2, or its square root", choice(*ENERGIES),
           parse=str, choices=ENERGIES, flag="--amss-energy"),
)
