"""OPM: on-the-fly prediction modulation (Wei et al., arXiv 2410.11582, SPEC section 3).

A feed-forward counterpart of OGM: instead of damping the dominant modality's gradients, OPM drops its features.
From OGM-style scores ``s [M]`` (``s_m = sum_b softmax(out_m)[b, y_b]`` on a detached head):

- ``rho_m = s_m / mean_{j != m} s_j``, ``r_m = tanh(relu(rho_m - 1))``;
- drop probability ``q_m = q_base (1 + lam r_m)`` if ``r_m > 0`` else 0, clipped to [0, 1];
- with probability ``p_exe`` per step, each sample drops each modality independently with probability ``q_m``
  (its whole feature vector is zeroed), and every feature is scaled by ``1 / (1 - theta)``,
  ``theta = sum_m d_m q_m / sum_m d_m``, in forward and backward;
- evaluation never drops.

The reference removes the samples whose every modality was dropped, which changes the batch size with the data.
Here those samples stay in the batch with loss weight 0 and the loss is the mean over the kept samples
(:func:`opm_loss`): the loss value and the gradient are the same as removing them, with static shapes and no host
synchronisation. (A fusion head with batch statistics, e.g. BatchNorm, still sees the zeroed samples.)

Typical use::

    opm = agm_fast.OPM([512, 512])
    h = [model.audio_net(x_a), model.visual_net(x_v)]
    with torch.no_grad():
        scores, _ = agm_fast.functional.ogm_scores(agm_fast.per_modality_logits(model.fusion, h), y, alpha=0.0)
    h, weight = opm(*h, scores=scores)
    loss = agm_fast.opm_loss(model.fusion(*h), y, weight)
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OPM", "opm_drop_probs", "opm_theta", "opm_apply", "opm_loss"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _step_seed(seed: int, step: int) -> int:
    # A well-mixed 63-bit generator seed per (seed, step), so that consecutive steps draw unrelated streams.
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 1


def _check_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def opm_drop_probs(scores: Tensor, q_base: float = 0.5, lam: float = 0.5) -> Tensor:
    """OPM drop probabilities from OGM-style scores, on the scores' device (no host synchronisation).

    ``rho_m = s_m / mean_{j != m} s_j``, ``r_m = tanh(relu(rho_m - 1))``, ``q_m = q_base (1 + lam r_m)`` if
    ``r_m > 0`` else 0, clipped to [0, 1].

    Args:
        scores: ``[M]`` per-modality scores, M >= 2 (``functional.ogm_scores(...)[0]``).
        q_base: base drop probability (default 0.5).
        lam: how much the imbalance raises it (default 0.5).

    Returns:
        ``[M]`` float32 drop probabilities.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] < 2:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a tensor [M] with M >= 2, got {got}")
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor, got {scores.dtype}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam: expected a finite value >= 0, got {lam!r}")
    q_base = _check_unit(q_base, "q_base")
    s = scores.detach().to(torch.float32)
    M = s.shape[0]
    rho = s / ((s.sum() - s) / (M - 1))
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


def opm_apply(features: Sequence[Tensor], keep: Tensor, theta: Union[Tensor, float]) -> Tuple[List[Tensor], Tensor]:
    """The deterministic part of OPM: zero the dropped features and scale everything by ``1 / (1 - theta)``.

    ``out_m[b] = h_m[b] * keep[b, m] / (1 - theta)``; the scale applies to the gradient as well (it is a product).
    ``theta >= 1`` (every modality dropped with probability 1) uses scale 1: every feature is zero then anyway.

    Args:
        features: M tensors ``[B, ...]``.
        keep: ``[B, M]`` bool (or 0/1) keep decisions.
        theta: 0-d tensor or float in [0, 1].

    Returns:
        ``(outs, sample_weight)``: M tensors shaped like ``features``, and ``[B]`` float32 weights, 1 where a
        sample keeps at least one modality, else 0.
    """
    B = _check_features(features, None)
    M = len(features)
    if not isinstance(keep, Tensor) or tuple(keep.shape) != (B, M):
        got = tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
        raise ValueError(f"keep: expected shape [{B}, {M}], got {got}")
    device = features[0].device
    theta = torch.as_tensor(theta, dtype=torch.float32, device=device)
    scale = torch.where(theta < 1, 1 / (1 - theta), torch.ones_like(theta))
    factors = keep.to(device=device, dtype=torch.float32) * scale
    outs = []
    for m, h in enumerate(features):
        f = factors[:, m].to(h.dtype).view((B,) + (1,) * (h.dim() - 1))
        outs.append(h * f)
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


class OPM(nn.Module):
    """On-the-fly prediction modulation: drop the dominant modality's features per sample.

    In training mode, :meth:`forward` with ``scores`` computes the drop probabilities (:func:`opm_drop_probs`); with
    probability ``p_exe`` it draws per-sample, per-modality keep decisions (Bernoulli(1 - q_m)), zeros the dropped
    feature vectors and scales every feature by ``1 / (1 - theta)``. Otherwise (eval mode, no scores, or the
    ``p_exe`` draw says no) the features pass through unchanged. Nothing synchronises with the host.

    Randomness: each training step seeds a generator on the features' device from ``(seed, step)``, so a run is
    reproducible and the step counter, in ``state_dict()``, resumes it.

    Args:
        dims: the M feature dimensions ``d_m`` (features per sample), which weight theta.
        q_base: base drop probability (default 0.5).
        lam: imbalance gain of the drop probability (default 0.5).
        p_exe: probability that a step drops at all (default 0.7).
        seed: the random seed.
    """

    def __init__(self, dims: Sequence[int], q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, seed: int = 0):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2 or any(d <= 0 for d in dims):
            raise ValueError(f"dims: expected at least two positive feature dimensions, got {dims}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam: expected a finite value >= 0, got {lam!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.dims = dims
        self.q_base = _check_unit(q_base, "q_base")
        self.lam = float(lam)
        self.p_exe = _check_unit(p_exe, "p_exe")
        self.seed = seed
        self.step_count = 0
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._dim_weights: Dict[torch.device, Tensor] = {}
        self.last_keep: Optional[Tensor] = None
        self.last_theta: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"dims={self.dims}, q_base={self.q_base}, lam={self.lam}, p_exe={self.p_exe}, seed={self.seed}"

    def get_extra_state(self) -> Dict[str, int]:
        return {"seed": self.seed, "step": self.step_count}

    def set_extra_state(self, state: Dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.step_count = int(state["step"])

    def drop_probs(self, scores: Tensor) -> Tensor:
        """``[M]`` drop probabilities for ``scores [M]`` with this module's ``q_base`` and ``lam``."""
        return opm_drop_probs(scores, self.q_base, self.lam)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        gen.manual_seed(_step_seed(self.seed, self.step_count))
        return gen

    def forward(
        self, *features: Tensor, scores: Optional[Tensor] = None, drop_probs: Optional[Tensor] = None
    ) -> Tuple[List[Tensor], Tensor]:
        """Drop and rescale the features of one training step.

        Args:
            *features: M tensors ``[B, ...]`` with ``d_m`` features per sample (or one list of them).
            scores: ``[M]`` OGM-style scores of this batch, from which q is computed.
            drop_probs: ``[M]`` drop probabilities to use instead of ``scores``.

        Returns:
            ``(features_out, sample_weight)``: M tensors shaped like the inputs, and ``[B]`` float32 loss weights
            (0 for samples whose every modality was dropped; pass them to :func:`opm_loss`).
        """
        if len(features) == 1 and isinstance(features[0], (list, tuple)):
            features = tuple(features[0])
        B = _check_features(features, self.dims)
        device = features[0].device
        if scores is not None and drop_probs is not None:
            raise ValueError("pass either scores or drop_probs, not both")
        if not self.training or (scores is None and drop_probs is None):
            return list(features), torch.ones(B, dtype=torch.float32, device=device)
        M = len(self.dims)
        if drop_probs is None:
            q = self.drop_probs(scores)
        else:
            if not isinstance(drop_probs, Tensor) or tuple(drop_probs.shape) != (M,):
                got = tuple(drop_probs.shape) if isinstance(drop_probs, Tensor) else type(drop_probs).__name__
                raise ValueError(f"drop_probs: expected a tensor [{M}], got {got}")
            q = drop_probs.detach().to(torch.float32)
            if q.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(((q >= 0) & (q <= 1)).all()):
                raise ValueError(f"drop_probs: expected values in [0, 1], got {q.tolist()}")
        q = q.to(device)
        gen = self._generator(device)
        self.step_count += 1
        gate = torch.rand((), generator=gen, device=device)
        u = torch.rand((B, M), generator=gen, device=device)
        execute = gate < self.p_exe
        keep = (u >= q) | ~execute
        weights = self._dim_weights.get(device)
        if weights is None:
            # Cached per device: a fresh host-to-device copy every step could stall the stream.
            weights = torch.tensor([d / sum(self.dims) for d in self.dims], dtype=torch.float32, device=device)
            self._dim_weights[device] = weights
        theta = torch.where(execute, (q * weights).sum(), torch.zeros((), device=device))
        self.last_keep = keep
        self.last_theta = theta
        return opm_apply(features, keep, theta)
