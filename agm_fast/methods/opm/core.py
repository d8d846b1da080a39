"""OPM: on-the-fly prediction modulation (Wei et al., arXiv 2410.11582; docs/methods.md, section 3.3).

Instead of damping the dominant modality's gradients, OPM drops its features: each sample drops modality m with
probability ``q_m`` (from OGM-style scores), and the kept features are scaled by ``1 / (1 - theta)``. Samples whose
every modality was dropped keep loss weight 0 (:func:`opm_loss`) instead of leaving the batch, so shapes stay static
and nothing syncs with the host.

Typical use::

    opm = agm_fast.OPM([512, 512])                      # no dropping in epochs 0-5, as the reference
    h = [model.audio_net(x_a), model.visual_net(x_v)]
    scores = agm_fast.opm_scores(model.fusion, h, y)     # the head's weights detached, the features not
    h, weight = opm(*h, scores=scores, epoch=epoch)
    loss = agm_fast.opm_loss(model.fusion(*h), y, weight)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

from ... import distributed
from ..._seed import step_seed
from ..._validate import check_choice, check_float, check_int, check_seed
from ...coalitions import mean_of_others
from ...fusion import per_modality_logits
from ...ops.ogm_scores import ogm_scores_torch
from ...window import Window, WindowLike
from ..hparams import declare
from .config import HPARAMS, THETA_GRADS

__all__ = ["OPM", "opm_drop_probs", "opm_theta", "opm_apply", "opm_loss", "opm_scores", "THETA_GRADS"]

# "reference": theta's gradient is theta itself (the released code); "none": theta is a constant.


def _check_unit(value: float, name: str) -> float:
    return check_float(name, value, low=0.0, high=1.0)


def opm_scores(
    fusion: nn.Module, features: Sequence[Tensor], labels: Tensor, process_group: Optional["ProcessGroup"] = None
) -> Tensor:
    """OGM-style scores ``s_m = sum_b softmax(out_m)[b, y_b]`` for OPM, from a detached copy of the head.

    The per-modality logits come from :func:`agm_fast.fusion.per_modality_logits` with the head's parameters
    detached and the features not, as the journal code computes them: the scores carry a gradient to the encoders,
    which the reference's theta gradient uses (``theta_grad="reference"``).

    Under data parallelism (:func:`agm_fast.distributed.is_active` for ``process_group``) the scores are the sums
    over the global batch, with the gradient of the global batch: the all-reduce's backward all-reduces the scores'
    gradient, so each rank's encoders get the gradient a single process would give their samples.

    Args:
        fusion: the fusion head, ``fusion(*features) -> [B, C]``.
        features: M feature tensors ``[B, d_m]``.
        labels: ``[B]`` int64 class indices.
        process_group: the data-parallel group (None: the default group, if initialised).

    Returns:
        ``[M]`` float32 scores.
    """
    logits = per_modality_logits(fusion, features, detach_params=True)
    scores = ogm_scores_torch(logits, labels, 0.0)[0]
    if distributed.is_active(process_group):
        scores = _GlobalSum.apply(scores, process_group)
    return scores


class _GlobalSum(torch.autograd.Function):
    """Sum over the group in forward; in backward the sum of every rank's gradient (each rank's loss depends on
    the global sum, so the gradient that reaches a rank's own contribution is the total one)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def opm_drop_probs(scores: Tensor, q_base: float = 0.5, lam: float = 0.5) -> Tensor:
    """OPM drop probabilities from OGM-style scores, on the scores' device (no host synchronisation).

    ``rho_m = s_m / mean_{j != m} s_j``, ``r_m = tanh(relu(rho_m - 1))``, ``q_m = q_base (1 + lam r_m)`` if
    ``r_m > 0`` else 0, clipped to [0, 1].

    Args:
        scores: ``[M]`` per-modality scores, M >= 2 (``agm_fast.ops.ogm_scores(...)[0]``).
        q_base: base drop probability (default 0.5).
        lam: how much the imbalance raises it (default 0.5).

    Returns:
        ``[M]`` float32 drop probabilities, differentiable with respect to ``scores``.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] < 2:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a tensor [M] with M >= 2, got {got}")
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor, got {scores.dtype}")
    lam = check_float("lam", lam, low=0.0)
    q_base = _check_unit(q_base, "q_base")
    s = scores.to(torch.float32)
    rho = s / mean_of_others(s)
    r = torch.tanh(torch.relu(rho - 1))
    q = torch.where(r > 0, q_base * (1 + lam * r), torch.zeros_like(r))
    return q.clamp(0.0, 1.0)


def opm_theta(drop_probs: Tensor, dims: Sequence[int]) -> Tensor:
    """The expected dropped fraction of the feature entries, ``theta = sum_m d_m q_m / sum_m d_m``.

    Args:
        drop_probs: ``[M]`` drop probabilities q.
        dims: the M feature dimensions ``d_m``.

    Returns:
        0-d float32 tensor on ``drop_probs``' device.
    """
    if drop_probs.dim() != 1 or drop_probs.shape[0] != len(dims):
        raise ValueError(f"drop_probs: expected shape [{len(dims)}], got {tuple(drop_probs.shape)}")
    total = float(sum(dims))
    weights = torch.tensor([d / total for d in dims], dtype=torch.float32)
    return (drop_probs.to(torch.float32) * weights.to(drop_probs.device)).sum()


def _check_features(features: Sequence[Tensor], dims: Optional[Sequence[int]]) -> int:
    if len(features) == 0:
        raise ValueError("features: expected one tensor per modality, got none")
    if dims is not None and len(features) != len(dims):
        raise ValueError(f"features: expected {len(dims)} tensors (one per modality), got {len(features)}")
    batch = None
    for m, h in enumerate(features):
        if not isinstance(h, Tensor) or h.dim() < 2:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"features[{m}]: expected a tensor [B, d_m], got {got}")
        if not h.is_floating_point():
            raise TypeError(f"features[{m}]: expected a floating-point tensor, got {h.dtype}")
        if dims is not None and math.prod(h.shape[1:]) != dims[m]:
            raise ValueError(f"features[{m}]: expected {dims[m]} features per sample, got shape {tuple(h.shape)}")
        if batch is None:
            batch = h.shape[0]
        elif h.shape[0] != batch or h.device != features[0].device:
            raise ValueError(
                f"features[{m}]: batch {h.shape[0]} on {h.device} differs from features[0]'s batch {batch} on "
                f"{features[0].device}"
            )
    return batch


class _ThetaScale(torch.autograd.Function):
    """``out_m = h_m / (1 - theta)`` for every modality, in forward and backward.

    With ``reference=True`` the gradient of theta is theta itself, whatever reaches the outputs: the released code's
    scaling function does this, and theta built from un-detached scores passes it on to the encoders.
    """

    @staticmethod
    def forward(ctx, theta: Tensor, reference: bool, *features: Tensor):
        scale = torch.where(theta < 1, 1 / (1 - theta), torch.ones_like(theta))
        ctx.save_for_backward(theta, scale)
        ctx.reference = reference
        return tuple(h * scale.to(h.dtype) for h in features)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        theta, scale = ctx.saved_tensors
        dtheta = theta.clone() if ctx.reference and ctx.needs_input_grad[0] else None
        return (dtheta, None, *[None if g is None else g * scale.to(g.dtype) for g in grads])


def opm_apply(
    features: Sequence[Tensor], keep: Tensor, theta: Union[Tensor, float], theta_grad: str = "reference"
) -> Tuple[List[Tensor], Tensor]:
    """The deterministic part of OPM: zero the dropped features and scale everything by ``1 / (1 - theta)``.

    ``out_m[b] = h_m[b] * keep[b, m] / (1 - theta)``; the gradient of the features is scaled the same way.
    ``theta >= 1`` (every modality dropped with probability 1) uses scale 1: every feature is zero then anyway. When
    ``theta`` requires grad and ``theta_grad="reference"``, its gradient is theta itself (the released code's quirk;
    docs/methods.md, section 3); with ``"none"`` theta is a constant.

    Args:
        features: M tensors ``[B, ...]``.
        keep: ``[B, M]`` bool (or 0/1) keep decisions.
        theta: 0-d tensor or float in [0, 1].
        theta_grad: ``"reference"`` (default) or ``"none"``.

    Returns:
        ``(outs, sample_weight)``: M tensors shaped like ``features``, and ``[B]`` float32 weights, 1 where a
        sample keeps at least one modality, else 0.
    """
    check_choice("theta_grad", theta_grad, THETA_GRADS)
    B = _check_features(features, None)
    M = len(features)
    if not isinstance(keep, Tensor) or tuple(keep.shape) != (B, M):
        got = tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
        raise ValueError(f"keep: expected shape [{B}, {M}], got {got}")
    device = features[0].device
    theta = torch.as_tensor(theta, dtype=torch.float32, device=device)
    if theta_grad == "none":
        theta = theta.detach()
    keep_f = keep.to(device=device, dtype=torch.float32)
    masked = [h * keep_f[:, m].to(h.dtype).view((B,) + (1,) * (h.dim() - 1)) for m, h in enumerate(features)]
    outs = list(_ThetaScale.apply(theta, theta_grad == "reference", *masked))
    weight = keep.to(device=device).bool().any(dim=1).to(torch.float32)
    return outs, weight


def opm_loss(logits: Tensor, labels: Tensor, sample_weight: Tensor) -> Tensor:
    """Cross-entropy averaged over the samples OPM kept.

    ``sum_b w_b CE_b / max(sum_b w_b, 1)``: with 0/1 weights this is the mean over the kept samples, the value and
    gradient of removing the dropped ones from the batch, without a data-dependent shape. A batch where every
    sample was dropped gives 0 (and zero gradients).

    Args:
        logits: ``[B, C]``.
        labels: ``[B]`` int64 class indices.
        sample_weight: ``[B]`` weights from :class:`OPM` / :func:`opm_apply`.

    Returns:
        0-d loss tensor.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, C], got shape {tuple(logits.shape)}")
    if sample_weight.shape != (logits.shape[0],):
        raise ValueError(f"sample_weight: expected shape [{logits.shape[0]}], got {tuple(sample_weight.shape)}")
    ce = F.cross_entropy(logits, labels, reduction="none")
    w = sample_weight.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1)


@declare(HPARAMS)
class OPM(nn.Module):
    """On-the-fly prediction modulation: drop the dominant modality's features per sample.

    In training mode and inside the modulation window, :meth:`forward` with ``scores`` computes the drop
    probabilities (:func:`opm_drop_probs`); with probability ``p_exe`` it draws per-sample, per-modality keep
    decisions (Bernoulli(1 - q_m)), zeros the dropped feature vectors and scales every feature by
    ``1 / (1 - theta)``. Otherwise (eval mode, outside the window, no scores, or the ``p_exe`` draw says no) the
    features pass through unchanged. In one process nothing synchronises with the host.

    Randomness: each dropping step seeds a generator on the features' device from ``(seed, step)``, so a run is
    reproducible and the step counter, in ``state_dict()``, resumes it. Under data parallelism (``process_group``
    active) every rank draws the decisions of the whole batch and keeps its own rows (the local batch sizes are gathered
    each step, so they may differ): the ranks drop what a single process would drop on the global batch (a
    ``DistributedSampler`` pads to equal shards).

    Args:
        dims: the M feature dimensions ``d_m`` (features per sample), which weight theta; None: taken from the
            features of the first call (then fixed).
        q_base: base drop probability in [0, 1] (default 0.5).
        lam: imbalance gain of the drop probability, >= 0 (default 0.5).
        p_exe: probability in [0, 1] that a step drops at all (default 0.7).
        seed: the random seed, an int in [0, 2**63).
        window: the modulation window (:class:`agm_fast.Window` or ``(start, end)`` inclusive epochs), or None (every
            epoch); the warm-up moves its start.
        warmup_epochs: no dropping before this epoch (default 6, the journal code's warm-up; 0 turns it off).
        theta_grad: ``"reference"`` (default: theta's gradient is theta, as the released code) or ``"none"``
            (theta a constant); see the module docstring.
        process_group: the data-parallel group whose global batch the decisions are drawn for (None: the default
            group when ``torch.distributed`` is initialised with more than one rank; otherwise local).
    """

    def __init__(
        self,
        dims: Optional[Sequence[int]],
        seed: int = 0,
        window: WindowLike = None,
        process_group=None,
    ):
        super().__init__()
        if dims is not None:
            if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
                raise TypeError(f"dims: expected a sequence of feature dimensions or None, got {type(dims).__name__}")
            dims = [check_int(f"dims[{m}]", d, low=1) for m, d in enumerate(dims)]
            if len(dims) < 2:
                raise ValueError(f"dims: expected at least two positive feature dimensions, got {dims}")
        self.dims: Optional[List[int]] = dims
        self.seed = check_seed("seed", seed)
        self.window = Window.of(window).starting_at(self.warmup_epochs)
        self.process_group = process_group
        self.step_count = 0
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._dim_weights: Dict[torch.device, Tensor] = {}
        self.last_keep: Optional[Tensor] = None
        self.last_theta: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, q_base={self.q_base}, lam={self.lam}, p_exe={self.p_exe}, seed={self.seed}, "
            f"window={self.window}, theta_grad={self.theta_grad!r}"
        )

    def get_extra_state(self) -> Dict[str, int]:
        return {"seed": self.seed, "step": self.step_count}

    def set_extra_state(self, state: Dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.step_count = int(state["step"])

    def drop_probs(self, scores: Tensor) -> Tensor:
        """``[M]`` drop probabilities for ``scores [M]`` with this module's ``q_base`` and ``lam``."""
        return opm_drop_probs(scores, self.q_base, self.lam)

    def active(self, epoch: Optional[int]) -> bool:
        """Whether a training step in ``epoch`` drops (training mode and inside the window)."""
        return self.training and self.window.contains(epoch)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        gen.manual_seed(step_seed(self.seed, self.step_count))
        return gen

    def forward(
        self,
        *features: Tensor,
        scores: Optional[Tensor] = None,
        drop_probs: Optional[Tensor] = None,
        epoch: Optional[int] = None,
    ) -> Tuple[List[Tensor], Tensor]:
        """Drop and rescale the features of one training step.

        Args:
            *features: M tensors ``[B, ...]`` with ``d_m`` features per sample (or one list of them).
            scores: ``[M]`` OGM-style scores of this batch, from which q is computed (:func:`opm_scores` keeps the
                path that the reference's theta gradient takes).
            drop_probs: ``[M]`` drop probabilities to use instead of ``scores``.
            epoch: the current epoch, compared with the window (required unless the window is every epoch).

        Returns:
            ``(features_out, sample_weight)``: M tensors shaped like the inputs, and ``[B]`` float32 loss weights
            (0 for samples whose every modality was dropped; pass them to :func:`opm_loss`).
        """
        if len(features) == 1 and isinstance(features[0], (list, tuple)):
            features = tuple(features[0])
        B = _check_features(features, self.dims)
        if self.dims is None:
            if len(features) < 2:
                raise ValueError(f"features: expected at least two modalities, got {len(features)}")
            self.dims = [math.prod(h.shape[1:]) for h in features]
        device = features[0].device
        if scores is not None and drop_probs is not None:
            raise ValueError("scores: expected either scores or drop_probs, got both")
        if not self.active(epoch) or (scores is None and drop_probs is None):
            return list(features), torch.ones(B, dtype=torch.float32, device=device)
        M = len(self.dims)
        if drop_probs is None:
            q = self.drop_probs(scores)
        else:
            if not isinstance(drop_probs, Tensor) or tuple(drop_probs.shape) != (M,):
                got = tuple(drop_probs.shape) if isinstance(drop_probs, Tensor) else type(drop_probs).__name__
                raise ValueError(f"drop_probs: expected a tensor [{M}], got {got}")
            q = drop_probs.to(torch.float32)
            if q.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(((q >= 0) & (q <= 1)).all()):
                raise ValueError(f"drop_probs: expected values in [0, 1], got {q.tolist()}")
        q = q.to(device)
        gen = self._generator(device)
        self.step_count += 1
        gate = torch.rand((), generator=gen, device=device)
        if distributed.is_active(self.process_group):
            # The decisions of the global batch, drawn by every rank; this rank keeps its own rows. The local batch
            # sizes may differ (a last batch), so every rank learns them: one gather of W numbers, read on the host.
            world = torch.distributed.get_world_size(self.process_group)
            rank = torch.distributed.get_rank(self.process_group)
            mine = torch.tensor([B], dtype=torch.int64, device=device)
            sizes = [torch.empty_like(mine) for _ in range(world)]
            torch.distributed.all_gather(sizes, mine, group=self.process_group)
            sizes = [int(n) for n in torch.cat(sizes).tolist()]
            start = sum(sizes[:rank])
            u = torch.rand((sum(sizes), M), generator=gen, device=device)[start : start + B]
        else:
            u = torch.rand((B, M), generator=gen, device=device)
        execute = gate < self.p_exe
        keep = (u >= q.detach()) | ~execute
        weights = self._dim_weights.get(device)
        if weights is None:
            # Cached per device: a fresh host-to-device copy every step could stall the stream.
            weights = torch.tensor([d / sum(self.dims) for d in self.dims], dtype=torch.float32, device=device)
            self._dim_weights[device] = weights
        theta = torch.where(execute, (q * weights).sum(), torch.zeros((), device=device))
        self.last_keep = keep
        self.last_theta = theta.detach()
        return opm_apply(features, keep, theta, self.theta_grad)
