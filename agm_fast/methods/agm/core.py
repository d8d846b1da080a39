"""AGM (Li et al., ICCV 2023): Shapley mono-modal outputs and adaptive gradient modulation.

- :class:`AGM`, one call per step: ``res = agm(*inputs, target=y, epoch=epoch)`` evaluates every needed subset
  output, the mono-modal outputs, scores and coefficients, and returns logits whose value is f(A) and whose gradient
  is already modulated;
- :class:`GradMod` and :class:`AGMCoefficients`, the two halves of the reference training loop, for ported code.

The maths, the subset strategies and every switch are in docs/methods.md, sections 1 and 5.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ... import distributed
from ..._validate import check_choice, check_target
from ...coalitions import check_modalities
from ...ops import shapley_eager
from ...ops.shapley import agm_coefficients_torch, shapley_outputs_torch
from ...window import Window, WindowLike
from ..hparams import declare
from .config import COEFFICIENT_HPARAMS, HPARAMS, SUBSET_HPARAMS
from .subsets import ShapleyBase

__all__ = ["AGM", "AGMCoefficients", "AGMResult", "GradMod"]

_TASKS = ("classification", "regression")

Coefficient = Union[float, int, Tensor]


class AGMResult(NamedTuple):
    """What :class:`AGM` returns for one step.

    Attributes:
        logits: ``[B, C]`` value f(A) (the full pass); its gradient reaches each subset output through the
            coefficient-scaled mono-modal outputs.
        mono: ``[M, B, C]`` mono-modal outputs psi (or phi with ``shapley="exact"``); differentiable.
        scores: ``[M]`` float32 per-modality scores of this batch (detached).
        coeffs: ``[M]`` float32 coefficients applied in this step (detached).
    """

    logits: Tensor
    mono: Tensor
    scores: Tensor
    coeffs: Tensor


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the incoming gradient by ``scales[index]``, read at backward time."""

    @staticmethod
    def forward(ctx, x: Tensor, scales: list, index: int) -> Tensor:
        ctx.scales = scales
        ctx.index = index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scale = ctx.scales[ctx.index]
        if isinstance(scale, Tensor):
            scale = scale.to(device=grad.device, dtype=grad.dtype)
        return grad * scale, None, None


@declare(SUBSET_HPARAMS)
class GradMod(ShapleyBase):
    """The reference AGM wrapper: mono-modal outputs whose gradients are scaled by ``update_scale``.

    ``forward(*inputs)`` evaluates every subset output f(S) (see the module docstring for the strategies), forms the
    mono-modal outputs psi_m (``shapley="reference"``; phi with ``"exact"``, a permutation estimate of psi with
    ``"sampled"``) and returns ``(psi_0, ..., psi_{M-1}, out)``. In backward the gradient reaching psi_m is multiplied
    by ``scale_m``, read at backward time, so ``update_scale`` may be called between forward and backward, as with the
    reference's identity modules and their full backward hooks. ``out`` has the value f(A) and its gradient flows
    through the scaled psi_m: ``out = sum_m psi_m + stopgrad(f(A) - sum_m psi_m)``.

    The wrapped model (or encoders and fusion) is registered as a submodule, as in the reference, so
    ``GradMod(model).parameters()`` is what the optimizer takes.

    Args:
        model: black-box ``nn.Module`` called as ``model(*inputs) -> [B, C]``. Or give ``encoders`` and ``fusion``.
        num_modalities: M (inferred from ``encoders``); 2 <= M <= 8 for the exact variants.
        encoders: M modules, ``encoders[m](x_m) -> features``.
        fusion: module called as ``fusion(*features) -> [B, C]`` (an ``nn.Linear`` is applied to the features
            concatenated along dim 1).
        strategy: ``"auto"`` (default), ``"sequential"``, ``"batched"`` or ``"factorized"``.
        masked_mode: ``"eval"`` (default, the reference) or ``"train"`` (factorized only; a deviation).
        shapley: ``"reference"`` (default), ``"exact"``, ``"sampled"`` or ``"stratified"`` (an estimate of psi that
            evaluates each drawn subset once; :func:`agm_fast.coalitions.stratified_shapley_weights`).
        mute: ``"input"`` (default: zero inputs, the reference) or ``"feature"`` (factorized only).
        baselines: with ``mute="feature"``, M tensors ``[d_m]`` (``nn.Parameter`` s are learned); None: zeros.
        num_permutations: permutations per step for ``shapley="sampled"`` (default 16).
        rounds: rounds per step for ``shapley="stratified"`` (default 2).
        seed: seed of the sampled permutations (drawn from ``(seed, step)``; the step counter is in state_dict).
        max_batch: upper bound on the rows of a stacked masked batch (subsets are chunked; at least one subset per
            call); None: all masked subsets in one call.
        mode_invariant: factorized with ``masked_mode="eval"`` only: whether each encoder computes the same in train
            and eval mode, so that the masked subsets reuse its full-pass features exactly (no deviation, no second
            pass). None (default): decided per encoder by a scan for mode-dependent modules and a bitwise check on
            the first training step (:mod:`agm_fast._modes`); a bool for every encoder; or M values of
            True / False / None. ``describe()`` reports each encoder's decision and why. Inside ``torch.compile``
            the check does not run (an undecided encoder keeps the eval-mode pass until an eager step decides).
        checkpoint_masked: recompute the activations of the eval-mode masked passes in the backward instead of
            keeping them (activation checkpointing: less memory, one more forward of those passes).
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        num_modalities: Optional[int] = None,
        *,
        encoders: Optional[Sequence[nn.Module]] = None,
        fusion: Optional[nn.Module] = None,
        baselines: Optional[Sequence[Tensor]] = None,
        seed: int = 0,
        mode_invariant=None,
    ) -> None:
        super().__init__(
            model, num_modalities, encoders, fusion, self.hparams_values, baselines, seed, register_model=True,
            mode_invariant=mode_invariant,
        )
        self._scales: List[Coefficient] = [1.0] * self.num_modalities

    def update_scale(self, *coeffs: Coefficient) -> None:
        """Set the gradient scale of each mono-modal output (applied in the next backward).

        Args:
            *coeffs: M floats or 0-d tensors (tensors are used on the device, no host sync), or one ``[M]`` tensor.
        """
        M = self.num_modalities
        if len(coeffs) == 1 and isinstance(coeffs[0], Tensor) and coeffs[0].dim() == 1:
            coeffs = tuple(coeffs[0].unbind(0))
        if len(coeffs) != M:
            raise ValueError(f"coeffs: expected {M} coefficients (one per modality), got {len(coeffs)}")
        scales: List[Coefficient] = []
        for m, c in enumerate(coeffs):
            if isinstance(c, Tensor):
                if c.numel() != 1:
                    raise ValueError(f"coeffs[{m}]: expected a float or a 0-d tensor, got shape {tuple(c.shape)}")
                scales.append(c.detach().reshape(()))
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                scales.append(float(c))
            else:
                raise TypeError(f"coeffs[{m}]: expected a float or a 0-d tensor, got {type(c).__name__}")
        # In place: graphs built earlier hold this list and read it in backward.
        self._scales[:] = scales

    def forward(self, *inputs: Tensor) -> Tuple[Tensor, ...]:
        """Evaluate every needed subset and return the scaled mono-modal outputs and the loss logits.

        Args:
            *inputs: M tensors ``[B, ...]``, one per modality.

        Returns:
            ``(psi_0, ..., psi_{M-1}, out)``, each ``[B, C]``.
        """
        xs = self._check_inputs(inputs)
        masks, W = self._plan(xs[0].device)
        F = self._evaluate(xs, masks)
        self._count_step()
        psi = shapley_outputs_torch(F, W.to(F.device))
        scaled = [_ScaleGrad.apply(psi[m], self._scales, m) for m in range(self.num_modalities)]
        total = torch.stack(scaled).sum(0)
        out = total + (F[-1] - total).detach()
        return (*scaled, out)


@declare(COEFFICIENT_HPARAMS)
class AGMCoefficients(nn.Module):
    """Scores, running means and coefficients of the reference AGM training loop, on the device.

    The maths is in docs/methods.md, section 1.4.

    For each step: ``s_m = mean_b -log(max(softmax(psi_m)[b, y_b], 1e-8))`` (regression: the MSE of psi_m against the
    target), ``r_m = exp(mean_{j!=m} s_j - s_m)``, ``rbar_m`` the same on the running means S before this step's update,
    ``c_m = exp(alpha * min(rbar_m - r_m, cap))``; then ``S <- S t/(t+1) + s/(t+1)``, ``t <- t+1``, every step, inside
    and outside the window. Outside the window the coefficients are 1 (``hold_last=True``: the last ones, as the
    reference code does). A step with non-finite scores gives NaN coefficients and leaves the state unchanged. The
    state is updated only in training mode.

    Buffers (in ``state_dict()``): ``running [M]``, ``count []`` (steps counted), ``last_coeffs [M]``, all float32.

    Args:
        num_modalities: M >= 2.
        alpha: modulation strength.
        cap: upper bound on ``rbar - r`` (default 10.0), or None.
        window: the modulation window (:class:`agm_fast.Window`, or ``(start_epoch, end_epoch)`` inclusive), or None
            (every epoch).
        hold_last: outside the window keep the last coefficients instead of 1.
        task: ``"classification"`` (default) or ``"regression"``.
        process_group: with ``torch.distributed`` initialised, the per-modality score sums and sample counts are
            all-reduced over this group (None: the default group) in one collective of 2M numbers, so every rank
            gets the coefficients and running means a single process computes on the global batch. Without
            distributed nothing changes.
    """

    def __init__(
        self,
        num_modalities: int,
        window: WindowLike = None,
        task: str = "classification",
        process_group=None,
    ) -> None:
        super().__init__()
        M = check_modalities(num_modalities, "sampled")
        self.num_modalities = M
        self.window = Window.of(window)
        self.task = check_choice("task", task, _TASKS)
        self.process_group = process_group
        self.register_buffer("running", torch.zeros(M))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("last_coeffs", torch.ones(M))
        self._eye = {}

    def in_window(self, epoch: Optional[int]) -> bool:
        """Whether ``epoch`` lies in the modulation window (``epoch=None`` only when the window is every epoch)."""
        return self.window.contains(epoch)

    def _update(
        self, F: Tensor, W: Tensor, labels: Tensor, in_window: bool
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Run the fused op on subset logits ``F [S, B, C]``; returns ``(psi [M, B, C], scores [M], coeffs [M])``."""
        if self.running.device != F.device:
            self.to(F.device)
        psi, scores, running_new, count_new, coeffs = shapley_eager.scores(
            F, W, labels, self.running, self.count, self.last_coeffs, self.alpha, self.cap, in_window,
            self.hold_last, self.task == "regression",
        )
        if distributed.is_active(self.process_group):
            # The op's scores are this rank's batch means: one collective turns them into the global batch mean,
            # and the coefficients and running means are recomputed from it (device arithmetic, no host sync).
            scores = distributed.global_mean_scores(scores.detach(), F.shape[1], self.process_group)
            running_new, count_new, coeffs = agm_coefficients_torch(
                scores, self.running, self.count, self.last_coeffs, self.alpha, self.cap, in_window, self.hold_last
            )
        coeffs = coeffs.detach()
        if self.training:
            with torch.no_grad():
                self.running.copy_(running_new)
                self.count.copy_(count_new)
                self.last_coeffs.copy_(torch.where(torch.isfinite(coeffs).all(), coeffs, self.last_coeffs))
        return psi, scores.detach(), coeffs

    def forward(
        self, psis: Union[Tensor, Sequence[Tensor]], labels: Tensor, epoch: Optional[int] = None
    ) -> Tensor:
        """One step of the reference loop's arithmetic.

        Args:
            psis: the M mono-modal outputs ``[B, C]`` (e.g. from :class:`GradMod`), or one ``[M, B, C]`` tensor.
            labels: ``[B]`` int64 class indices (regression: ``[B]`` or ``[B, C]`` float targets).
            epoch: the current epoch (required with a window).

        Returns:
            ``[M]`` float32 coefficients on the device of ``psis`` (pass them to ``GradMod.update_scale(*coeffs)``).
        """
        M = self.num_modalities
        if isinstance(psis, Tensor):
            F = psis.detach()
        else:
            if len(psis) != M:
                raise ValueError(f"psis: expected {M} mono-modal outputs, got {len(psis)}")
            F = torch.stack([p.detach() for p in psis])
        if F.dim() != 3 or F.shape[0] != M:
            raise ValueError(f"psis: expected M = {M} tensors [B, C] (or one [M, B, C]), got shape {tuple(F.shape)}")
        if F.shape[1] < 1:
            raise ValueError("psis: expected a batch of at least one sample, got B = 0")
        check_target(labels, F.shape[1], F.shape[2], self.task, F.device, name="labels")
        in_window = self.in_window(epoch)
        eye = self._eye.get(F.device)
        if eye is None:
            eye = self._eye[F.device] = torch.eye(M, dtype=torch.float32, device=F.device)
        _, _, coeffs = self._update(F, eye, labels, in_window)
        return coeffs


@declare(HPARAMS)
class AGM(ShapleyBase):
    """AGM in one call per step: subset outputs, mono-modal outputs, scores, coefficients and modulated logits.

    ``res = agm(*inputs, target=y, epoch=epoch)`` evaluates f(S) for every needed subset (see the module docstring
    for the strategies), then one op computes psi, the scores, the running means and this step's coefficients on the
    device (no host sync), and a second op returns logits whose value is f(A) and whose gradient reaches each f(S)
    as ``sum_m c_m W[m, S] g``: the stop-gradient form of the reference's scaled psi.

    ``state_dict()`` holds the modulator state (running means, count, last coefficients, the sampled-Shapley step
    counter, learned baselines), not the model weights: the model is used, not registered. Resuming from it is
    exact. The state changes only in training mode (``agm.train()``, the default); in eval mode a call computes
    coefficients without updating anything.

    Args:
        model, encoders, fusion, num_modalities, strategy, masked_mode, shapley, mute, baselines, num_permutations,
            rounds, seed, max_batch, mode_invariant, checkpoint_masked: as :class:`GradMod`.
        alpha: modulation strength (default 1.0; published: AV-MNIST 2.5, CREMA-D 1.5, UR-Funny 4.0 / 6.0).
        cap: upper bound on ``rbar - r`` (default 10.0), or None.
        window: the modulation window (:class:`agm_fast.Window` or ``(start_epoch, end_epoch)``, inclusive), or None
            (every epoch).
        hold_last: outside the window keep the last coefficients (the reference) instead of 1 (default).
        task: ``"classification"`` (default) or ``"regression"`` (MSE score; beyond the reference).
        process_group: as :class:`AGMCoefficients` (distributed training: coefficients of the global batch).
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        *,
        encoders: Optional[Sequence[nn.Module]] = None,
        fusion: Optional[nn.Module] = None,
        num_modalities: Optional[int] = None,
        window: WindowLike = None,
        baselines: Optional[Sequence[Tensor]] = None,
        task: str = "classification",
        seed: int = 0,
        process_group=None,
        mode_invariant=None,
    ) -> None:
        super().__init__(
            model, num_modalities, encoders, fusion, self.hparams_values, baselines, seed, register_model=False,
            mode_invariant=mode_invariant,
        )
        self.coefficients = AGMCoefficients(
            self.num_modalities, window=window, task=task, process_group=process_group,
            **{k: self.hparams_values[k] for k in COEFFICIENT_HPARAMS.names},
        )

    @property
    def task(self) -> str:
        return self.coefficients.task

    def forward(self, *inputs: Tensor, target: Tensor, epoch: Optional[int] = None) -> AGMResult:
        """One training step's AGM.

        Args:
            *inputs: M tensors ``[B, ...]``, one per modality.
            target: ``[B]`` int64 class indices (regression: ``[B]`` or ``[B, C]`` float targets).
            epoch: the current epoch (required with a window).

        Returns:
            :class:`AGMResult` ``(logits [B, C], mono [M, B, C], scores [M], coeffs [M])``.
        """
        xs = self._check_inputs(inputs)
        B = xs[0].shape[0]
        task = self.coefficients.task
        check_target(target, B, None, task, None)
        in_window = self.coefficients.in_window(epoch)
        masks, W = self._plan(xs[0].device)
        F = self._evaluate(xs, masks)
        if W.device != F.device:
            W = W.to(F.device)
        C = F.shape[2]
        check_target(target, B, C, task, F.device)
        psi, scores, coeffs = self.coefficients._update(F, W, target, in_window)
        logits = shapley_eager.combine(F, W, coeffs, F.shape[0] - 1)
        self._count_step()
        return AGMResult(logits, psi, scores, coeffs)
