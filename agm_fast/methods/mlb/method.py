"""MLB behind the method interface: unimodal heads with their own losses, and per-modality gradient coefficients."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import distributed, sharding
from ...fusion import ConcatFusion, SumFusion, linear_heads, output_layer
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import mlb_coefficients, mlb_scores

__all__ = ["MLBMethod"]


def _local(t: Tensor) -> Tensor:
    # This rank's shard of an FSDP2 gradient (element-wise scaling acts on it as it is); a plain tensor itself.
    return t.to_local() if sharding.is_sharded(t) else t


@declare(HPARAMS)
class MLBMethod(Method):
    """MLB (Kontras et al., BMVC 2024; docs/methods.md, section 11) with the reference's training step.

    Inside the window the loss is the task loss plus every unimodal head's own loss (one backward); after it,
    ``k_m = 1 + tanh(alpha (r_m - 1))`` from the heads' true-class probabilities multiplies the gradients of
    encoder m, of head m (weight and bias) and of the fusion weight that reads modality m: the column block m of a
    concat head (:class:`agm_fast.fusion.ConcatFusion` or an ``nn.Linear`` on the concatenation), ``fcs[m].weight``
    of a :class:`agm_fast.fusion.SumFusion`. Fusion biases are never scaled; the parameters of any other fusion head
    are not scaled (``scaled_fusion`` says which case applies). Outside the window: joint training. Under gradient
    accumulation (``set_accumulation``) each micro-batch's gradients are scaled by its own k as they arrive.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        heads: M modules ``features -> [B, C]`` (modality m's own classifier); default ``nn.Linear(d_m, C)`` each,
            on the fusion output layer's device and dtype. Their parameters are in :meth:`param_groups` and their
            weights in the method state either way (keep user heads out of the model's own param group).
        feature_dims: the M feature sizes of the default heads (default: ``fusion.dims``; otherwise the heads take
            them from the first forward's features).
        process_group: the data-parallel group (None: the default group when ``torch.distributed`` is
            initialised): the scores are global-batch means (sums and counts reduced) and the heads' gradients are
            averaged over the ranks, as DDP / FSDP2 average the model's.
        **hparams: MLB's hyper-parameters (``agm_fast.methods.mlb.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("mlb", encoders=[enc_a, enc_v], fusion=head, alpha=0.8)
    """

    accumulation = "hooks"

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
        process_group=None,
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        distributed.is_active(process_group)  # checks its type
        self.process_group = process_group
        M = self.num_modalities
        out_layer = output_layer(fusion)
        if heads is None:
            heads = linear_heads(self.feature_dims(feature_dims, required=False), out_layer.weight, M)
        else:
            if isinstance(heads, nn.Module) and not isinstance(heads, nn.ModuleList):
                raise TypeError("heads: expected a list of M modules (one per modality), got a single module")
            heads = list(heads)
            if len(heads) != M:
                raise ValueError(f"heads: expected {M} modules (one per modality), got {len(heads)}")
            for m, h in enumerate(heads):
                if not isinstance(h, nn.Module):
                    raise TypeError(f"heads[{m}]: expected an nn.Module, got {type(h).__name__}")
        self.heads = nn.ModuleList(heads)
        # What the fusion head contributes to modality m's group: a concat head's column block (one in-place multiply
        # by k gathered per column), a sum head's fcs[m].weight, or nothing.
        self._concat: Optional[nn.Linear] = None
        extra: List[List[nn.Parameter]] = [[] for _ in range(M)]
        if isinstance(fusion, nn.Linear) or isinstance(fusion, ConcatFusion):
            self._concat = fusion if isinstance(fusion, nn.Linear) else fusion.fc
            self.scaled_fusion = "concat columns"
        elif isinstance(fusion, SumFusion):
            extra = [[fc.weight] for fc in fusion.fcs]
            self.scaled_fusion = "sum weights"
        else:
            self.scaled_fusion = "none"
        self._groups: List[List[nn.Parameter]] = []
        for m in range(M):
            seen, group = set(), []
            for p in [*self.encoders[m].parameters(), *self.heads[m].parameters(), *extra[m]]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    group.append(p)
            self._groups.append(group)
        self._columns: Optional[Tuple[Tuple[int, ...], Tensor]] = None
        self._pending: Optional[Tuple[StepOutput, List[Tensor]]] = None
        self._decisions: Dict[str, Tensor] = {}
        self._concat_index: Optional[int] = None
        self._micro_active = False

    def _head_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.task == "regression":
            return F.mse_loss(logits, target.to(logits.dtype).reshape(logits.shape))
        return F.cross_entropy(logits, target)

    def loss_term(self, task_loss: Tensor, out: StepOutput) -> Optional[Tensor]:
        """Inside the window, ``sum_m loss(head_m(h_m), y)`` (cross-entropy; regression: MSE) on the features of
        the last :meth:`forward`; None outside it."""
        self._pending = None
        if not self.in_window(out.epoch):
            return None
        if self._last is None or self._last[0] is not out or out.features is None:
            raise ValueError("out: expected the StepOutput of the last forward() (its features and targets), got "
                             "another")
        target = self._last[1]
        logits = [head(h) for head, h in zip(self.heads, out.features)]
        self._pending = (out, [z.detach() for z in logits])
        losses = [self._head_loss(z, target) for z in logits]
        return sum(losses[1:], losses[0])

    def _column_index(self, features: Sequence[Tensor], device: torch.device) -> Tensor:
        # The modality of each input column of the concat head's weight, built once per feature widths.
        widths = tuple(int(h.shape[1]) for h in features)
        if self._columns is None or self._columns[0] != widths or self._columns[1].device != device:
            cols = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
            weight = self._concat.weight
            if weight.shape[1] != cols.numel():
                raise ValueError(f"fusion: its weight has {weight.shape[1]} input columns, but the features have "
                                 f"{sum(widths)} in all")
            self._columns = (widths, cols.to(device))
        return self._columns[1]

    def scale_gradients_(self, k: Tensor, features: Sequence[Tensor]) -> None:
        """Multiply modality m's gradients by ``k[m]`` in place (encoder, head, fusion weight block m); gradients
        that are None are skipped.

        Args:
            k: ``[M]`` coefficients on the gradients' device.
            features: this step's M features (their widths give the concat head's column blocks).
        """
        for m, group in enumerate(self._groups):
            grads = [_local(p.grad) for p in group if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, k[m])
        if self._concat is not None and self._concat.weight.grad is not None:
            # FSDP2 shards the weight by rows (classes): every rank holds all the columns of its rows.
            g = _local(self._concat.weight.grad)
            g.mul_(k.index_select(0, self._column_index(features, g.device)).to(g.dtype))

    def _decide(self, out: StepOutput, target: Tensor) -> Tensor:
        # Scores (global-batch means under a process group), ratios and k from the heads' logits of this forward.
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        if self._pending is not None and self._pending[0] is out:
            logits = self._pending[1]
        else:
            # The unimodal losses were not in this step's loss: the heads still score the step's features.
            with torch.no_grad():
                logits = [head(h) for head, h in zip(self.heads, out.features)]
        self._pending = None
        scores = mlb_scores(logits, target, self.task)
        if distributed.is_active(self.process_group):
            # Means of squared errors count every element; probabilities one per sample.
            n = logits[0].numel() if self.task == "regression" else logits[0].shape[0]
            scores = distributed.global_mean_scores(scores, n, self.process_group).to(scores.dtype)
        ratios, k = mlb_coefficients(scores, self.alpha, self.beta, self.task)
        self._decisions = {"scores": scores, "ratios": ratios, "k": k}
        return k

    def _mean_head_gradients(self) -> None:
        if distributed.is_active(self.process_group):
            distributed.mean_over_ranks_([p.grad for p in self.heads.parameters() if p.grad is not None],
                                         self.process_group)

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Inside the window: scores, ratios and k from the heads' logits of this step, then (unless
        ``multi_loss_only``) the gradients scaled by k. Returns k as ``[M]`` float32 (ones when nothing is scaled).
        Under accumulation the micro-batches were scaled as they arrived: the mean of their k is returned."""
        out, target = self._resolve(out, target)
        if self.accumulating:
            self._pending = None
            self._mean_head_gradients()
            coeffs = self.finish_accumulated_step()
            return self.ones(target.device) if coeffs is None else coeffs
        if not self.in_window(out.epoch):
            self._decisions = {}
            return self.ones(target.device)
        k = self._decide(out, target)
        self._mean_head_gradients()
        if self.multi_loss_only:
            return self.ones(target.device)
        self.scale_gradients_(k, out.features)
        return k.to(torch.float32)

    def modulated_parameters(self) -> List[List[Tensor]]:
        """Modality m's encoder, head and sum-head weight; a concat head's weight last in modality M - 1's list
        (its gradient is scaled column block by column block)."""
        groups = [list(g) for g in self._groups]
        self._concat_index = None
        if self._concat is not None and self._concat.weight.requires_grad:
            self._concat_index = sum(len(g) for g in groups)
            groups[-1].append(self._concat.weight)
        return groups

    def micro_batch_decision(self, out: StepOutput, target: Tensor) -> Tensor:
        """This micro-batch's k from its heads' logits (ones outside the window or with ``multi_loss_only``),
        before its backward."""
        self._micro_active = False
        if not self.in_window(out.epoch):
            self._decisions = {}
            return self.ones(target.device)
        k = self._decide(out, target)
        if self.multi_loss_only:
            return self.ones(target.device)
        if self._concat is not None:
            self._column_index(out.features, k.device)
        self._micro_active = True
        return k

    def modulate_micro_gradient(self, m: int, index: int, grad: Tensor, coeffs: Tensor) -> Tensor:
        if not self._micro_active:
            return grad
        if index == self._concat_index:
            cols = self._columns[1].to(grad.device)
            return grad * coeffs.to(grad.device).index_select(0, cols).to(grad.dtype)
        return grad * coeffs[m].to(device=grad.device, dtype=grad.dtype)

    def decisions(self) -> Dict[str, Tensor]:
        """The last step's ``"scores"`` (s_m), ``"ratios"`` (r_m) and ``"k"`` (k_m, also computed but not applied
        with ``multi_loss_only``), each ``[M]``; empty after a step outside the window."""
        return dict(self._decisions)

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """The unimodal heads, at ``lr`` (one optimizer for everything, as the reference)."""
        return [{"params": list(self.heads.parameters()), "lr": lr}]

    def modules(self) -> List[nn.Module]:
        return [self.heads]

    def method_state(self) -> Dict[str, Any]:
        return {"heads": self.heads.state_dict()}

    def load_method_state(self, state) -> None:
        if "heads" not in state:
            raise KeyError(f"state: expected a 'heads' entry (MLB's unimodal heads), got keys {sorted(state)}")
        self.heads.load_state_dict(state["heads"])
