"""CGGM: classifier-guided gradient modulation (Guo et al., NeurIPS 2024; docs/methods.md, section 4).

One classifier head per modality learns on the detached encoder features. From the change of each head's metric
between consecutive steps, CGGM derives per-modality coefficients ``B_m`` that rescale the encoders' gradients
(magnitude) and weight a cosine loss that pulls the fusion output layer towards the heads (direction).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from ... import distributed as dist_helpers
from ... import sharding
from ..._select import resolve_modalities
from ..._validate import check_choice, check_float, check_int
from ...fusion import output_layer
from ..hparams import declare
from .config import HPARAMS

__all__ = ["CGGM"]

# The reference adds this to the sum of the metric changes before dividing by it.
S_EPS = 1e-8

_TASKS = ("classification", "regression")


def _lazy(p: Tensor) -> bool:
    # A parameter of a lazy module (nn.LazyLinear) before its first call: no shape yet.
    return isinstance(p, nn.parameter.UninitializedParameter)


def default_heads(dims: Optional[Sequence[int]], M: int, C: int, D: int, like: Tensor) -> List[nn.Module]:
    """CGGM's default heads for feature sizes ``dims`` and a fusion output layer ``[C, D]`` (see :class:`CGGM`):
    ``nn.Linear(d_m, C)`` (``nn.LazyLinear(C)`` with ``dims`` None) when ``D`` is ``sum(dims)`` or every ``d_m``;
    otherwise ``nn.Sequential(nn.Linear(d_m, D), nn.ReLU(), nn.Linear(D, C))``."""
    kw = dict(device=like.device, dtype=like.dtype)
    if dims is None:
        return [nn.LazyLinear(C, **kw) for _ in range(M)]
    if D == sum(dims) or all(d == D for d in dims):
        return [nn.Linear(d, C, **kw) for d in dims]
    return [nn.Sequential(nn.Linear(d, D, **kw), nn.ReLU(), nn.Linear(D, C, **kw)) for d in dims]


@declare(HPARAMS)
class CGGM:
    """Classifier-guided gradient modulation for any number of modalities.

    Per training step t, on the current batch (docs/methods.md, section 4):

    - ``metric_m(t)``: the metric of head m (accuracy; sign accuracy ``pred > 0`` vs ``y > 0`` for regression;
      or a user callable such as Dice), computed from the head outputs **before** the head's update of this step.
    - ``d_m = metric_m(t) - metric_m(t-1)`` with ``metric_m(-1) = 0`` (the reference starts its previous metrics at
      zero and never resets them, so the first step's d_m is the first metric).
    - ``S = sum_m d_m + 1e-8`` and ``B_m = (S - d_m) / S``.
    - Magnitude: after the main backward, the gradients of encoder m are multiplied by ``rho * B_m``.
    - Direction: ``l_gm = (sum_m |B_m| - sum_m B_m cos_m) / M`` enters the **next** step's loss as ``lam * l_gm``.

    ``direction="weights"`` (the reference): ``cos_m`` is the cosine between the flattened weight of head m's output
    layer and the fusion output layer's weight, both as they were when :meth:`observe` ran (before this step's
    optimizer updates), the reference's one-step-stale graph. The B_m and the head weights are constants, so the
    gradient of ``l_gm`` reaches **only the fusion output layer's weight**, evaluated at those stored values.
    ``direction="gradient"`` (the paper): ``cos_m`` is the cosine between the gradient of head m's output-layer
    weight (from its loss at the last :meth:`observe`) and the gradient of the fusion output layer's weight with
    respect to the current task loss, taken with ``create_graph=True``; ``l_gm`` then back-propagates through that
    gradient (a double backward through the model, roughly doubling the backward cost), and on DDP it uses the
    rank's local gradient.

    What "the fusion output layer" is compared with: with weight ``[C, D]`` and head m's output weight
    ``[C, d_m]``, when ``D == sum(feature_dims)`` the fusion layer is read as a concat head and head m is compared
    with its column slice ``W[:, off_m : off_m + d_m]`` (modalities in the order given); when every ``d_m == D`` the
    whole matrices are compared (the reference's models, whose heads and fusion end in Linear(D, C)). Anything else
    is an error. Custom heads are compared through their last ``nn.Linear``, which must have the matching shape.

    Degenerate S: the reference only guards with a global ``clip_grad_norm_(0.8)`` after the scaling. With every
    ``d_m = 0``, ``S = 1e-8`` and every ``B_m = 1``. When the changes cancel (``sum d = 0``, some ``d_m != 0``),
    ``B_m = 1 - d_m * 1e8``: enormous coefficients of both signs. With ``S < 0`` the formula still holds:
    ``B_m = 1 - d_m / S`` may be negative, and a negative ``B_m`` reverses that encoder's gradient and flips the
    sign of its direction term. Such values pass through unchanged by default (parity). ``bound=b`` clamps every
    B_m to ``[-b, b]`` before it is used (scaling and l_gm); it limits the magnitude, not the sign.

    Step order (the reference's), with the class's three calls::

        cggm = agm_fast.CGGM([enc_a, enc_v], fusion.out, feature_dims=[128, 128], num_classes=C,
                             rho=1.3, lam=0.1, head_lr=lr / 2)
        for x_a, x_v, y in loader:
            opt.zero_grad()
            h_a, h_v = enc_a(x_a), enc_v(x_v)
            logits = fusion(h_a, h_v)
            loss = F.cross_entropy(logits, y) + cggm.loss_term()   # lam * l_gm of the previous step; 0 at first
            loss.backward()
            cggm.observe([h_a, h_v], y)       # metrics of the heads, d, S, B; trains the heads; stores l_gm inputs
            cggm.scale_gradients_()           # encoder m's grads *= rho * B_m
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.8)   # the reference's only guard
            opt.step()

    Build CGGM after the model has its final device and dtype: the heads are created on the fusion weight's device
    and dtype, and the encoders' parameters are grouped by device and dtype once.

    :meth:`loss_term` must run before this step's :meth:`observe` (it reads what the previous observe stored), and
    :meth:`observe` before :meth:`scale_gradients_` and before ``opt.step()`` (it snapshots the fusion weight). In
    ``"gradient"`` mode call ``cggm.loss_term(task_loss)``.

    Args:
        encoders: M encoders: a list of modules / name prefixes of ``model`` / parameter lists, or a dict
            name -> one of those. Their gradients are scaled; the selection rules of :class:`agm_fast.MSLR` apply.
        fusion_out: the fusion output layer: an ``nn.Linear`` (or any module with a 2-D ``weight``) with weight
            ``[C, D]``, or that weight itself.
        feature_dims: M feature sizes d_m, the last dimension of each encoder feature given to :meth:`observe`; None:
            taken from the first :meth:`observe` (the default heads are then ``nn.LazyLinear(C)``).
        num_classes: C, the size of the heads' outputs (the regression output size for ``task="regression"``).
        rho: the gradient scale factor (1.3 in the reference).
        lam: weight of the direction term (0.05 to 0.2 in the paper).
        direction: ``"weights"`` (reference) or ``"gradient"`` (paper).
        task: ``"classification"`` (labels ``[B]`` int64) or ``"regression"`` (targets ``[B]`` or ``[B, C]``).
        metric: optional ``metric(head_output, labels) -> 0-d tensor``, higher is better (e.g. Dice); replaces the
            task's default metric.
        head_loss: optional ``head_loss(head_output, labels) -> 0-d tensor`` that trains the heads; default cross
            entropy (classification) or MSE (regression). The reference trains them with the task criterion
            (e.g. ``l1_loss`` on MOSI).
        bound: optional bound b on ``|B_m|`` (None: no bound, the reference).
        heads: optional M head modules; default ``nn.Linear(d_m, C)`` per modality, on the device and dtype of the
            fusion weight, or, when the fusion layer's input size D is neither ``sum(d_m)`` nor every ``d_m`` (the
            output layer of an MLP head), ``nn.Sequential(nn.Linear(d_m, D), nn.ReLU(), nn.Linear(D, C))``, whose
            output layer is compared with the whole fusion weight. Available as ``cggm.heads`` (an
            ``nn.ModuleList``).
        head_optimizer: a callable ``params -> Optimizer`` (an optimizer class, or a ``functools.partial``) that
            CGGM calls with ``lr=head_lr``; or None: the caller trains the heads by putting ``cggm.heads.parameters()``
            in a param group of their own optimizer (observe() then only accumulates the heads' gradients, so the
            caller's ``zero_grad()`` must clear them each step; ``"gradient"`` mode reads them as accumulated).
        head_lr: the heads' learning rate (the reference uses half the main learning rate); needed when CGGM
            builds the head optimizer.
        model: the model that encoder name prefixes refer to.
        process_group: with ``torch.distributed`` initialised, metrics (as correct/total counts for the built-in
            metrics, as a mean over ranks for a user metric) and head gradients are all-reduced over this group
            (default: the world), so that every rank gets the coefficients of the global batch.

    Attributes:
        heads: the ``nn.ModuleList`` of heads (train them, save them; discard them at inference).
        head_optimizer: the optimizer CGGM built for the heads, or None.
        metric: ``[M]`` float64, the heads' metrics of the last :meth:`observe` (None before it).
        prev_metric: ``[M]`` float64, the metrics the next step's changes are taken against.
        coeffs: ``[M]`` float64, the coefficients B of the last :meth:`observe` (after ``bound``).
        step: the number of :meth:`observe` calls so far.
    """

    def __init__(
        self,
        encoders,
        fusion_out: Union[nn.Module, Tensor],
        feature_dims: Optional[Sequence[int]],
        num_classes: int,
        task: str = "classification",
        metric: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        head_loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        heads: Optional[Sequence[nn.Module]] = None,
        head_optimizer: Optional[Callable[..., torch.optim.Optimizer]] = torch.optim.Adam,
        head_lr: Optional[float] = None,
        model: Optional[nn.Module] = None,
        process_group=None,
    ):
        check_choice("task", task, _TASKS)
        rho, lam, direction, bound = self.rho, self.lam, self.direction, self.bound
        num_classes = check_int("num_classes", num_classes, low=1)
        if head_lr is not None:
            head_lr = check_float("head_lr", head_lr, low=0.0, low_open=True)
        self.names, self._params, _ = resolve_modalities(encoders, model, arg="encoders")
        M = len(self.names)
        if M < 2:
            raise ValueError(f"encoders: expected at least 2 modalities, got {M}")
        dims = None if feature_dims is None else [int(d) for d in feature_dims]
        if dims is not None and (len(dims) != M or any(d < 1 for d in dims)):
            raise ValueError(f"feature_dims: expected {M} positive sizes (one per encoder), got {list(feature_dims)}")

        weight = fusion_out if isinstance(fusion_out, Tensor) else getattr(fusion_out, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(
                f"fusion_out: expected an nn.Linear, a module with a 2-D .weight, or a 2-D weight tensor, got "
                f"{type(fusion_out).__name__}"
            )
        if not weight.requires_grad:
            raise ValueError("fusion_out: expected a weight that requires grad, got one that does not")
        if direction == "gradient" and sharding.is_sharded(weight):
            raise ValueError(
                'direction: "gradient" takes the gradient of the fusion output layer\'s weight inside the step\'s '
                'graph, which FSDP2 replaces by a gathered copy; use direction="weights" (the reference) with a '
                "sharded fusion head"
            )
        C, D = weight.shape
        if C != num_classes:
            raise ValueError(
                f"num_classes: expected {C} (the fusion output layer's weight is [{C}, {D}]), got {num_classes}"
            )
        self.fusion_weight = weight
        if heads is None:
            heads = default_heads(dims, M, C, D, weight)
        elif len(heads) != M:
            raise ValueError(f"heads: expected {M} modules (one per modality), got {len(heads)}")
        self.heads = heads if isinstance(heads, nn.ModuleList) else nn.ModuleList(heads)
        self._head_out = [output_layer(h, f"heads[{m}]") for m, h in enumerate(self.heads)]
        self._slices: Optional[List[slice]] = None
        self.feature_dims = dims
        self.num_classes = C
        if dims is not None and not any(_lazy(layer.weight) for layer in self._head_out):
            self._resolve(dims)

        if head_optimizer is None:
            self.head_optimizer = None
        elif isinstance(head_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "head_optimizer: expected a callable that builds an optimizer (e.g. torch.optim.Adam), got an "
                "optimizer instance"
            )
        else:
            if head_lr is None:
                raise ValueError(
                    "head_lr: expected a learning rate for the heads (the reference uses half the main one) when "
                    "head_optimizer is given, got None"
                )
            self.head_optimizer = head_optimizer(self.heads.parameters(), lr=head_lr)

        self._groups: List[Dict[tuple, List[Tensor]]] = []
        for params in self._params:
            groups: Dict[tuple, List[Tensor]] = {}
            for p in params:
                groups.setdefault((p.device, p.dtype), []).append(p)
            self._groups.append(groups)
        self._keys = sorted({key for groups in self._groups for key in groups}, key=str)

        self.fusion_weight = weight
        self.rho = float(rho)
        self.lam = float(lam)
        self.direction = direction
        self.task = task
        self.bound = None if bound is None else float(bound)
        self._metric_fn = metric
        self._loss_fn = head_loss
        self.process_group = process_group

        f64 = dict(dtype=torch.float64, device=weight.device)
        self.step = 0
        self.prev_metric = torch.zeros(M, **f64)
        self.metric: Optional[Tensor] = None
        self.coeffs: Optional[Tensor] = None
        self._pending: Optional[Dict[str, object]] = None

    @property
    def num_modalities(self) -> int:
        return len(self.names)

    def _resolve(self, dims: List[int]) -> None:
        """Which part of the fusion weight ``[C, D]`` each head's output layer ``[C, w_m]`` is compared with: the
        column slice m when every ``w_m == d_m`` and ``D == sum(d_m)`` (a concat head), the whole weight when every
        ``w_m == D``; anything else is an error that says what to pass."""
        C, D = self.fusion_weight.shape
        widths = [layer.weight.shape[1] for layer in self._head_out]
        bad = [m for m, layer in enumerate(self._head_out) if layer.weight.shape[0] != C]
        if not bad and widths == dims and D == sum(dims):
            offsets = [sum(dims[:m]) for m in range(len(dims))]
            self._slices = [slice(o, o + d) for o, d in zip(offsets, dims)]
        elif not bad and all(w == D for w in widths):
            self._slices = [slice(0, D)] * len(dims)
        else:
            shapes = [tuple(layer.weight.shape) for layer in self._head_out]
            raise ValueError(
                f"heads: expected output layers [{C}, d_m] with the feature sizes {dims} summing to the fusion output "
                f"layer's input {D} (a concat head), or every output layer [{C}, {D}] (compared with the whole "
                f"fusion weight [{C}, {D}]), got {shapes}; pass heads= ending in nn.Linear({D}, {C}), or "
                f"fusion_output= a layer whose weight is [{C}, sum(d_m)]"
            )
        self.feature_dims = list(dims)

    def _loss(self, out: Tensor, labels: Tensor) -> Tensor:
        if self._loss_fn is not None:
            return self._loss_fn(out, labels)
        if self.task == "classification":
            return Fn.cross_entropy(out, labels)
        return Fn.mse_loss(out, labels.to(out.dtype).reshape(out.shape))

    def _metrics(self, outs: List[Tensor], labels: Tensor) -> Tensor:
        """``[M]`` float64 metrics of this step, reduced over the process group when there is one."""
        group = self.process_group
        if self._metric_fn is not None:
            vals = torch.stack([torch.as_tensor(self._metric_fn(o, labels)).reshape(()) for o in outs])
            vals = vals.to(self.prev_metric.device, torch.float64)
            if dist_helpers.is_active(group):
                vals = dist_helpers.global_sums(vals, group) / torch.distributed.get_world_size(group)
            return vals
        if self.task == "classification":
            hits = torch.stack([(o.argmax(-1) == labels).sum() for o in outs])
            total = labels.numel()
        else:
            y = labels.reshape(outs[0].shape) > 0
            hits = torch.stack([((o > 0) == y).sum() for o in outs])
            total = y.numel()
        counts = torch.stack([hits.to(torch.float64), torch.full_like(hits, total, dtype=torch.float64)])
        counts = dist_helpers.global_sums(counts.to(self.prev_metric.device), group)
        return counts[0] / counts[1]

    def _check_observe(self, features: Sequence[Tensor], labels: Tensor) -> None:
        M = self.num_modalities
        if len(features) != M:
            raise ValueError(f"features: expected {M} feature tensors (one per modality), got {len(features)}")
        if self._slices is None:
            for m, f in enumerate(features):
                if not isinstance(f, Tensor) or f.dim() < 2:
                    shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                    raise ValueError(f"features[{m}]: expected shape [B, ..., d_m], got {shape}")
            dims = self.feature_dims or [int(f.shape[-1]) for f in features]
            with torch.no_grad():
                for head, f in zip(self.heads, features):  # lazy heads take their sizes here
                    if any(_lazy(p) for p in head.parameters()):
                        head(f[:1].detach().to(self.fusion_weight.dtype))
            self._resolve(dims)
        for m, (f, d) in enumerate(zip(features, self.feature_dims)):
            if not isinstance(f, Tensor) or f.dim() < 2 or f.shape[-1] != d:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"features[{m}]: expected shape [B, ..., {d}], got {shape}")
            if f.shape[0] != features[0].shape[0]:
                raise ValueError(
                    f"features[{m}]: expected batch size {features[0].shape[0]} (that of features[0]), got {f.shape[0]}"
                )
        if not isinstance(labels, Tensor) or labels.shape[0] != features[0].shape[0]:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels: expected batch size {features[0].shape[0]}, got shape {shape}")
        if self.task == "classification" and self._metric_fn is None:
            if labels.dtype != torch.int64:
                raise TypeError(f"labels: expected int64 class indices, got {labels.dtype}")
            if labels.dim() != 1:
                raise ValueError(f"labels: expected shape [B] (one class index per sample), got {tuple(labels.shape)}")
            # A value check reads the labels, so it runs only on CPU tensors (no host sync on CUDA).
            on_cpu = labels.device.type == "cpu" and labels.numel() > 0
            if on_cpu and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"labels: expected class indices in [0, {self.num_classes}), got values in "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )

    def observe(self, features: Sequence[Tensor], labels: Tensor) -> Tensor:
        """Run and train the heads on this batch, update the metrics and the coefficients B, store l_gm's inputs.

        Call once per step, after the main backward (or at least after :meth:`loss_term`) and before
        ``optimizer.step()``. No host synchronisation.

        Args:
            features: M encoder features ``[B, d_m]`` (or ``[B, ..., d_m]``); they are detached here.
            labels: ``[B]`` int64 class indices (classification) or ``[B]`` / ``[B, C]`` targets (regression), or
                whatever ``metric`` and ``head_loss`` take.

        Returns:
            ``B`` ``[M]`` float64, this step's coefficients (also in ``self.coeffs``).
        """
        self._check_observe(features, labels)
        # Features from an autocast region may be half precision; the heads run in their own dtype.
        feats = [f.detach().to(layer.weight.dtype) for f, layer in zip(features, self._head_out)]
        with torch.enable_grad():
            outs = [head(f) for head, f in zip(self.heads, feats)]
            with torch.no_grad():
                metric = self._metrics([o.detach() for o in outs], labels)
            head_w = None
            if self.direction == "weights":
                head_w = [layer.weight.detach().clone() for layer in self._head_out]
            if self.head_optimizer is not None:
                self.head_optimizer.zero_grad(set_to_none=True)
            loss = sum(self._loss(o, labels) for o in outs)
            loss.backward()
        self._reduce_head_grads()
        if self.direction == "gradient":
            head_w = [
                layer.weight.grad.detach().clone() if layer.weight.grad is not None else torch.zeros_like(layer.weight)
                for layer in self._head_out
            ]
        if self.head_optimizer is not None:
            self.head_optimizer.step()

        d = metric - self.prev_metric
        S = d.sum() + S_EPS
        B = (S - d) / S
        # What the reference's formula gave, before any bound: a negative or (with a bound) clamped B_m is flagged on
        # the device and reported once, at an epoch's end (no host sync here).
        flags = torch.stack([(B < 0).any(), (B.abs() > self.bound).any() if self.bound is not None else B.new_zeros(
            (), dtype=torch.bool)])
        self.flags = flags if getattr(self, "flags", None) is None else self.flags | flags
        if self.bound is not None:
            B = B.clamp(-self.bound, self.bound)
        if self.min_coeff is not None:
            B = B.clamp(min=self.min_coeff)
        self.prev_metric = metric
        self.metric = metric
        self.coeffs = B
        self.step += 1
        self._pending = {"coeffs": B, "head": head_w}
        if self.direction == "weights":
            with torch.no_grad():
                self._pending["fusion"] = sharding.full(self.fusion_weight).detach().clone()
        return B

    def _reduce_head_grads(self) -> None:
        group = self.process_group
        if not dist_helpers.is_active(group):
            return
        grads = [p.grad for p in self.heads.parameters() if p.grad is not None]
        if not grads:
            return
        flat = dist_helpers.global_sums(torch.cat([g.reshape(-1) for g in grads]), group)
        flat = flat / torch.distributed.get_world_size(group)
        chunks = flat.split([g.numel() for g in grads])
        torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(chunks, grads)])

    def l_gm(self, task_loss: Optional[Tensor] = None) -> Tensor:
        """The direction term ``l_gm`` from the inputs stored by the last :meth:`observe` (0 before the first).

        Args:
            task_loss: the current step's task loss; needed (and only used) in ``"gradient"`` mode.

        Returns:
            A 0-d tensor in the fusion weight's dtype. Weights mode: its gradient reaches only the fusion output
            layer's weight. Gradient mode: it back-propagates through the fusion weight's gradient.
        """
        W = self.fusion_weight
        if self._pending is None:
            return torch.zeros((), dtype=W.dtype, device=W.device)
        B = self._pending["coeffs"]
        targets = self._pending["head"]
        if self.direction == "weights":
            # Value at the stored weight, gradient into the live weight: the reference's one-step-stale graph. A
            # sharded weight (FSDP2) is gathered whole, and the gradient flows back into this rank's shard.
            Wf = sharding.full(W)
            fused = self._pending["fusion"] + (Wf - Wf.detach())
        else:
            if sharding.is_sharded(W):
                raise ValueError(
                    'direction: "gradient" needs the fusion output layer\'s weight in the step\'s graph, which FSDP2 '
                    'replaces by a gathered copy; use direction="weights" (the reference) with a sharded fusion head'
                )
            if task_loss is None:
                raise ValueError(
                    'task_loss: expected the task loss with direction="gradient" (loss_term(task_loss)), got None'
                )
            if not task_loss.requires_grad:
                raise ValueError(
                    "task_loss: expected a loss that requires grad (the fusion weight's gradient is taken), got one "
                    "that does not"
                )
            (fused,) = torch.autograd.grad(task_loss, W, create_graph=True, allow_unused=True)
            if fused is None:
                raise ValueError(
                    "task_loss: expected a loss that depends on the fusion output layer's weight, got one that does not"
                )
        cos = torch.stack(
            [
                Fn.cosine_similarity(t.reshape(-1), fused[:, sl].reshape(-1), dim=0)
                for t, sl in zip(targets, self._slices)
            ]
        )
        Bc = B.to(cos.dtype)
        return (Bc.abs().sum() - (Bc * cos).sum()) / self.num_modalities

    def loss_term(self, task_loss: Optional[Tensor] = None) -> Tensor:
        """``lam * l_gm``, to add to this step's loss (see :meth:`l_gm`). Call once per step, before observe()."""
        return self.lam * self.l_gm(task_loss)

    @property
    def params(self) -> List[List[nn.Parameter]]:
        """The selected parameters of each modality (whose gradients are scaled)."""
        return [list(ps) for ps in self._params]

    @torch.no_grad()
    def scale_gradients_(self) -> None:
        """Multiply encoder m's gradients in place by ``rho * B_m``; call after backward and observe(), before step.

        One multi-tensor multiply per modality by a device tensor (no host sync). Parameters whose ``.grad`` is None
        are skipped.
        """
        if self.coeffs is None:
            raise RuntimeError(
                "scale_gradients_: expected the coefficients of this step, got none; call observe() first"
            )
        factors = self.rho * self.coeffs
        # One cast of the M factors per (device, dtype) of the parameters, then one multiply per modality and group.
        cast = {key: factors.to(*key).unbind() for key in self._keys}
        for m, groups in enumerate(self._groups):
            for key, params in groups.items():
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, cast[key][m])

    def to(self, device) -> "CGGM":
        """Move the heads and the running state (metrics, coefficients, the pending direction term) to ``device``;
        the encoders and the fusion layer are the model's to move."""
        self.heads.to(device)

        def move(t):
            return None if t is None else t.to(device)

        self.prev_metric = self.prev_metric.to(device)
        self.metric = move(self.metric)
        self.coeffs = move(self.coeffs)
        if self._pending is not None:
            self._pending = {
                k: ([move(t) for t in v] if isinstance(v, list) else move(v)) for k, v in self._pending.items()
            }
        return self

    def state_dict(self) -> Dict[str, object]:
        """Everything needed to resume: step count, metrics, B, the pending l_gm inputs, heads and head optimizer."""
        # The same keys and shapes before the first step as after it (zeros and flags stand in for what is not
        # there yet), so that a sharded checkpoint (torch.distributed.checkpoint) loads into a fresh state.
        M, dev = len(self.names), self.prev_metric.device
        zeros = torch.zeros(M, dtype=torch.float64, device=dev)
        if self._pending is not None:
            pending = {k: (list(v) if isinstance(v, list) else v) for k, v in self._pending.items()}
        else:
            heads = [torch.zeros((0,), device=dev) if _lazy(layer.weight)
                     else torch.zeros_like(layer.weight, device=dev) for layer in self._head_out]
            pending = {"coeffs": zeros.clone(), "head": heads}
            if self.direction == "weights":
                W = self.fusion_weight
                pending["fusion"] = torch.zeros(tuple(W.shape), dtype=W.dtype, device=dev)
        return {
            "names": list(self.names),
            "direction": self.direction,
            "step": self.step,
            "prev_metric": self.prev_metric.clone(),
            "metric": zeros.clone() if self.metric is None else self.metric.clone(),
            "coeffs": zeros.clone() if self.coeffs is None else self.coeffs.clone(),
            "observed": self.metric is not None,
            "has_pending": self._pending is not None,
            "pending": pending,
            "heads": self.heads.state_dict(),
            "head_optimizer": None if self.head_optimizer is None else self.head_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what :meth:`state_dict` returned (tensors are moved to the fusion weight's device)."""
        if list(state["names"]) != self.names:
            raise ValueError(f"state: expected the state of modalities {self.names}, got {list(state['names'])}")
        if state["direction"] != self.direction:
            raise ValueError(f"state: expected the state of direction={self.direction!r}, got {state['direction']!r}")
        dev = self.prev_metric.device

        def to_dev(t):
            return None if t is None else t.to(dev)

        self.step = int(state["step"])
        self.prev_metric = state["prev_metric"].to(dev, torch.float64)
        observed = bool(state.get("observed", state["metric"] is not None))
        self.metric = to_dev(state["metric"]) if observed else None
        self.coeffs = to_dev(state["coeffs"]) if observed else None
        pending = state["pending"] if state.get("has_pending", True) else None
        if pending is None:
            self._pending = None
        else:
            self._pending = {
                "coeffs": pending["coeffs"].to(dev),
                "head": [t.to(dev) for t in pending["head"]],
            }
            if "fusion" in pending:
                self._pending["fusion"] = pending["fusion"].to(dev)
        self.heads.load_state_dict(state["heads"])
        if self.head_optimizer is not None and state["head_optimizer"] is not None:
            self.head_optimizer.load_state_dict(state["head_optimizer"])
