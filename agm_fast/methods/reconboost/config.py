"""ReconBoost's hyper-parameters, declared once (docs/methods.md, section 17)."""

from __future__ import annotations

from ..hparams import HParam, HParams, boolean, integer, number

__all__ = ["HPARAMS"]

HPARAMS = HParams(
    HParam("epochs_per_stage", 4, "epochs of a stage's boosting phase (one modality learns what the others miss)",
           integer(low=1), parse=int),
    HParam("correct_epochs", 4, "epochs of a stage's rectification phase (every trained modality, the shared head "
           "and the boost rate on the ensemble's cross-entropy)", integer(low=0), parse=int),
    HParam("weight1", 5.0, "weight of the boosting loss's own cross-entropy term", number(low=0.0), parse=float),
    HParam("weight2", 1.0, "weight of the boosting loss's term weighted by the others' probability of the true class",
           number(low=0.0), parse=float),
    HParam("ga_weight", 0.5, "weight of the gradient-assist term (the released --alpha)", number(low=0.0),
           parse=float),
    HParam("boost_rate", 1.0, "initial boost rate (a trained scalar that multiplies the ensemble's summed outputs)",
           number(), parse=float),
    HParam("ga_gradient", False, "give the gradient-assist term a gradient through the boosted modality's output "
           "(the paper; the released code detaches both sides, so the term has none: off)", boolean, parse=bool),
)
