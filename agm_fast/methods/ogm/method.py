"""OGM / OGM-GE (and the journal OGM) behind the method interface: gradients scaled after backward."""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor

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
        return self.ogm.step_from_features(target, self.fusion, out.features, epoch=out.epoch)

    def method_state(self) -> Dict[str, Any]:
        return self.ogm.state_dict()

    def load_method_state(self, state) -> None:
        self.ogm.load_state_dict(state)
