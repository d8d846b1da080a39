"""Diagnosing & Re-learning's hyper-parameters, declared once (docs/methods.md, the relearning section)."""

from __future__ import annotations

from ..hparams import HParam, HParams, integer, number

__all__ = ["HPARAMS"]

HPARAMS = HParams(
    HParam("move_lambda", 3.0, "w = tanh(move_lambda * purity gap), the share of the initial weights an encoder is "
           "reset towards (the reference's CREMA-D script: 3)", number(low=0.0), parse=float),
    HParam("reinit_epoch", 20, "re-initialise after every epoch e > 0 with e % reinit_epoch == 0 (counted from 0)",
           integer(low=1), parse=int),
    HParam("reinit_num", 3, "at most this many re-initialisations", integer(low=0), parse=int),
    HParam("kmeans_restarts", 10, "k-means++ starts per clustering; the lowest inertia wins", integer(low=1),
           parse=int),
    HParam("kmeans_iters", 300, "at most this many Lloyd iterations per start", integer(low=1), parse=int),
)
