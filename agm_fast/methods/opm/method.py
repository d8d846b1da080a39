"""OPM behind the method interface: the dominant modality's features dropped in the forward."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ... import distributed
from ...fusion import per_modality_logits
from ...ops import ogm_scores
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import OPM, opm_scores

__all__ = ["OPMMethod"]


@declare(HPARAMS)
class OPMMethod(Method):
    """OPM (docs/methods.md, section 3): inside the window, each sample drops the dominant modalities' features
    with probability q_m and the loss averages over the samples that kept a modality; the coefficients reported
    are the keep probabilities ``1 - q_m``.

    Args:
        encoders, fusion, window, seed: as :class:`agm_fast.methods.Method` (classification only).
        feature_dims: the M feature sizes (default: ``fusion.dims``, which every head of :mod:`agm_fast.fusion`
            has; otherwise the sizes of the first forward's features).
        process_group: as :class:`agm_fast.OPM`.
        **hparams: OPM's hyper-parameters (``agm_fast.methods.opm.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("opm", encoders=[enc_a, enc_v], fusion=head, q_base=0.5)
    """

    accumulation = "exact"

    def __init__(
        self,
        encoders,
        fusion,
        *,
        window=None,
        seed: int = 0,
        task: str = "classification",
        feature_dims: Optional[Sequence[int]] = None,
        process_group=None,
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: OPM scores class probabilities, expected 'classification', got {task!r}")
        dims = self.feature_dims(feature_dims, required=False)
        self.opm = OPM(dims, window=window, seed=seed, process_group=process_group, **self.hparams_values)
        self.window = self.opm.window

    def forward(self, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int]) -> StepOutput:
        """Encoders, per-sample feature dropping (inside the window), then the fusion head."""
        feats = self.encode(inputs)
        if self.opm.active(epoch):
            group = self.opm.process_group
            if self.opm.theta_grad == "reference":
                scores = opm_scores(self.fusion, feats, target, group)
            else:
                with torch.no_grad():
                    logits = per_modality_logits(self.fusion, [h.detach() for h in feats])
                    scores = ogm_scores(logits, target, 0.0)[0]
                    if distributed.is_active(group):
                        scores = distributed.global_sums(scores, group)
            q = self.opm.drop_probs(scores)
            fused_in, weight = self.opm(*feats, drop_probs=q, epoch=epoch)
            coeffs = (1 - q.detach()).float()
        else:
            fused_in, weight, coeffs = feats, None, None
        out = StepOutput(self.head(fused_in), feats, weight, coeffs, epoch)
        self._set_last(out, target)
        return out

    def modules(self) -> List[nn.Module]:
        return [self.opm]

    def method_state(self) -> Dict[str, Any]:
        return self.opm.state_dict()

    def load_method_state(self, state) -> None:
        self.opm.load_state_dict(state)
