"""MSLR behind the method interface: each encoder's gradients scaled by its accuracy trend."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from torch import Tensor

from ..mslr import MSLR
from ._parse import float_list
from .base import Method, Option, StepOutput

__all__ = ["MSLRMethod"]


class MSLRMethod(Method):
    """MSLR (docs/methods.md, section 1.7): inside the window, encoder m's gradients are multiplied by
    ``init_m * ratio_m``; the ratios follow ``metrics["modality_accuracy"]`` at each :meth:`end_epoch` in the window.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        **kwargs: the arguments of :class:`agm_fast.MSLR` (``init_lr_scales``, ``history``), with its defaults.
    """

    needs_epoch_metrics = True
    core = MSLR
    options = (
        Option("init_lr_scales", "initial gradient scale per modality, comma-separated (default 1 each)",
               type=float_list, flag="--lr-scales"),
        Option("history", "past epochs the accuracy ratio averages over", type=int),
    )

    def __init__(
        self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification", **kwargs: Any
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        self.mslr = MSLR(list(self.encoders), **self._core_kwargs(kwargs))

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        self.mslr.scale_gradients_()
        return self.constant(self.mslr.scales, target.device)

    def end_epoch(self, epoch: int, metrics: Mapping[str, Sequence[float]]) -> None:
        if self.in_window(epoch):
            self.mslr.epoch_end(self._metric(metrics, "modality_accuracy"))

    def state_dict(self) -> Dict[str, Any]:
        return self.mslr.state_dict()

    def load_state_dict(self, state) -> None:
        self.mslr.load_state_dict(state)
