"""MSLR (modality-specific learning rates), a baseline of the AGM paper (docs/methods.md, section 1.7).

Modality m's gradients are multiplied by ``init_m * ratio_m``, where ``ratio_m`` follows the modality's accuracy over
the last epochs. A modality is a module, a parameter-name prefix of ``model``, parameters or a param group.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..._select import per_modality_values, resolve_modalities
from ..._validate import check_floats
from ..hparams import declare
from .config import HPARAMS

__all__ = ["MSLR", "grads_of"]


def grads_of(params: Sequence[Tensor]) -> List[Tensor]:
    """The gradients of ``params`` that exist."""
    return [p.grad for p in params if p.grad is not None]


@declare(HPARAMS)
class MSLR:
    """Modality-specific learning rates: modality m's gradients are multiplied by ``init_m * ratio_m``.

    ``ratio_m`` is recomputed at the end of each epoch from that epoch's accuracy ``a_m(e)`` of modality m
    (validation or training accuracy of its unimodal branch, the user's choice):
    ``ratio_m = a_m(e) / mean(a_m(e-history), ..., a_m(e-1))``, the mean over the ``history`` epochs recorded
    *before* this one. Until ``history`` epochs are stored the ratio is 1.0 (the first ``history`` calls of
    :meth:`epoch_end` return ratio 1; the next one is the first informative ratio). A mean of exactly 0 gives ratio 1.
    The ratio set at the end of epoch e scales the gradients of epoch e + 1.

    Example::

        mslr = agm_fast.MSLR({"audio": model.audio_net, "visual": model.visual_net}, init_lr_scales=[1.0, 0.5])
        for epoch in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                mslr.scale_gradients_()
                opt.step()
            mslr.epoch_end({"audio": acc_audio, "visual": acc_visual})

    Args:
        modalities: dict name -> module / name prefix / parameters / param group, or a list of them (see
            :func:`resolve_modalities`).
        init_lr_scales: ``init_m > 0`` per modality (dict or sequence); default 1.0 for every modality.
        model: the model that name prefixes refer to.
        history: how many past epochs the ratio averages over (5 in the AGM paper).
    """

    def __init__(
        self,
        modalities,
        model: Optional[nn.Module] = None,
    ):
        self.history_length = self.history
        init_lr_scales = self.init_lr_scales
        self.names, self._params, _ = resolve_modalities(modalities, model)
        M = len(self.names)
        if init_lr_scales is None:
            self.init_lr_scales = [1.0] * M
        else:
            values = per_modality_values(init_lr_scales, self.names, "init_lr_scales")
            self.init_lr_scales = list(check_floats("init_lr_scales", values, M, low=0.0, low_open=True))
        self.history: List[List[float]] = [[] for _ in range(M)]
        self.ratios: List[float] = [1.0] * M
        self.epochs = 0

    @property
    def scales(self) -> List[float]:
        """The current gradient multipliers ``init_m * ratio_m``, one per modality."""
        return [i * r for i, r in zip(self.init_lr_scales, self.ratios)]

    def __repr__(self) -> str:
        return (f"MSLR(modalities={self.names}, init_lr_scales={self.init_lr_scales}, history={self.history_length}, "
                f"ratios={self.ratios}, epochs={self.epochs})")

    def end_epoch(self, accuracies) -> List[float]:
        """:meth:`epoch_end`, under the name the method interface uses."""
        return self.epoch_end(accuracies)

    def epoch_end(self, accuracies) -> List[float]:
        """Record this epoch's per-modality accuracies and update the ratios.

        Args:
            accuracies: one accuracy per modality: dict name -> float, a sequence, or a ``[M]`` tensor (read on the
                host; this is an epoch-level call).

        Returns:
            The new ratios, one per modality.
        """
        acc = per_modality_values(accuracies, self.names, "accuracies")
        for m, a in enumerate(acc):
            past = self.history[m]
            if len(past) >= self.history_length:
                mean = sum(past[-self.history_length :]) / self.history_length
                self.ratios[m] = a / mean if mean != 0 else 1.0
            else:
                self.ratios[m] = 1.0
            past.append(a)
            del past[: -self.history_length]
        self.epochs += 1
        return list(self.ratios)

    @torch.no_grad()
    def scale_gradients_(self) -> None:
        """Multiply each modality's gradients in place by ``init_m * ratio_m``; call between backward and step.

        Parameters whose ``.grad`` is None are skipped.
        """
        for scale, params in zip(self.scales, self._params):
            grads = grads_of(params)
            if grads and scale != 1.0:
                torch._foreach_mul_(grads, scale)

    def state_dict(self) -> Dict[str, object]:
        """The training state: recorded accuracies, ratios and epoch count."""
        return {
            "names": list(self.names),
            "history": [list(h) for h in self.history],
            "ratios": list(self.ratios),
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if list(state["names"]) != self.names:
            raise ValueError(f"state_dict is for modalities {list(state['names'])}, this MSLR has {self.names}")
        self.history = [list(map(float, h)) for h in state["history"]]
        self.ratios = [float(r) for r in state["ratios"]]
        self.epochs = int(state["epochs"])
