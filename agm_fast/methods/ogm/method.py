"""OGM / OGM-GE (and the journal OGM) behind the method interface: gradients scaled after backward."""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor

from ..ogm import OGMGE
from .base import Method, Option, StepOutput

__all__ = ["OGMMethod"]


class OGMMethod(Method):
    """OGM and OGM-GE (docs/methods.md, sections 2 and 3): after backward, each encoder's gradients are scaled by
    its coefficient ``k_m`` (plus Gaussian noise in mode ``"OGM_GE"``); the per-modality logits come from the fusion
    head on the step's detached features.

    Args:
        encoders, fusion, window, seed: as :class:`agm_fast.methods.Method` (classification only).
        **kwargs: the arguments of :class:`agm_fast.OGMGE` (``alpha``, ``mode``, ``conv_only``, ``continuous``,
            ``journal``, ``ogm_plus``, ``warmup_epochs``, ``plus_factor``, ``process_group``), with its defaults.
    """

    core = OGMGE
    options = (
        Option("alpha", "modulation strength (CREMA-D 0.8, VGGSound 0.1; journal CREMA-D 2.6)"),
        Option("continuous", "relu(rho - 1) in the coefficient (the code before May 2022)", type=bool),
        Option("conv_only", "modulate only 4-D (conv) weights, as the reference", type=bool),
        Option("journal", "the journal code's rules: a tie damps modality 1, a 6-epoch warm-up", type=bool),
        Option("ogm_plus", "the journal's OGM+: dominant modality 1, weak modality 4", type=bool),
    )

    def __init__(
        self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification", **kwargs: Any
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: OGM scores class probabilities, expected 'classification', got {task!r}")
        kwargs = self._core_kwargs(kwargs)
        kwargs.pop("model", None)
        self.ogm = OGMGE(list(self.encoders), window=window, seed=seed, **kwargs)
        self.window = self.ogm.window

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Scores from the detached head, coefficients, and the in-place (noisy) scaling of the gradients."""
        out, target = self._resolve(out, target)
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        return self.ogm.step_from_features(target, self.fusion, out.features, epoch=out.epoch)

    def state_dict(self) -> Dict[str, Any]:
        return self.ogm.state_dict()

    def load_state_dict(self, state) -> None:
        self.ogm.load_state_dict(state)
