"""OGM / OGM-GE (and the journal OGM) behind the method interface: gradients scaled after backward."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import Tensor

from ... import distributed
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import OGMGE

__all__ = ["OGMMethod"]


@declare(HPARAMS)
class OGMMethod(Method):
    """OGM and OGM-GE (docs/methods.md, sections 2 and 3): after backward, each encoder's gradients are scaled by
    its coefficient ``k_m`` (plus Gaussian noise in mode ``"OGM_GE"``); the per-modality logits come from the fusion
    head on the step's detached features.

    Args:
        encoders, fusion, window, seed: as :class:`agm_fast.methods.Method` (classification only).
        process_group: as :class:`agm_fast.OGMGE`.
        **hparams: OGM's hyper-parameters (``agm_fast.methods.ogm.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("ogm_ge", encoders=[enc_a, enc_v], fusion=head, alpha=0.8)
    """

    accumulation = "hooks"

    def __init__(
        self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification", process_group=None,
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: OGM scores class probabilities, expected 'classification', got {task!r}")
        self.ogm = OGMGE(list(self.encoders), window=window, seed=seed, process_group=process_group,
                         **self.hparams_values)
        self.window = self.ogm.window

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Scores from the detached head, coefficients, and the in-place (noisy) scaling of the gradients."""
        out, target = self._resolve(out, target)
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        if self.accumulating:
            return self.finish_accumulated_step()
        return self.ogm.step_from_features(target, self.fusion, out.features, epoch=out.epoch)

    def modulated_parameters(self) -> List[List[Tensor]]:
        return [list(ps) for ps in self.ogm.params]

    def micro_batch_decision(self, out: StepOutput, target: Tensor) -> Tensor:
        """This micro-batch's coefficients (and noise offset), from the detached head on its features."""
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        if self.ogm.mode == "OGM_GE" and distributed.is_active(self.ogm.process_group):
            raise ValueError(
                "steps: OGM-GE's noise needs each micro-batch's gradient averaged over the ranks, which DDP's "
                "accumulation (no_sync) never forms; use OGM, or no gradient accumulation, under data parallelism"
            )
        coeffs, self._micro_active = self.ogm.decide(target, self.ogm.features_logits(self.fusion, out.features),
                                                     epoch=out.epoch)
        self._micro_offset = self.ogm.offset - 1
        return coeffs

    def modulate_micro_gradient(self, m: int, index: int, grad: Tensor, coeffs: Tensor) -> Tensor:
        if not self._micro_active:
            return grad
        return self.ogm.modulate_one(m, index, grad, coeffs, self._micro_offset)

    def method_state(self) -> Dict[str, Any]:
        return self.ogm.state_dict()

    def load_method_state(self, state) -> None:
        self.ogm.load_state_dict(state)
