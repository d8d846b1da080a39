"""MSES behind the method interface: a modality whose validation loss stops improving is restored and frozen."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from torch import Tensor

from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import MSES

__all__ = ["MSESMethod"]


@declare(HPARAMS)
class MSESMethod(Method):
    """MSES (docs/methods.md, section 1.7): at each :meth:`end_epoch` in the window, the smoothed
    ``metrics["modality_loss"]`` decide which modalities stop; inside the window a stopped modality's gradients are
    removed. The coefficients are 1 for a training modality and 0 for a stopped one.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        **hparams: MSES's hyper-parameters (``agm_fast.methods.mses.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("mses", encoders=[enc_a, enc_v], fusion=head, patience=5)
    """

    accumulation = "exact"

    needs_epoch_metrics = True

    def __init__(
        self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification"
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        self.mses = MSES(list(self.encoders), **self.hparams_values)

    def first_active_epoch(self) -> Optional[int]:
        """The earliest epoch a modality can be stopped in: its loss must fail to improve for ``patience`` epochs after
        the window's first, and the stop acts from the next epoch on."""
        return self.window.start + self.mses.patience + 2

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        self.mses.scale_gradients_()
        return self.constant([0.0 if stopped else 1.0 for stopped in self.mses.stopped], target.device)

    def end_epoch(self, epoch: int, metrics: Mapping[str, Sequence[float]]) -> None:
        if self.in_window(epoch):
            self.mses.epoch_end(self._metric(metrics, "modality_loss"))

    def method_state(self) -> Dict[str, Any]:
        return self.mses.state_dict()

    def load_method_state(self, state) -> None:
        self.mses.load_state_dict(state)
