"""MSES behind the method interface: a modality whose validation loss stops improving is restored and frozen."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from torch import Tensor

from ..mslr import MSES
from .base import Method, Option, StepOutput

__all__ = ["MSESMethod"]


class MSESMethod(Method):
    """MSES (docs/methods.md, section 1.7): at each :meth:`end_epoch` in the window, the smoothed
    ``metrics["modality_loss"]`` decide which modalities stop; inside the window a stopped modality's gradients are
    removed. The coefficients are 1 for a training modality and 0 for a stopped one.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        **kwargs: the arguments of :class:`agm_fast.MSES` (``patience``, ``smoothing``, ``skip_optimizer``), with
            its defaults.
    """

    needs_epoch_metrics = True
    core = MSES
    options = (
        Option("patience", "epochs without improvement of the smoothed loss before a stop", type=int),
        Option("smoothing", "weight of the previous raw loss in the smoothed loss"),
    )

    def __init__(
        self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification", **kwargs: Any
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        self.mses = MSES(list(self.encoders), **self._core_kwargs(kwargs))

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        self.mses.scale_gradients_()
        return self.constant([0.0 if stopped else 1.0 for stopped in self.mses.stopped], target.device)

    def end_epoch(self, epoch: int, metrics: Mapping[str, Sequence[float]]) -> None:
        if self.in_window(epoch):
            self.mses.epoch_end(self._metric(metrics, "modality_loss"))

    def state_dict(self) -> Dict[str, Any]:
        return self.mses.state_dict()

    def load_state_dict(self, state) -> None:
        self.mses.load_state_dict(state)
