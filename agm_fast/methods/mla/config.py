"""MLA's hyper-parameters, declared once (docs/methods.md, section 16)."""

from __future__ import annotations

from ..hparams import HParam, HParams, boolean, choice

__all__ = ["ENTROPIES", "HPARAMS"]

ENTROPIES = ("batch", "sample")

HPARAMS = HParams(
    HParam("entropy", "batch", "the test-time fusion's uncertainty: 'batch' (the released code: softmax over the "
           "batch axis, one entropy per modality for the whole batch) or 'sample' (the paper: each sample's entropy "
           "over the classes, weights per sample)", choice(*ENTROPIES), parse=str, choices=ENTROPIES),
    HParam("projection", False, "project the shared head's weight gradient with the paper's orthogonal projection "
           "(the released code's parameter-name test never matches, so it never runs: off)", boolean, parse=bool),
    HParam("zero_fill", False, "in the later sub-steps of a batch, step the parameters of the earlier ones again with "
           "a zero gradient (momentum and weight decay only), as the released code does under the torch it pins "
           "(1.8, whose zero_grad fills zeros); off: what it does under torch >= 2.0", boolean, parse=bool),
)
