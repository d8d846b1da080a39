"""InfoReg (Huang et al., CVPR 2025) behind the method interface: the leading modality is pulled towards its
parameters at the start of the epoch while its Fisher trace still grows.

Loss: fused cross-entropy plus every modality's cross-entropy on its own logits (the fusion head's column slice plus
``b / M`` for a concatenation head). After backward, the modality with the largest score (batch sum of true-class
probabilities) gets ``g += beta (theta - theta_0)`` on its encoder when the trace growth ratio ``k`` exceeds the
threshold; the squared final gradients of the encoders' Linear/Conv weights build the per-epoch trace.
docs/methods.md (section 10) has the formulas; the step reads no value on the host.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import distributed, sharding
from ...fusion import _PerModalityLogits, per_modality_logits
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS

__all__ = ["InfoRegMethod"]

_CONV_OR_LINEAR = (nn.Linear, nn.modules.conv._ConvNd)


def _local(t: Tensor) -> Tensor:
    # This rank's shard of an FSDP2 tensor (a view of its storage; element-wise work acts on it); a plain tensor itself.
    return t.to_local() if sharding.is_sharded(t) else t


def trace_ratio(history: List[Tensor], window: int, device=None) -> Tensor:
    """``k`` from one modality's per-epoch traces: 1 before any trace, else
    ``(L[-1] - L[-window-1]) / sum(L[-window:])`` with ``L`` = ``window`` zeros followed by ``history``; 0 where that
    sum is 0."""
    if not history:
        return torch.ones((), device=device)
    hist = torch.stack(list(history)).to(device=device, dtype=torch.float32)
    padded = torch.cat([torch.zeros(window, dtype=hist.dtype, device=hist.device), hist])
    num = padded[-1] - padded[-window - 1]
    den = padded[-window:].sum()
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))


@declare(HPARAMS)
class InfoRegMethod(Method):
    """InfoReg: proximal regulation of the leading modality in its prime learning window.

    The coefficients returned by :meth:`before_optimizer_step` are ``1 + beta_m`` (1: not regulated); the gradient
    is not scaled by them: the leader's gradient gets ``beta (theta - theta_0)`` added.
    :meth:`decisions` keys: ``"beta"`` ``[M]``, ``"regulated"`` ``[M]`` bool, ``"k"`` ``[]`` (the ratio the step
    compared), ``"scores"`` ``[M]``.

    Args:
        encoders, fusion, window, seed: as :class:`agm_fast.methods.Method` (classification only).
        process_group: the data-parallel group (None: the default group when ``torch.distributed`` is
            initialised): the scores are the global batch's (sums and counts reduced), so every rank picks the same
            leader and ``beta``. The gradients are the averaged ones (DDP, FSDP2); under FSDP2 the pull and the
            traces act on the local shards, the traces are summed over the shards' group once per epoch, and the
            unimodal losses reach a sharded fusion head through a whole copy whose gradient is averaged over it.
        **hparams: InfoReg's hyper-parameters (``agm_fast.methods.inforeg.config.HPARAMS``); ``beta_bases``, when
            given, needs M values (the default is the code's 0.95 for modality 0 and 0.1 for every other).

    Example::

        method = agm_fast.methods.create("inforeg", encoders=[enc_a, enc_v], fusion=head, beta_bases=[0.95, 0.1])
    """

    accumulation_refusal = ("its pull beta (theta - theta_0) is not the gradient of a micro-batch's loss: added per "
                            "micro-batch it would count k times at full weight whatever the loss weights, and the "
                            "Fisher trace squares the whole step's gradient")

    def __init__(self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification",
                 process_group=None) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        distributed.is_active(process_group)  # checks its type
        self.process_group = process_group
        if self.task != "classification":
            raise ValueError(f"task: InfoReg scores class probabilities, expected 'classification', got {task!r}")
        M = self.num_modalities
        if self.beta_bases is None:
            # The code's constants (0.95 audio, 0.1 visual); modality 0 keeps the first, every other the second.
            self.beta_bases = (0.95,) + (0.1,) * (M - 1)
        if len(self.beta_bases) != M:
            raise ValueError(f"beta_bases: expected {M} values (one per modality), got {len(self.beta_bases)}")
        self._params = [[p for p in enc.parameters() if p.requires_grad] for enc in self.encoders]
        self._weights = [[mod.weight for mod in enc.modules()
                          if isinstance(mod, _CONV_OR_LINEAR) and mod.weight.requires_grad] for enc in self.encoders]
        self._epoch: Any = None
        self._open = False
        self._anchor: List[List[Tensor]] = []
        self._fisher: List[List[Tensor]] = []
        self._traces: List[List[Tensor]] = [[] for _ in range(M)]
        self._k: Optional[Tensor] = None
        self._scored: Optional[tuple] = None
        self._head_copies: Optional[List[tuple]] = None
        self._decided: Dict[str, Tensor] = {}

    # -- epochs -------------------------------------------------------------------------------------------------
    def _close_epoch(self) -> None:
        dev = self._k.device
        whole, parts, group = [], [], None
        for acc in self._fisher:
            plain = [a.mean() for a in acc if not sharding.is_sharded(a)]
            # A sharded accumulator's mean: its shard's sum over the global size, summed over the shards' group.
            shards = [_local(a).sum() / a.numel() for a in acc if sharding.is_sharded(a)]
            group = next((a.device_mesh.get_group() for a in acc if sharding.is_sharded(a)), group)
            zero = torch.zeros((), device=dev)
            whole.append(torch.stack(plain).sum().to(dev, torch.float32) if plain else zero)
            parts.append(torch.stack(shards).sum().to(dev, torch.float32) if shards else zero)
        traces = torch.stack(whole) if whole else torch.zeros(0, device=dev)
        if group is not None:
            # One collective per epoch: the M shard parts summed over the group.
            traces = traces + distributed.global_sums(torch.stack(parts), group)
        for m in range(len(self._fisher)):
            self._traces[m].append(traces[m].detach())
        self._open = False

    def _buffers(self) -> None:
        # The anchors and Fisher accumulators, allocated once like the parameters (shards of them under FSDP2), so
        # the method state has one structure from construction on (a sharded checkpoint loads into it in place).
        if not self._anchor:
            with torch.no_grad():
                self._anchor = [[q.detach().clone() for q in p] for p in self._params]
        if not self._fisher:
            self._fisher = [[torch.zeros_like(w) for w in ws] for ws in self._weights]

    def _begin_epoch(self, epoch) -> None:
        if self._open:
            self._close_epoch()
        ks = torch.stack([trace_ratio(h, self.trace_window, self._device()) for h in self._traces])
        self._k = ks
        self._buffers()
        with torch.no_grad():
            for a, p in zip(self._anchor, self._params):
                if a:
                    torch._foreach_copy_([_local(t) for t in a], [_local(q.detach()) for q in p])
            for acc in self._fisher:
                if acc:
                    torch._foreach_zero_([_local(t) for t in acc])
        self._epoch = epoch
        self._open = True

    def _device(self) -> torch.device:
        for ps in self._params:
            if ps:
                return ps[0].device
        return torch.device("cpu")

    def end_epoch(self, epoch: int, metrics) -> None:
        """Close the epoch: each modality's trace (sum over layers of the mean accumulated ``g^2``) is recorded."""
        if self._open:
            self._close_epoch()

    # -- step ---------------------------------------------------------------------------------------------------
    def forward(self, inputs, target: Tensor, epoch: Optional[int]) -> StepOutput:
        """Encoders and head; the first step of an epoch in the window takes the anchor and computes ``k``."""
        out = super().forward(inputs, target, epoch)
        if self.in_window(epoch) and (not self._open or epoch != self._epoch):
            self._begin_epoch(epoch)
        return out

    def _unimodal(self, out: StepOutput, target: Tensor, grad: bool) -> Tensor:
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        self._head_copies = None
        grad = grad and torch.is_grad_enabled()
        if grad and any(sharding.is_sharded(p) for p in self.fusion.parameters()):
            # FSDP2: the head's parameters, gathered whole, as leaves of their own; their gradients (this rank's
            # batch) are averaged over the shards' group and added to the shards in before_optimizer_step.
            with torch.no_grad(), sharding.gathered(self.fusion):
                copies = {n: p.detach().clone().requires_grad_(p.requires_grad)
                          for n, p in self.fusion.named_parameters()}
            self._head_copies = [(p, copies[n]) for n, p in self.fusion.named_parameters() if p.requires_grad]
            logits = torch.func.functional_call(_PerModalityLogits(self.fusion, None),
                                                {f"fusion.{n}": c for n, c in copies.items()}, tuple(out.features))
        else:
            with torch.set_grad_enabled(grad):
                logits = per_modality_logits(self.fusion, out.features)
        with torch.no_grad():
            p = torch.softmax(logits.detach().float(), dim=-1)
            true = p.gather(-1, target.view(1, -1, 1).expand(p.shape[0], -1, 1)).squeeze(-1)
            scores = true.sum(-1) if self.score == "sum" else true.mean(-1)
        self._scored = (out, scores)
        return logits

    def _add_head_gradients(self) -> None:
        # The unimodal losses' gradient of a sharded head: averaged over the shards' group (as FSDP2 averages the
        # rest, one collective) and each rank's slice added to its shard.
        pairs = [(p, c.grad) for p, c in self._head_copies if c.grad is not None]
        self._head_copies = None
        if not pairs:
            return
        params, grads = (list(t) for t in zip(*pairs))
        group = params[0].device_mesh.get_group()
        distributed.mean_over_ranks_(grads, group)
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local = _local(p.grad)
            start = sharding.shard_start(p, f"fusion parameter {i}")
            local.add_(g.reshape(-1)[start:start + local.numel()].view(local.shape).to(local.dtype))

    def loss_term(self, task_loss: Tensor, out: StepOutput) -> Optional[Tensor]:
        """In the window: ``sum_m CE(out_m, y)`` on the per-modality logits (the step's scores come from them)."""
        if not self.in_window(out.epoch):
            return None
        if self._last is None or self._last[0] is not out:
            raise RuntimeError("loss_term: expected the StepOutput of the last forward(), got another one")
        target = self._last[1]
        logits = self._unimodal(out, target, grad=True)
        return sum(F.cross_entropy(lm, target) for lm in logits.unbind(0))

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Leader, ``beta``, the proximal pull on the leader's encoder gradients and the Fisher accumulation."""
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            self._decided = {}
            return self.ones(target.device)
        if self._scored is None or self._scored[0] is not out:
            with torch.no_grad():
                self._unimodal(out, target, grad=False)
        elif self._head_copies is not None:
            self._add_head_gradients()
        scores = self._scored[1].to(target.device)
        if distributed.is_active(self.process_group):
            # The global batch's sums (score="sum") or means (score="mean"), from sums and counts.
            if self.score == "sum":
                scores = distributed.global_sums(scores, self.process_group)
            else:
                scores = distributed.global_mean_scores(scores, target.shape[0], self.process_group)
        M = self.num_modalities
        vals, idx = torch.topk(scores, 2)
        lead = idx[0]
        gap = vals[0] - vals[1]
        leader = torch.arange(M, device=target.device) == lead
        ks = self._k.to(target.device)
        # Selections by mask, not by a device index: nothing is read on the host.
        k = ks[0] if self.trace_modality == "first" else torch.where(leader, ks, torch.zeros_like(ks)).sum()
        go = (gap > 0) & (k > self.threshold)
        bases = self.constant(self.beta_bases, target.device)
        regulated = leader & go
        beta = torch.where(regulated, bases * torch.exp(torch.tanh(gap)), torch.zeros_like(bases))
        with torch.no_grad():
            for m in range(M):
                pairs = [(_local(p.grad), _local(p.detach()), _local(a))
                         for p, a in zip(self._params[m], self._anchor[m]) if p.grad is not None]
                if pairs:
                    grads, params, anchors = (list(t) for t in zip(*pairs))
                    diffs = torch._foreach_sub(params, anchors)
                    torch._foreach_mul_(diffs, beta[m].to(grads[0].dtype))
                    torch._foreach_add_(grads, diffs)
                wpairs = [(_local(w.grad), _local(acc))
                          for w, acc in zip(self._weights[m], self._fisher[m]) if w.grad is not None]
                if wpairs:
                    g, acc = (list(t) for t in zip(*wpairs))
                    torch._foreach_addcmul_(acc, g, g)
        self._decided = {"beta": beta.detach(), "regulated": regulated.detach(), "k": k.detach(),
                         "scores": scores.detach()}
        return 1.0 + beta

    def decisions(self) -> Dict[str, Tensor]:
        """The last step's ``beta`` ``[M]``, ``regulated`` ``[M]`` bool, ``k`` ``[]``, ``scores`` ``[M]`` (empty
        outside the window)."""
        return dict(self._decided)

    # -- state --------------------------------------------------------------------------------------------------
    def method_state(self) -> Dict[str, Any]:
        """Epoch, ``k`` and the traces as Python floats (read on the host), the anchors and Fisher accumulators as
        tensors (shards under FSDP2), allocated if no epoch began yet, so that the structure never changes."""
        clone = lambda ts: [t.detach().clone() for t in ts]  # noqa: E731
        self._buffers()
        return {
            "epoch": self._epoch,
            "open": self._open,
            "k": None if self._k is None else [float(v) for v in self._k.tolist()],
            "traces": [[float(t) for t in h] for h in self._traces],
            "anchor": [clone(a) for a in self._anchor],
            "fisher": [clone(a) for a in self._fisher],
        }

    def load_method_state(self, state) -> None:
        M = self.num_modalities
        for key in ("traces", "anchor", "fisher"):
            if len(state[key]) not in (0, M):
                raise ValueError(f"state: expected {M} {key} lists (one per modality), got {len(state[key])}")
        for m, (a, p) in enumerate(zip(state["anchor"], self._params)):
            if [t.shape for t in a] != [q.shape for q in p]:
                raise ValueError(f"state: the anchor of encoders[{m}] does not match its parameters")
        dev = self._device()
        f32 = lambda v: torch.as_tensor(v, dtype=torch.float32).to(dev)  # noqa: E731  (floats, or older tensors)
        self._epoch = state["epoch"]
        self._open = bool(state["open"])
        self._k = None if state["k"] is None else f32(state["k"])
        self._traces = [[f32(t) for t in h] for h in state["traces"]] or [[] for _ in range(M)]
        self._anchor = [[t.to(dev).clone() for t in a] for a in state["anchor"]]
        self._fisher = [[t.to(dev).clone() for t in a] for a in state["fisher"]]

    def to(self, device) -> "InfoRegMethod":
        if self._k is not None:
            self._k = self._k.to(device)
        self._traces = [[t.to(device) for t in h] for h in self._traces]
        self._anchor = [[t.to(device) for t in a] for a in self._anchor]
        self._fisher = [[t.to(device) for t in a] for a in self._fisher]
        return self
