"""AGM's hyper-parameters, declared once (docs/methods.md, sections 1 and 5)."""

from __future__ import annotations

from ..._parse import cap_or_none
from ..hparams import HParam, HParams, boolean, choice, integer, number

__all__ = ["STRATEGIES", "SHAPLEY", "MASKED_MODES", "MUTES", "COEFFICIENT_HPARAMS", "SUBSET_HPARAMS", "HPARAMS"]

STRATEGIES = ("auto", "sequential", "batched", "factorized")
SHAPLEY = ("reference", "exact", "sampled", "stratified")
MASKED_MODES = ("eval", "train")
MUTES = ("input", "feature")

COEFFICIENT_HPARAMS = HParams(
    HParam("alpha", 1.0, "modulation strength (published: AV-MNIST 2.5, CREMA-D 1.5, UR-Funny 4.0)",
           number(low=0.0), parse=float),
    HParam("cap", 10.0, "upper bound on rbar - r, or 'none' for no bound",
           number(low=0.0, low_open=True, allow_none=True), parse=cap_or_none),
    HParam("hold_last", False, "keep the last coefficients outside the window (the reference) instead of 1",
           boolean, parse=bool),
)

SUBSET_HPARAMS = HParams(
    HParam("strategy", "auto", "how the subset outputs f(S) are evaluated", choice(*STRATEGIES), parse=str,
           choices=STRATEGIES),
    HParam("masked_mode", "eval", "mode of the masked passes (eval: the reference)", choice(*MASKED_MODES),
           parse=str, choices=MASKED_MODES),
    HParam("shapley", "reference", "mono-modal outputs psi (reference), exact phi, permutation-sampled or stratified",
           choice(*SHAPLEY), parse=str, choices=SHAPLEY),
    HParam("num_permutations", 16, "permutations per step with shapley='sampled'", integer(low=1), parse=int,
           flag="--permutations"),
    HParam("rounds", 2, "rounds per step with shapley='stratified' (their spread gives the variance)",
           integer(low=2), parse=int),
    HParam("mute", "input", "mute a modality by zeroing its input (the reference) or replacing its feature",
           choice(*MUTES), parse=str, choices=MUTES),
    HParam("max_batch", None, "the most rows one stacked masked pass may take (None: all)",
           integer(low=1, allow_none=True)),
    HParam("checkpoint_masked", False, "recompute the eval-mode masked passes in the backward to save memory",
           boolean, parse=bool),
)

HPARAMS = COEFFICIENT_HPARAMS + SUBSET_HPARAMS
