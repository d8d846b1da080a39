"""GDL behind the method interface: a head on detached features, unimodal losses for the encoders, a global clip.

Inside the window the fused logits are computed on detached features (the task loss reaches only the fusion head),
``alpha * sum_m loss(out_m)`` is added to the loss (each encoder learns from its own unimodal logits only) and the
global gradient norm of the encoders and the head is clipped. One backward per step. Outside the window: joint
training. Under data parallelism the clip reads the global norm (FSDP2: the shards' squares summed over the group) and
the reported unimodal losses are global-batch means (docs/training-at-scale.md).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import distributed, sharding
from ...fusion import ConcatFusion, per_modality_logits
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS

__all__ = ["GDLMethod"]


def _concat_layer(fusion: nn.Module) -> Optional[nn.Linear]:
    """The ``Linear`` of a concat head (an ``nn.Linear`` or a :class:`ConcatFusion`), else None."""
    if isinstance(fusion, nn.Linear):
        return fusion
    if isinstance(fusion, ConcatFusion):
        return fusion.fc
    return None


def _local(t: Tensor) -> Tensor:
    # This rank's shard of an FSDP2 gradient (a view of its storage); a plain tensor itself.
    return t.to_local() if sharding.is_sharded(t) else t


def _total_norm(grads: List[Tensor]) -> Tensor:
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads]))


@declare(HPARAMS)
class GDLMethod(Method):
    """GDL, disentangled gradient learning (docs/methods.md, section 12), as the reference trains.

    Inside the window: the fusion head learns from the task loss on detached features; encoder m learns only from
    ``alpha * loss(out_m)``, where ``out_m`` is the fusion head's weight slice for m plus its full bias (a concat
    head) or the head with the other modalities' features set to zero (any other head, through
    :func:`agm_fast.fusion.per_modality_logits`); the head's own gradient of the unimodal losses is dropped
    (``head_unimodal_grad="drop"``); then the global gradient norm of the encoders and the head is clipped to
    ``clip_grad_norm``. The coefficients are ``alpha * c`` for every modality, ``c`` the clip factor. Under gradient
    accumulation the clip acts once per optimizer step, on the summed gradient (as torch's clip after accumulation).

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        process_group: the data-parallel group (None: the default group when ``torch.distributed`` is
            initialised). The gradients are the averaged ones (DDP, FSDP2), so the clip needs no reduction under DDP;
            under FSDP2 the local squares are summed over the shards' group (one all-reduce, which also carries the
            unimodal losses). The reported unimodal losses are global-batch means (sums and counts reduced).
        **hparams: GDL's hyper-parameters (``agm_fast.methods.gdl.config.HPARAMS``): ``alpha=4.0``,
            ``clip_grad_norm=40.0``, ``bias="full"``, ``head_unimodal_grad="drop"``.

    Example::

        method = agm_fast.methods.create("gdl", encoders=[enc_a, enc_v], fusion=head, alpha=4.0)
    """

    accumulation = "exact"

    def __init__(self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification",
                 process_group=None) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        distributed.is_active(process_group)  # checks its type
        self.process_group = process_group
        self._concat = _concat_layer(fusion)
        if self._concat is None and self.bias != "full":
            raise ValueError(
                f"bias: expected 'full' for a {type(fusion).__name__} head (the rule applies to a concat head: "
                f"nn.Linear or ConcatFusion), got {self.bias!r}"
            )
        self._params = [p for m in (*self.encoders, fusion) for p in m.parameters() if p.requires_grad]
        self._decisions: Dict[str, Tensor] = {}
        self._rows = 0

    def forward(self, inputs, target: Tensor, epoch: Optional[int]) -> StepOutput:
        """Encoders, then the fusion head; inside the window the head runs on detached features."""
        if not self.in_window(epoch):
            self._decisions = {}
            return super().forward(inputs, target, epoch)
        feats = self.encode(inputs)
        out = StepOutput(self.head([h.detach() for h in feats]), feats, None, None, epoch)
        self._set_last(out, target)
        self._decisions = {}
        return out

    def unimodal_logits(self, features) -> Tensor:
        """The M unimodal logits ``[M, B, C]`` of ``features``, through the head's parameters (detached when
        ``head_unimodal_grad="drop"``)."""
        features = list(features)
        detach = self.head_unimodal_grad == "drop"
        sharded = any(sharding.is_sharded(p) for p in self.fusion.parameters())
        if sharded and not detach:
            raise ValueError("head_unimodal_grad: expected 'drop' for a fusion head sharded by FSDP2 (a gradient of "
                             "the unimodal losses could not reach its shards), got 'keep'")
        layer = self._concat
        if layer is None:
            return per_modality_logits(self.fusion, features, detach_params=detach)
        if sharded:
            # The head's weights whole (one all-gather of the head), copied so that they outlive the block.
            with sharding.gathered(self.fusion):
                weight = layer.weight.detach().clone()
                bias = None if layer.bias is None else layer.bias.detach().clone()
            return self._concat_logits(features, weight, bias, False)
        return self._concat_logits(features, layer.weight, layer.bias, detach)

    def _concat_logits(self, features, weight: Tensor, bias: Optional[Tensor], detach: bool) -> Tensor:
        dims = [h.shape[1] for h in features]
        if weight.dim() != 2 or weight.shape[1] != sum(dims):
            raise ValueError(
                f"features: expected feature sizes summing to the head's input size {weight.shape[1]}, got {dims}"
            )
        if detach:
            weight = weight.detach()
            bias = None if bias is None else bias.detach()
        out = torch.stack([h @ w.t() for h, w in zip(features, torch.split(weight, dims, dim=1))])
        if bias is None or self.bias == "none":
            return out
        return out + (bias if self.bias == "full" else bias / len(features))

    def unimodal_losses(self, logits: Tensor, target: Tensor) -> Tensor:
        """``[M]`` mean cross-entropy (regression: mean squared error) of each modality's logits ``[M, B, C]``."""
        M, B, C = logits.shape
        if self.task == "regression":
            t = target.to(logits.dtype).reshape(1, B, C)
            return (logits - t).pow(2).mean(dim=(1, 2))
        ce = F.cross_entropy(logits.reshape(M * B, C), target.repeat(M), reduction="none")
        return ce.view(M, B).mean(dim=1)

    def loss_term(self, task_loss: Tensor, out: StepOutput) -> Optional[Tensor]:
        """``alpha * sum_m loss(out_m)`` inside the window (the targets are the last forward's)."""
        if not self.in_window(out.epoch):
            return None
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        # Not _resolve(): between an FSDP2 root's forward and its backward its parameters are the gathered ones.
        if self._last is None:
            raise RuntimeError("loss_term: no step; call forward() first")
        target = self._last[1]
        losses = self.unimodal_losses(self.unimodal_logits(out.features), target)
        self._decisions = {"unimodal_loss": losses.detach()}
        self._rows = int(target.shape[0])
        return self.alpha * losses.sum()

    def _clip(self) -> Tuple[Tensor, Tensor]:
        grads = [p.grad for p in self._params if p.grad is not None]
        if any(sharding.is_sharded(g) for g in grads):
            return self._clip_sharded(grads)
        self._global_losses()
        if not grads:
            zero = torch.zeros((), device=self._params[0].device if self._params else None)
            return zero, torch.ones_like(zero)
        if self.clip_grad_norm is None:
            total = _total_norm(grads)
            return total, torch.ones_like(total)
        # torch's clip: every gradient times min(1, max_norm / (total + 1e-6)).
        total = torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
        return total, torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)

    def _global_losses(self) -> None:
        # DDP: the gradients are averaged already; the reported losses become global-batch means (2M numbers).
        losses = self._decisions.get("unimodal_loss")
        if losses is not None and distributed.is_active(self.process_group):
            self._decisions["unimodal_loss"] = distributed.global_mean_scores(
                losses, self._rows, self.process_group).to(losses.dtype)

    def _clip_sharded(self, grads: List[Tensor]) -> Tuple[Tensor, Tensor]:
        # FSDP2: the global norm from the shards' squares, summed over the mesh's group in one all-reduce that also
        # carries the unimodal losses' sums and counts. Gradients that are whole (a module left unsharded) are the
        # same on every rank and counted once.
        shards, _, group = sharding.local_shards([g for g in grads if sharding.is_sharded(g)], "grads")
        whole = [g for g in grads if not sharding.is_sharded(g)]
        dt = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        dev = shards[0].device
        sq = torch.stack(torch._foreach_norm(shards, 2, dtype=dt)).square().sum().reshape(1)
        losses = self._decisions.get("unimodal_loss")
        M = self.num_modalities
        if losses is None:
            parts = [sq, torch.zeros(M + 1, dtype=dt, device=dev)]
        else:
            n = float(self._rows)
            parts = [sq, losses.to(dev, dt) * n, torch.full((1,), n, dtype=dt, device=dev)]
        packed = distributed.global_sums(torch.cat(parts), group)
        if losses is not None:
            self._decisions["unimodal_loss"] = (packed[1:M + 1] / packed[M + 1]).to(losses.dtype)
        total_sq = packed[0]
        if whole:
            total_sq = total_sq + torch.stack(torch._foreach_norm(whole, 2, dtype=dt)).square().sum()
        total = total_sq.sqrt()
        if self.clip_grad_norm is None:
            return total, torch.ones_like(total)
        coef = torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)
        local = [_local(g) for g in grads]
        torch._foreach_mul_(local, coef.to(local[0].dtype))
        return total, coef

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Inside the window, the global gradient-norm clip; the coefficients ``alpha * c`` (1 outside)."""
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        total, coef = self._clip()
        self._decisions.update(grad_norm=total.detach(), clip_coef=coef.detach())
        coef = coef.to(device=target.device, dtype=torch.float32)
        return self.constant([self.alpha] * self.num_modalities, target.device) * coef

    def decisions(self) -> Dict[str, Tensor]:
        """The last step inside the window: ``"unimodal_loss"`` ``[M]`` (each modality's unimodal loss),
        ``"grad_norm"`` ``[]`` (the global gradient norm before the clip) and ``"clip_coef"`` ``[]`` (the clip factor
        ``min(1, clip_grad_norm / (grad_norm + 1e-6))``, 1 without a clip); empty outside the window. Under data
        parallelism the losses are global-batch means; under gradient accumulation, the last micro-batch's."""
        return dict(self._decisions)
