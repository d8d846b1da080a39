"""MLA behind the method interface: a method that owns its step (one sub-step per modality) and its prediction rule."""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ... import distributed, sharding
from ...fusion import output_layer
from ..base import Method, StepResult
from ..hparams import declare
from .config import HPARAMS
from .core import fuse, fusion_weights, owm_update

__all__ = ["MLAMethod"]


@declare(HPARAMS)
class MLAMethod(Method):
    """MLA (Zhang et al., CVPR 2024; docs/methods.md, section 16) with the released training step.

    Per batch, one forward of every encoder, then for each modality in turn one sub-step: the shared head on that
    modality's features, its cross-entropy, backward, optimizer step (the head as the earlier sub-steps left it). At
    test time (:meth:`predict`) the unimodal outputs of the shared head are fused with weights ``softmax_m(-e_m)``
    from their entropies. The model's fusion head is not used (it gets no gradient). MLA has no window: it replaces
    joint training altogether.

    Args:
        encoders, fusion, seed: as :class:`agm_fast.methods.Method` (``fusion`` only gives the number of classes and
            the device of the default head); ``window`` must stay None.
        task: ``"classification"`` (the fusion weighs classifier entropies).
        head: the shared head, one module ``features -> [B, C]`` that every modality's features go through; default
            ``nn.Linear(d, C)`` on the fusion output layer's device and dtype, which needs M equal feature sizes.
            Its parameters are in :meth:`param_groups` and its weights in the method state.
        feature_dims: the M feature sizes (default: ``fusion.dims``, else the first forward's); needed only to build
            the default head.
        **hparams: MLA's hyper-parameters (``agm_fast.methods.mla.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("mla", encoders=[enc_a, enc_v], fusion=head, entropy="sample")
    """

    owns_step = True
    windowed = False
    accumulation_refusal = "each sub-step steps the optimizer on its own modality's gradient"

    def __init__(
        self,
        encoders,
        fusion,
        *,
        window=None,
        seed: int = 0,
        task: str = "classification",
        head: Optional[nn.Module] = None,
        feature_dims: Optional[Sequence[int]] = None,
    ) -> None:
        if window is not None:
            raise ValueError(f"window: MLA replaces joint training at every epoch and has no window, expected None, "
                             f"got {window!r}")
        super().__init__(encoders, fusion, window=None, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: MLA's test-time fusion weighs classifier entropies, expected 'classification', "
                             f"got {task!r}")
        self._default_head = head is None
        if head is None:
            dims = self.feature_dims(feature_dims, required=False)
            if dims is not None and len(set(dims)) != 1:
                raise ValueError(f"feature_dims: MLA's shared head reads every modality's features, expected M equal "
                                 f"sizes (or a head= of your own), got {dims}")
            w = output_layer(fusion).weight
            kw = dict(device=w.device, dtype=w.dtype)
            # Without the sizes, the head takes them from the first features (all modalities' must be equal).
            head = nn.LazyLinear(w.shape[0], **kw) if dims is None else nn.Linear(dims[0], w.shape[0], **kw)
        elif not isinstance(head, nn.Module):
            raise TypeError(f"head: expected an nn.Module (features -> [B, C]), got {type(head).__name__}")
        if self.projection and not isinstance(head, nn.Linear):
            raise ValueError(f"projection: projects the gradient of a head that reads the features directly, expected "
                             f"an nn.Linear head, got {type(head).__name__}")
        self.shared = head
        self._P: Optional[Tensor] = None
        self._substeps = 0
        self._decisions: Dict[str, Tensor] = {}

    def unimodal_logits(self, features: Sequence[Tensor]) -> List[Tensor]:
        """The shared head on each modality's features."""
        if self._default_head:
            features = [self.check_shared_width(m, h) for m, h in enumerate(features)]
        return [self.shared(h) for h in features]

    def weights(self, logits: Sequence[Tensor]) -> Tensor:
        """The fusion weights of M unimodal outputs (``[M]``, or ``[M, B]`` with ``entropy="sample"``)."""
        return fusion_weights(logits, self.entropy)

    def predict(self, inputs: Sequence[Tensor]) -> Tensor:
        """The test-time logits ``[B, C]``: the unimodal outputs fused with their entropy weights."""
        logits = self.unimodal_logits(self.encode(inputs))
        return fuse(logits, self.weights(logits))

    def _project(self, features: Tensor, progress: float, group: Any = None) -> None:
        grad = self.shared.weight.grad
        if self._substeps == 0 or grad is None:  # the first sub-step of the run keeps its gradient
            return
        if sharding.is_sharded(grad):  # rows (classes) sharded (checked at the step's start): G P^T acts row by row
            grad = grad.to_local()
        if self._P is None or self._P.device != grad.device:
            d = grad.shape[1]
            self._P = torch.eye(d, dtype=torch.float32, device=grad.device) if self._P is None else self._P.to(
                grad.device)
        if group is not None:
            # r is the mean of the global batch's features: their sums and counts over the ranks (one all-reduce).
            h = features.detach().reshape(features.shape[0], -1).float()
            n = torch.full((1,), float(h.shape[0]), dtype=h.dtype, device=h.device)
            total = distributed.all_reduce_sum(torch.cat([h.sum(0), n]), group, async_op=False).wait()
            features = (total[:-1] / total[-1])[None]
        self._P = owm_update(self._P, features, 0.1 ** (1.0 + progress))
        grad.copy_(grad @ self._P.T.to(grad.dtype))

    def train_step(self, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int], steps: Any, *,
                   progress: Optional[float] = None) -> StepResult:
        """One forward of the encoders, then one sub-step per modality (see the class). The result's ``loss`` is the
        mean of the M unimodal losses, ``correct`` counts the test-time rule's hits on this batch's unimodal outputs
        and ``coeffs`` are its weights (their batch mean with ``entropy="sample"``). Under ``steps.process_group``
        the weights are the global batch's; the losses and hits are this rank's rows'."""
        if self.projection and progress is None:
            raise ValueError("progress: MLA's projection strength reads the fraction of the epoch done, expected a "
                             "float in [0, 1], got None")
        weight = getattr(self.shared, "weight", None)
        if self.projection and sharding.is_sharded(weight) and not sharding.is_sharded_on_rows(weight):
            # G P^T mixes a row's columns: a shard of whole rows projects alone, any other layout would need the
            # whole gradient.
            raise ValueError(f"projection: expected the shared head's weight whole or sharded by rows (fully_shard's "
                             f"Shard(0) over a 1-D mesh), since the projection needs whole rows of its gradient, got "
                             f"placements {tuple(weight.placements)}")
        feats = self.encode(inputs)
        if self._default_head:
            feats = [self.check_shared_width(m, h) for m, h in enumerate(feats)]
        logits, losses = [], []
        # Under data parallelism each loss is scaled by this rank's share of the global batch (SubSteps.share).
        share, group = steps.share(target.shape[0], target.device), steps.group
        for m, h in enumerate(feats):
            z = self.shared(h)
            loss = F.cross_entropy(z, target)
            project = functools.partial(self._project, h, float(progress), group) if self.projection else None
            steps.run(loss if share is None else loss * share, project, set_to_none=m == 0 or not self.zero_fill)
            self._substeps += 1
            logits.append(z.detach())
            losses.append(loss.detach())
        if self.zero_fill:  # the released loop deletes every gradient after the batch
            steps.zero_grad()
        z = torch.stack(logits)
        losses = torch.stack(losses)
        if group is None:
            w = self.weights(z)
            coeffs = w if w.dim() == 1 else w.mean(1)
        else:
            w, coeffs, losses = self._global_report(z, losses, share / dist.get_world_size(group), group)
        fused = fuse(z, w)
        self._decisions = {"weights": coeffs, "losses": losses}
        return StepResult(
            losses.mean(),
            (fused.argmax(-1) == target).sum(),
            torch.full((), float(target.shape[0]), device=target.device),
            coeffs.to(torch.float32),
        )

    def _global_report(self, z: Tensor, losses: Tensor, frac: Tensor, group: Any):
        """The step's report over the global batch, from this rank's unimodal outputs ``z [M, B, C]``, losses and
        share ``frac = n_r / N``: the weights (``"batch"``: from the entropies of the softmax over the global batch
        axis; ``"sample"``: this rank's rows' own), their global batch mean and the global losses. One all-reduce
        (and one of the ``[M, C]`` maxima with ``"batch"``)."""
        zf = z.float()
        M, C = zf.shape[0], zf.shape[2]
        if self.entropy == "batch":
            top = zf.amax(1)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            e = (zf - top[:, None]).exp()
            local = torch.cat([e.sum(1), (e * zf).sum(1)], 1).reshape(-1)  # per (m, c): sum_b e, sum_b e z
        else:
            w = self.weights(zf)
            local = w.mean(1) * frac
        packed = torch.cat([losses.float() * frac, local])
        total = distributed.all_reduce_sum(packed, group, async_op=False).wait()
        losses, rest = total[:M].to(losses.dtype), total[M:]
        if self.entropy == "sample":
            return w, rest, losses
        sums = rest.view(M, 2 * C)
        mass, moment = sums[:, :C], sums[:, C:]
        # Entropy of p_bc = exp(z_bc - L_c), L_c = top_c + log(mass_c): -sum_c (moment_c / mass_c - L_c).
        ent = -(moment / mass - top - mass.log()).sum(1)
        w = torch.softmax(-ent, dim=0)
        return w, w, losses

    def decisions(self) -> Dict[str, Tensor]:
        """``weights``: ``[M]`` the test-time rule's weights on the last batch's unimodal outputs (their batch mean
        with ``entropy="sample"``); ``losses``: ``[M]`` the unimodal cross-entropies of the last step's sub-steps.
        Under data parallelism both are the global batch's."""
        return dict(self._decisions)

    def modules(self) -> List[nn.Module]:
        return [self.shared]

    def to(self, device) -> "MLAMethod":
        super().to(device)
        if self._P is not None:
            self._P = self._P.to(device)
        return self

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """The shared head's parameters, at the main learning rate."""
        return [{"params": [p for p in self.shared.parameters() if p.requires_grad]}]

    def method_state(self) -> Dict[str, Any]:
        """The head's weights, the projection and the sub-step count. With ``projection``, the projection is the
        identity it starts from until the first projected step (once the head's input size is known), so that the
        structure never changes (a sharded checkpoint loads into a fresh method's state in place)."""
        P = self._P
        weight = getattr(self.shared, "weight", None)
        if P is None and self.projection and isinstance(weight, Tensor) and not isinstance(
                weight, nn.parameter.UninitializedParameter):
            P = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
        return {"head": self.shared.state_dict(), "projection": P, "substeps": self._substeps}

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        self.shared.load_state_dict(state["head"])
        P = state["projection"]
        self._P = None if P is None else P.detach().clone()
        self._substeps = int(state["substeps"])
