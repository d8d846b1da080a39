"""PMR's hyper-parameters, declared once (docs/methods.md, the PMR section)."""

from __future__ import annotations

from ..hparams import HParam, HParams, boolean, choice, number

__all__ = ["HPARAMS", "PROTO_DATA"]

PROTO_DATA = ("train", "val")

HPARAMS = HParams(
    HParam("alpha", 1.0, "strength of the prototype cross-entropy of a trailing modality (the reference's default; "
           "its CREMA-D script 3.0)", number(low=0.0), parse=float),
    HParam("proto_momentum", 0.2, "share of the old prototypes kept at each update, P = (1 - m) P_new + m P_old "
           "(its CREMA-D script 0.0)", number(low=0.0, high=1.0, high_open=True), parse=float),
    HParam("proto_fraction", 0.1, "share of the batches the prototype pass reads (the reference: the first tenth of "
           "the shuffled training batches; 1.0: all)", number(low=0.0, high=1.0, low_open=True), parse=float),
    HParam("proto_data", "train", "the data the prototypes come from (the reference: train; val for AVE and "
           "CG-MNIST)", choice(*PROTO_DATA), parse=str, choices=PROTO_DATA),
    HParam("ratio_strength", False, "the paper's strength alpha tanh(rho - 1), growing with the score ratio rho, "
           "instead of the reference's alpha for any trailing modality", boolean, parse=bool),
    HParam("first_epoch_ema", False, "blend the prototypes after epoch 0 too (the reference replaces them there, "
           "blending from epoch 1 on)", boolean, parse=bool),
)
