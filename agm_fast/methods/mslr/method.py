"""MSLR behind the method interface: each encoder's gradients scaled by its accuracy trend."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from torch import Tensor

from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import MSLR

__all__ = ["MSLRMethod"]


@declare(HPARAMS)
class MSLRMethod(Method):
    """MSLR (docs/methods.md, section 1.7): inside the window, encoder m's gradients are multiplied by
    ``init_m * ratio_m``; the ratios follow ``metrics["modality_accuracy"]`` at each :meth:`end_epoch` in the window.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        **hparams: MSLR's hyper-parameters (``agm_fast.methods.mslr.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("mslr", encoders=[enc_a, enc_v], fusion=head, history=5)
    """

    accumulation = "exact"

    needs_epoch_metrics = True

    def __init__(
        self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification"
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        self.mslr = MSLR(list(self.encoders), **self.hparams_values)

    def first_active_epoch(self) -> Optional[int]:
        """The first epoch after ``history`` + 1 epochs of the window: the first ratio other than 1 is set at the end
        of the window's epoch ``history`` and scales the next one."""
        return self.window.start + self.mslr.history_length + 1

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        self.mslr.scale_gradients_()
        return self.constant(self.mslr.scales, target.device)

    def end_epoch(self, epoch: int, metrics: Mapping[str, Sequence[float]]) -> None:
        if self.in_window(epoch):
            self.mslr.epoch_end(self._metric(metrics, "modality_accuracy"))

    def method_state(self) -> Dict[str, Any]:
        return self.mslr.state_dict()

    def load_method_state(self, state) -> None:
        self.mslr.load_state_dict(state)
