"""Diagnosing & Re-learning behind the method interface: a clustering diagnosis of each encoder from passes over the
training and validation data, then a soft re-initialisation of each encoder."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ... import distributed
from ...fusion import output_layer
from ..base import Method, StepOutput
from ..epoch_data import EpochPass
from ..hparams import declare
from .config import HPARAMS
from .core import kmeans, minmax_scale, purity, relearn_weights, soft_reinit_

__all__ = ["RelearningMethod"]


def _gather_rows(x: Tensor, process_group) -> Tensor:
    """Every rank's rows of ``x`` in rank order (ranks may hold different numbers of rows)."""
    if not distributed.is_active(process_group):
        return x
    world = dist.get_world_size(process_group)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=process_group)
    top = int(max(int(s) for s in sizes))
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=process_group)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


@declare(HPARAMS)
class RelearningMethod(Method):
    """Diagnosing & Re-learning (Wei et al., ECCV 2024; docs/methods.md, the relearning section) with the reference's
    schedule.

    After every epoch ``e > 0`` with ``e % reinit_epoch == 0`` in the window (at most ``reinit_num`` times), two
    passes collect each encoder's features of all the training and validation rows (eval mode, no gradients); per
    modality and split, k-means (C clusters, on the device) of the min-max scaled features gives a purity; the gap
    ``|purity_train - purity_val|`` gives ``w_m = tanh(move_lambda * gap)`` and every parameter of encoder m becomes
    ``w_m theta_0 + (1 - w_m) theta`` (theta_0: its value when the method was built). The training step is joint
    training's.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method` (``task`` must be classification).
        num_classes: C, the number of clusters (default: the fusion head's output size).
        process_group: the data-parallel group (None: the default group when ``torch.distributed`` is
            initialised): every rank gathers all ranks' features and clusters them alike, so every rank makes the
            same re-initialisation.
        **hparams: the hyper-parameters (``agm_fast.methods.relearning.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("relearning", encoders=[enc_a, enc_v], fusion=head, move_lambda=3.0)
    """

    accumulation = "exact"

    def __init__(self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification",
                 num_classes: Optional[int] = None, process_group=None) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: the purity compares clusters with classes; expected 'classification', got "
                             f"{task!r}")
        distributed.is_active(process_group)  # checks its type
        self.process_group = process_group
        if num_classes is None:
            num_classes = output_layer(fusion).weight.shape[0]
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        #: Each encoder's parameters when the method was built (theta_0).
        self.initial: List[List[Tensor]] = [[p.detach().clone() for p in enc.parameters()] for enc in self.encoders]
        self.reinits = 0
        self.keep: List[float] = [1.0] * self.num_modalities
        self._features: Dict[str, List[List[Tensor]]] = {}
        self._diagnosis: Dict[str, Tensor] = {}

    def first_active_epoch(self) -> Optional[int]:
        """The first re-initialisation epoch in the window (its end changes the weights); None if none can come."""
        if self.reinit_num == 0:
            return None
        start = max(self.window.start, 1)
        first = -(-start // self.reinit_epoch) * self.reinit_epoch
        return first if self.window.end is None or first <= self.window.end else None

    def _due(self, epoch: int) -> bool:
        return epoch > 0 and epoch % self.reinit_epoch == 0 and self.reinits < self.reinit_num and \
            self.in_window(epoch)

    def epoch_passes(self, epoch: int) -> Sequence[EpochPass]:
        """Passes over all the training and validation data at the end of a re-initialisation epoch."""
        return [EpochPass("train", "end"), EpochPass("val", "end")] if self._due(epoch) else []

    def begin_pass(self, request: EpochPass, epoch: int, device: torch.device) -> Dict[str, Tensor]:
        self._features[request.split] = [[] for _ in range(self.num_modalities)] + [[]]
        return {}

    def pass_batch(self, request: EpochPass, batch) -> None:
        rows = self._features[request.split]
        for m, h in enumerate(batch.features):
            rows[m].append(h.reshape(h.shape[0], -1).float())
        rows[-1].append(batch.target)
        return None

    def _purities(self, split: str, process_group) -> Tensor:
        rows = self._features.pop(split)
        if not rows[-1]:
            raise ValueError(f"{split}: the re-learning diagnosis read no {split} batch; expected at least one")
        labels = _gather_rows(torch.cat(rows[-1]), process_group)
        out = []
        for m in range(self.num_modalities):
            x = minmax_scale(_gather_rows(torch.cat(rows[m]), process_group))
            gen = torch.Generator(device=x.device).manual_seed(self.seed + 7919 * (self.reinits + 1) + m)
            clusters = kmeans(x, self.num_classes, self.kmeans_restarts, self.kmeans_iters, generator=gen)
            out.append(purity(labels, clusters))
        return torch.stack(out)

    def finish_pass(self, request: EpochPass, epoch: int, sums, process_group=None) -> None:
        if request.split != "val" or "train" not in self._features:
            return
        group = process_group if process_group is not None else self.process_group
        train = self._purities("train", group)
        val = self._purities("val", group)
        w = relearn_weights(train, val, self.move_lambda)
        for m, enc in enumerate(self.encoders):
            soft_reinit_(list(enc.parameters()), self.initial[m], float(w[m]))
        self.reinits += 1
        self.keep = [1.0 - float(v) for v in w]
        self._diagnosis = {"train_purity": train, "val_purity": val, "weight": w}

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """``1 - w_m`` of the last re-initialisation (the share of the trained weights it kept; ones before the
        first). The gradients are not touched."""
        out, target = self._resolve(out, target)
        return self.constant(self.keep, target.device)

    def decisions(self) -> Dict[str, Tensor]:
        """The last diagnosis: ``"train_purity"``, ``"val_purity"`` and ``"weight"`` (w_m), each ``[M]``; empty
        before the first."""
        return dict(self._diagnosis)

    def method_state(self) -> Dict[str, Any]:
        return {"initial": [[t.clone() for t in ts] for ts in self.initial], "reinits": self.reinits,
                "keep": list(self.keep)}

    def load_method_state(self, state) -> None:
        initial = state["initial"]
        if len(initial) != self.num_modalities:
            raise ValueError(f"state: {len(initial)} encoders' initial weights, expected {self.num_modalities}")
        self.initial = [[t.clone() for t in ts] for ts in initial]
        self.reinits = int(state["reinits"])
        self.keep = [float(v) for v in state["keep"]]
