"""OPM's hyper-parameters, declared once (docs/methods.md, section 3.3)."""

from __future__ import annotations

from ..hparams import HParam, HParams, choice, integer, number

__all__ = ["THETA_GRADS", "HPARAMS"]

THETA_GRADS = ("reference", "none")

HPARAMS = HParams(
    HParam("q_base", 0.5, "base drop probability", number(low=0.0, high=1.0), parse=float),
    HParam("lam", 0.5, "how much the imbalance raises the drop probability", number(low=0.0), parse=float),
    HParam("p_exe", 0.7, "probability that a step drops at all", number(low=0.0, high=1.0), parse=float),
    HParam("warmup_epochs", 6, "no dropping before this epoch (the journal code: 6)", integer(low=0), parse=int),
    HParam("theta_grad", "reference", "theta's gradient: theta itself (the reference) or none",
           choice(*THETA_GRADS), parse=str, choices=THETA_GRADS),
)
