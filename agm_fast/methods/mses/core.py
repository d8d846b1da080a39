"""MSES (modality-specific early stopping), a baseline of the AGM paper (docs/methods.md, section 1.7).

A modality whose smoothed validation loss has not improved for ``patience`` epochs stops: its best parameters are
restored and its gradients are removed from then on.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from ..._select import per_modality_values, resolve_modalities
from ..hparams import declare
from ..mslr.core import grads_of
from .config import HPARAMS

__all__ = ["MSES"]


@declare(HPARAMS)
class MSES:
    """Modality-specific early stopping on smoothed per-modality validation losses.

    At the end of epoch e (counted from 0) with raw validation loss ``L_m(e)`` of modality m, the smoothed loss is
    ``Ls_m(e) = smoothing * L_m(e-1) + (1 - smoothing) * L_m(e)`` (the previous **raw** loss; docs/methods.md,
    section 1.7), and
    ``Ls_m(0) = L_m(0)``. The best epoch is the first epoch with the smallest smoothed loss; whenever it changes, a
    copy of the modality's parameters and buffers is kept. When ``e - best_epoch > patience`` the modality stops: its
    best state is copied back into its parameters and buffers, and from then on :meth:`scale_gradients_` removes its
    gradients. With ``skip_optimizer=True`` (default) they are set to None, so optimizers skip those parameters and
    they stay at the restored state; with False they are zeroed (the literal "gradients become 0"), in which
    case momentum or weight decay in the optimizer may still move them.

    Example::

        mses = agm_fast.MSES({"audio": model.audio_net, "visual": model.visual_net}, patience=3)
        for epoch in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                mses.scale_gradients_()
                opt.step()
            stopped = mses.epoch_end({"audio": val_loss_audio, "visual": val_loss_visual})

    Args:
        modalities: dict name -> module / name prefix / parameters / param group, or a list of them.
        patience: epochs without improvement of the smoothed loss that are tolerated (default 5).
        smoothing: weight of the previous raw loss (0.6 in the AGM paper).
        model: the model that name prefixes refer to.
        skip_optimizer: set a stopped modality's gradients to None (True) or to zero (False).

    The kept best state costs one copy of each modality's parameters and buffers, on their device. Buffers such as
    BatchNorm running statistics are restored too, but later train-mode forward passes keep updating them; put a
    stopped module in eval mode to freeze them.
    """

    def __init__(
        self,
        modalities,
        model: Optional[nn.Module] = None,
    ):
        patience, smoothing, skip_optimizer = self.patience, self.smoothing, self.skip_optimizer
        self.names, self._params, self._buffers = resolve_modalities(modalities, model, with_buffers=True)
        M = len(self.names)
        self.patience = patience
        self.smoothing = float(smoothing)
        self.skip_optimizer = skip_optimizer
        self.epochs = 0
        self.prev_raw: List[Optional[float]] = [None] * M
        self.smoothed: List[List[float]] = [[] for _ in range(M)]
        self.best_epoch: List[int] = [-1] * M
        self.best_loss: List[float] = [math.inf] * M
        self.stopped: List[bool] = [False] * M
        self.stop_epoch: List[Optional[int]] = [None] * M
        self._best_state: List[Optional[List[Tensor]]] = [None] * M

    def _tensors(self, m: int) -> List[Tensor]:
        return list(self._params[m]) + list(self._buffers[m])

    def __repr__(self) -> str:
        return (f"MSES(modalities={self.names}, patience={self.patience}, smoothing={self.smoothing}, "
                f"skip_optimizer={self.skip_optimizer}, stopped={self.stopped}, epochs={self.epochs})")

    def end_epoch(self, val_losses) -> List[str]:
        """:meth:`epoch_end`, under the name the method interface uses."""
        return self.epoch_end(val_losses)

    @torch.no_grad()
    def epoch_end(self, val_losses) -> List[str]:
        """Record this epoch's per-modality validation losses; stop and restore modalities that ran out of patience.

        Args:
            val_losses: one loss per modality: dict name -> float, a sequence, or a ``[M]`` tensor.

        Returns:
            The names of the modalities stopped at this epoch.
        """
        losses = per_modality_values(val_losses, self.names, "val_losses")
        e = self.epochs
        newly = []
        for m, raw in enumerate(losses):
            prev = self.prev_raw[m]
            smooth = raw if prev is None else self.smoothing * prev + (1.0 - self.smoothing) * raw
            self.prev_raw[m] = raw
            self.smoothed[m].append(smooth)
            if self.stopped[m]:
                continue
            if smooth < self.best_loss[m]:
                self.best_loss[m] = smooth
                self.best_epoch[m] = e
                self._best_state[m] = [t.detach().clone() for t in self._tensors(m)]
            if e - self.best_epoch[m] > self.patience:
                self.stopped[m] = True
                self.stop_epoch[m] = e
                for t, best in zip(self._tensors(m), self._best_state[m]):
                    t.copy_(best)
                newly.append(self.names[m])
        self.epochs += 1
        return newly

    @torch.no_grad()
    def scale_gradients_(self) -> None:
        """Remove the gradients of stopped modalities (None or zeros, see ``skip_optimizer``); call before step."""
        for m, params in enumerate(self._params):
            if not self.stopped[m]:
                continue
            if self.skip_optimizer:
                for p in params:
                    p.grad = None
            else:
                grads = grads_of(params)
                if grads:
                    torch._foreach_zero_(grads)

    def state_dict(self) -> Dict[str, object]:
        """The training state, including the kept best states (tensors)."""
        return {
            "names": list(self.names),
            "epochs": self.epochs,
            "prev_raw": list(self.prev_raw),
            "smoothed": [list(s) for s in self.smoothed],
            "best_epoch": list(self.best_epoch),
            "best_loss": list(self.best_loss),
            "stopped": list(self.stopped),
            "stop_epoch": list(self.stop_epoch),
            # Zeros stand in for a best state not recorded yet (has_best False), so that the keys and shapes do not
            # change during training (a sharded checkpoint loads into a fresh state).
            "best_state": [
                [t.detach().clone() for t in s] if s is not None else [torch.zeros_like(t) for t in self._tensors(m)]
                for m, s in enumerate(self._best_state)
            ],
            "has_best": [s is not None for s in self._best_state],
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if list(state["names"]) != self.names:
            raise ValueError(f"state_dict is for modalities {list(state['names'])}, this MSES has {self.names}")
        for m, s in enumerate(state["best_state"]):
            if s is not None and len(s) != len(self._tensors(m)):
                raise ValueError(
                    f"state_dict holds {len(s)} tensors for modality {self.names[m]!r}, "
                    f"the selection has {len(self._tensors(m))}"
                )
        self.epochs = int(state["epochs"])
        self.prev_raw = list(state["prev_raw"])
        self.smoothed = [list(s) for s in state["smoothed"]]
        self.best_epoch = list(state["best_epoch"])
        self.best_loss = list(state["best_loss"])
        self.stopped = list(state["stopped"])
        self.stop_epoch = list(state["stop_epoch"])
        has_best = state.get("has_best", [s is not None for s in state["best_state"]])
        self._best_state = [
            None if s is None or not has else [b.to(t.device, t.dtype) for b, t in zip(s, self._tensors(m))]
            for m, (s, has) in enumerate(zip(state["best_state"], has_best))
        ]
