"""MMPareto behind the method interface: unimodal heads, their gradients before backward, the integration after it.

Two backward passes per step: :meth:`MMParetoMethod.loss_term` takes the gradients of the sum of the unimodal
losses (each reaches only its own encoder and head) with ``torch.autograd.grad`` (under FSDP2 with a backward that
FSDP reduces, its gradients then moved aside); the main backward of the multimodal loss then leaves g_mm in ``.grad``,
and :meth:`MMParetoMethod.before_optimizer_step` combines the two. Under data parallelism the unimodal gradients are
averaged over the ranks (DDP) or the shards' inner products summed (FSDP2): docs/training-at-scale.md.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import distributed, sharding
from ...fusion import linear_heads, output_layer
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import combine_, tensor_stats

__all__ = ["MMParetoMethod"]


def _local(t: Tensor) -> Tensor:
    # This rank's shard of an FSDP2 tensor (a view of its storage); a plain tensor itself.
    return t.to_local() if sharding.is_sharded(t) else t


def _check_heads(heads, M: int) -> nn.ModuleList:
    if isinstance(heads, nn.Module) and not isinstance(heads, nn.ModuleList):
        raise TypeError(f"heads: expected a list of {M} modules (one per modality), got a single module")
    heads = list(heads)
    if len(heads) != M:
        raise ValueError(f"heads: expected {M} modules (one per modality), got {len(heads)}")
    for m, h in enumerate(heads):
        if not isinstance(h, nn.Module):
            raise TypeError(f"heads[{m}]: expected an nn.Module, got {type(h).__name__}")
    return nn.ModuleList(heads)


@declare(HPARAMS)
class MMParetoMethod(Method):
    """MMPareto (docs/methods.md, section 9) with the reference's training step.

    Inside the window every encoder's gradient becomes MMPareto's integration of its multimodal gradient and the
    gradient of its own unimodal loss (cross-entropy of its head; MSE for regression); the fusion head keeps the
    multimodal gradient and each head the gradient of its unimodal loss. Outside the window the heads are not used
    and the step is joint training. The coefficients are the weights of the multimodal gradients, ``[M]`` float32
    (1/2 where the two gradients agree; 1 outside the window).

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        heads: M unimodal heads (features of modality m -> logits); default ``nn.Linear(d_m, C)`` each, owned by
            the method, on the device and dtype of the fusion's output layer. Either way the heads are trained
            through :meth:`param_groups` and saved in the method's state (do not put given heads in the model's
            optimizer group too).
        feature_dims: the M feature sizes of the default heads (default: ``fusion.dims``; otherwise the heads take
            them from the first forward's features).
        num_classes: the output size of the default heads (default: that of the fusion's output layer).
        process_group: the data-parallel group (None: the default group when ``torch.distributed`` is
            initialised). Under DDP the unimodal gradients, the heads' gradients and the unimodal losses are
            averaged over the ranks, weighted by each rank's rows (one all-reduce); under FSDP2 the unimodal
            gradients come from a backward that FSDP reduces, and the shards' inner products, the heads' gradients
            and the losses are summed over the shards' group (one all-reduce). Every rank then takes the decisions
            of one process on the global batch.
        **hparams: ``encoder_scale`` (1.5) and ``rescale`` (``"tensor"``), declared in
            ``agm_fast.methods.mmpareto.config``.

    Example::

        method = agm_fast.methods.create("mmpareto", encoders=[enc_a, enc_v], fusion=head, window=(0, 50))
    """

    accumulation_refusal = (
        "each micro-batch's weights need its whole multimodal gradient per encoder, apart from the unimodal one, "
        "before backward sums it into .grad; a per-tensor gradient hook sees one tensor at a time"
    )

    def __init__(
        self,
        encoders,
        fusion,
        *,
        window=None,
        seed: int = 0,
        task: str = "classification",
        heads: Optional[Sequence[nn.Module]] = None,
        feature_dims: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        process_group=None,
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        distributed.is_active(process_group)  # checks its type
        self.process_group = process_group
        if heads is None:
            dims = self.feature_dims(feature_dims, required=False)
            out = output_layer(fusion)
            if num_classes is None:
                num_classes = out.out_features
            elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
            heads = linear_heads(dims, out.weight, self.num_modalities, num_classes)
        elif num_classes is not None or feature_dims is not None:
            raise ValueError("num_classes, feature_dims: apply to the default heads only, got them with heads=")
        self.heads = _check_heads(heads, self.num_modalities)
        self._enc_params = [[p for p in enc.parameters() if p.requires_grad] for enc in self.encoders]
        self._head_params = [[p for p in h.parameters() if p.requires_grad] for h in self.heads]
        self._unimodal: Optional[tuple] = None
        self._pending: Optional[tuple] = None
        self._decisions: Dict[str, Tensor] = {}

    def _unimodal_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.task == "regression":
            return F.mse_loss(logits, target.to(logits.dtype).reshape(logits.shape))
        return F.cross_entropy(logits, target)

    def forward(self, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int]) -> StepOutput:
        """Encoders and fusion head; inside the window also the unimodal heads and their losses."""
        out = super().forward(inputs, target, epoch)
        self._unimodal = self._pending = None
        if self.in_window(epoch):
            losses = [self._unimodal_loss(h(f), target) for h, f in zip(self.heads, out.features)]
            self._unimodal = (out, losses)
        return out

    def loss_term(self, task_loss: Tensor, out: StepOutput) -> Optional[Tensor]:
        """None (the loss stays the multimodal one); inside the window the gradients of the unimodal losses are
        taken here, before the main backward, and kept for :meth:`before_optimizer_step` (which takes them itself
        when this hook was skipped and the forward graph still exists)."""
        if not self.in_window(out.epoch):
            return None
        if self._unimodal is None or self._unimodal[0] is not out:
            raise RuntimeError("out: expected the StepOutput of the last forward() inside the window")
        self._pending = self._unimodal_grads(out)
        return None

    def _sharded(self) -> bool:
        return any(sharding.is_sharded(p) for ps in self._enc_params for p in ps)

    def _unimodal_grads(self, out: StepOutput) -> tuple:
        losses = self._unimodal[1]
        enc = [p for ps in self._enc_params for p in ps]
        heads = [p for ps in self._head_params for p in ps]
        rows = out.logits.shape[0]
        if self._sharded():
            # FSDP2's graph holds the gathered parameters, not the shards: a backward of rows * sum_m L_m, which FSDP
            # reduces (mean over the ranks) into the shards' .grad, moved aside; the .grad tensors are restored.
            kept = [p.grad for p in enc + heads]
            for p in enc + heads:
                p.grad = None
            try:
                (torch.stack(losses).sum() * rows).backward(retain_graph=True)
                grads = [p.grad for p in enc + heads]
            finally:
                for p, g in zip(enc + heads, kept):
                    p.grad = g
        else:
            grads = torch.autograd.grad(torch.stack(losses).sum(), enc + heads, retain_graph=True,
                                        allow_unused=True)
        g_u, head_g, i = [], [], 0
        for ps in self._enc_params:
            g_u.append(list(grads[i:i + len(ps)]))
            i += len(ps)
        for ps in self._head_params:
            head_g.append(list(grads[i:i + len(ps)]))
            i += len(ps)
        return out, g_u, head_g, torch.stack([loss.detach() for loss in losses]), rows

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Inside the window: the heads' gradients set, each encoder's gradient replaced by the integration.
        Returns the weights of the multimodal gradients ``[M]`` (ones outside the window)."""
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            self._decisions = {}
            return self.ones(target.device)
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not out:
            if self._unimodal is None or self._unimodal[0] is not out:
                raise RuntimeError("out: expected the StepOutput of the last forward() inside the window")
            # loss_term() was not called: the unimodal gradients are taken now, if the forward graph still exists.
            try:
                pending = self._unimodal_grads(out)
            except RuntimeError as err:
                raise RuntimeError(
                    "before_optimizer_step: no unimodal gradients for this step; compute the loss with loss() (or "
                    "call loss_term()) before backward"
                ) from err
        _, g_u, head_g, uni_loss, rows = pending
        g_mm, g_uni = [], []
        for params, us in zip(self._enc_params, g_u):
            G, U = [], []
            for p, u in zip(params, us):
                if p.grad is None:
                    if u is None:
                        continue
                    # Reached by the unimodal loss alone: its multimodal gradient is zero.
                    p.grad = torch.zeros_like(p)
                G.append(p.grad)
                U.append(torch.zeros_like(p.grad) if u is None else u)
            g_mm.append(G)
            g_uni.append(U)
        del g_u
        if self._sharded():
            g_mm, g_uni, uni_loss, stats = self._reduce_sharded(g_mm, g_uni, head_g, uni_loss, rows)
            cos, weight, pareto, rescaled = combine_(g_mm, g_uni, scale=self.encoder_scale, rescale=self.rescale,
                                                     stats=stats)
        else:
            if distributed.is_active(self.process_group):
                # DDP averaged g_mm; the unimodal gradients (taken apart from its backward), the heads' gradients and
                # the losses are each rank's: their row-weighted mean over the ranks, in one all-reduce.
                uni_loss = uni_loss.clone()
                distributed.mean_over_ranks_([u for U in g_uni for u in U]
                                             + [g for gs in head_g for g in gs if g is not None] + [uni_loss],
                                             self.process_group, count=rows)
            cos, weight, pareto, rescaled = combine_(g_mm, g_uni, scale=self.encoder_scale, rescale=self.rescale)
        for params, gs in zip(self._head_params, head_g):
            for p, g in zip(params, gs):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        self._decisions = {"cos": cos, "weight": weight, "pareto": pareto, "rescaled": rescaled,
                           "unimodal_loss": uni_loss}
        return weight.to(target.device)

    def _reduce_sharded(self, g_mm, g_uni, head_g, uni_loss: Tensor, rows: int):
        """FSDP2: the local shards, the heads' gradients, the losses and the whole gradients' per-tensor inner
        products, from one all-reduce over the shards' group."""
        flat = [t for ts in g_mm for t in ts]
        shards, _, group = sharding.local_shards(flat + [u for U in g_uni for u in U], "grads")
        G_loc, U_loc, i = [], [], 0
        for G in g_mm:
            G_loc.append(shards[i:i + len(G)])
            i += len(G)
        for U in g_uni:
            U_loc.append(shards[i:i + len(U)])
            i += len(U)
        # U holds FSDP's mean of rows_r * g_u,r: (N / W) times the global batch's g_u, fixed once N is known.
        partial = tensor_stats(G_loc, U_loc)
        dev = partial.device
        plain = [g for gs in head_g for g in gs if g is not None and not sharding.is_sharded(g)]
        parts = [partial.reshape(-1), torch.full((1,), float(rows), dtype=torch.float64, device=dev),
                 uni_loss.to(dev, torch.float64) * rows]
        parts += [g.reshape(-1).to(torch.float64) for g in plain]
        total = distributed.global_sums(torch.cat(parts), group)
        T = partial.shape[1]
        n = total[3 * T]
        k = torch.distributed.get_world_size(group) / n
        stats = total[:3 * T].view(3, T) * torch.stack([torch.ones_like(k), k, k * k]).unsqueeze(1)
        for U in U_loc:
            if U:
                torch._foreach_mul_(U, k.to(U[0].dtype))
        M = self.num_modalities
        uni_loss = (total[3 * T + 1:3 * T + 1 + M] / n).to(uni_loss.dtype)
        start = 3 * T + 1 + M
        with torch.no_grad():
            for g in plain:
                g.copy_((total[start:start + g.numel()] / n).view_as(g))
                start += g.numel()
            for gs in head_g:
                for g in gs:
                    if g is not None and sharding.is_sharded(g):
                        _local(g).mul_(k.to(g.dtype))
        return G_loc, U_loc, uni_loss, stats

    def decisions(self) -> Dict[str, Tensor]:
        """The last step inside the window (empty outside it), each ``[M]``: ``cos`` (of g_mm and g_u per encoder),
        ``weight`` (of g_mm), ``pareto`` (bool: the min-norm branch ran, cos <= 0), ``rescaled`` (fraction of the
        encoder's tensors whose norm was raised) and ``unimodal_loss``."""
        return dict(self._decisions)

    def modules(self) -> List[nn.Module]:
        return [self.heads]

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """The unimodal heads, at the main learning rate (the reference trains them with the model)."""
        return [{"params": list(self.heads.parameters())}]

    def method_state(self) -> Dict[str, Any]:
        return {"heads": self.heads.state_dict()}

    def load_method_state(self, state) -> None:
        self.heads.load_state_dict(state["heads"])
