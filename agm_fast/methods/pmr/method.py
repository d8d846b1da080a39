"""PMR behind the method interface: class prototypes from an epoch pass, and a prototype cross-entropy for every
modality that trails."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import distributed
from ...fusion import output_layer
from ..base import Method, StepOutput
from ..epoch_data import EpochPass
from ..hparams import declare
from .config import HPARAMS
from .core import pmr_strength, prototype_logits, update_prototypes

__all__ = ["PMRMethod"]


@declare(HPARAMS)
class PMRMethod(Method):
    """PMR (Fan et al., CVPR 2023; docs/methods.md, the PMR section) with the reference's training step.

    Prototypes ``P_m`` (class means of encoder m's features) come from a pass over the data (the epoch hook): one at
    the start of the run's first epoch and one at the end of every epoch, blended as ``(1 - proto_momentum) P_new +
    proto_momentum P_old``. Inside the window the loss adds ``sum_m beta_m CE(-||h_m - P_m||, y)``; ``beta_m =
    alpha`` for every modality whose prototype score ``s_m`` (the batch sum of its true-class prototype
    probabilities) is below the largest. Outside the window: joint training.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method` (``task`` must be classification).
        num_classes: C (default: the fusion head's output size).
        feature_dims: the M feature sizes (default: ``fusion.dims``; needed when a rank's shard of a pass can be
            empty, so that its zero sums have their shape).
        process_group: the data-parallel group (None: the default group when ``torch.distributed`` is
            initialised): the step's scores are global-batch sums; the passes' sums are reduced by the trainer.
        **hparams: PMR's hyper-parameters (``agm_fast.methods.pmr.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("pmr", encoders=[enc_a, enc_v], fusion=head, alpha=3.0)
    """

    accumulation = "exact"

    def __init__(self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification",
                 num_classes: Optional[int] = None, feature_dims: Optional[Sequence[int]] = None,
                 process_group=None) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: PMR's prototypes are class means; expected 'classification', got {task!r}")
        distributed.is_active(process_group)  # checks its type
        self.process_group = process_group
        if num_classes is None:
            num_classes = output_layer(fusion).weight.shape[0]
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        dims = feature_dims if feature_dims is not None else getattr(fusion, "dims", None)
        self._dims = None if dims is None else self.feature_dims(dims)
        #: The M prototypes ``[C, D_m]`` (float32), None before the first pass.
        self.prototypes: Optional[List[Tensor]] = None
        self._decisions: Dict[str, Tensor] = {}
        self._pending = None

    # The epoch hook: the prototypes.
    def epoch_passes(self, epoch: int) -> Sequence[EpochPass]:
        """A pass at the start of the run's first epoch (no prototypes yet) and one at the end of every epoch
        before the window's last."""
        end = self.window.end
        passes = []
        if self.prototypes is None and (end is None or epoch <= end):
            passes.append(EpochPass(self.proto_data, "start", self.proto_fraction))
        if end is None or epoch < end:
            passes.append(EpochPass(self.proto_data, "end", self.proto_fraction))
        return passes

    def begin_pass(self, request: EpochPass, epoch: int, device: torch.device) -> Dict[str, Tensor]:
        zeros = {"count": torch.zeros(self.num_classes, device=device)}
        for m, d in enumerate(self._dims or []):
            zeros[f"sum{m}"] = torch.zeros(self.num_classes, d, device=device)
        return zeros

    def pass_batch(self, request: EpochPass, batch) -> Dict[str, Tensor]:
        y = batch.target
        sums = {"count": torch.bincount(y, minlength=self.num_classes).float()}
        for m, h in enumerate(batch.features):
            h = h.reshape(h.shape[0], -1).float()
            sums[f"sum{m}"] = torch.zeros(self.num_classes, h.shape[1], device=h.device).index_add_(0, y, h)
        return sums

    def finish_pass(self, request: EpochPass, epoch: int, sums: Dict[str, Tensor], process_group=None) -> None:
        if f"sum{self.num_modalities - 1}" not in sums:
            raise ValueError(f"sums: the prototype pass of epoch {epoch} read no batch; expected the {request.split} "
                             "data to have at least one batch")
        blend = self.prototypes is not None and request.when == "end" and (epoch > 0 or self.first_epoch_ema)
        old = self.prototypes or [None] * self.num_modalities
        self.prototypes = [update_prototypes(old[m], sums[f"sum{m}"], sums["count"], self.proto_momentum, blend)
                           for m in range(self.num_modalities)]

    # The step.
    def _decide(self, features: Sequence[Tensor], target: Tensor):
        if self.prototypes is None:
            raise RuntimeError(
                f"{self.name or 'pmr'}: no prototypes yet; run agm_fast.methods.run_epoch_passes(method, epoch, "
                "'start', train_loader) at each epoch start and with 'end' at each epoch end (the trainers do)"
            )
        if self.prototypes[0].device != target.device:
            self.prototypes = [p.to(target.device) for p in self.prototypes]
        logits = [prototype_logits(h, p) for h, p in zip(features, self.prototypes)]
        with torch.no_grad():
            scores = torch.stack([z.softmax(1).gather(1, target[:, None]).sum() for z in logits])
            if distributed.is_active(self.process_group):
                scores = distributed.all_reduce_sum(scores, self.process_group, async_op=False).wait()
            rho, beta = pmr_strength(scores, self.alpha, self.ratio_strength)
        return logits, scores, rho, beta

    def loss_term(self, task_loss: Tensor, out: StepOutput) -> Optional[Tensor]:
        """Inside the window, ``sum_m beta_m CE(-||h_m - P_m||, y)`` on the last :meth:`forward`'s features; None
        outside it."""
        self._pending = None
        self._decisions = {}
        if not self.in_window(out.epoch):
            return None
        if self._last is None or self._last[0] is not out or out.features is None:
            raise ValueError("out: expected the StepOutput of the last forward() (its features and targets), got "
                             "another")
        target = self._last[1]
        logits, scores, rho, beta = self._decide(out.features, target)
        ce = torch.stack([F.cross_entropy(z, target) for z in logits])
        self._pending = (out, beta)
        self._decisions = {"scores": scores, "ratios": rho, "strength": beta, "proto_loss": ce.detach()}
        return (beta.to(ce.dtype) * ce).sum().to(task_loss.dtype)

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """``1 + beta_m`` as ``[M]`` float32 inside the window (the gradients are not touched: the term is in the
        loss), ones outside."""
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        if self._pending is not None and self._pending[0] is out:
            beta = self._pending[1]
        else:
            if out.features is None:
                raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
            with torch.no_grad():
                _, scores, rho, beta = self._decide(out.features, target)
            self._decisions = {"scores": scores, "ratios": rho, "strength": beta}
        return (1.0 + beta).to(torch.float32)

    def decisions(self) -> Dict[str, Tensor]:
        """The last step inside the window: ``"scores"`` (s_m, summed over the global batch), ``"ratios"`` (rho_m =
        max_k s_k / s_m), ``"strength"`` (beta_m) and ``"proto_loss"`` (each modality's prototype cross-entropy),
        each ``[M]``; empty outside the window."""
        return dict(self._decisions)

    def to(self, device) -> "PMRMethod":
        if self.prototypes is not None:
            self.prototypes = [p.to(device) for p in self.prototypes]
        return self

    def method_state(self) -> Dict[str, Any]:
        """The prototypes and whether they exist yet: zeros of their shapes before the first pass when the feature
        sizes are known, so that the structure never changes (a sharded checkpoint loads into a fresh method's
        state in place)."""
        protos = self.prototypes
        if protos is None and self._dims is not None:
            protos = [torch.zeros(self.num_classes, d) for d in self._dims]
        return {"prototypes": None if protos is None else [p.detach().clone() for p in protos],
                "ready": self.prototypes is not None}

    def load_method_state(self, state) -> None:
        protos = state.get("prototypes")
        if protos is not None and len(protos) != self.num_modalities:
            raise ValueError(f"state: {len(protos)} prototype sets, expected {self.num_modalities}")
        ready = bool(state.get("ready", protos is not None))  # older states: no flag, None before the first pass
        self.prototypes = [p.detach().clone().float() for p in protos] if ready and protos is not None else None
