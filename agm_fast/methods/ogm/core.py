"""OGM and OGM-GE (Peng et al., CVPR 2022) and the journal OGM (Wei et al., arXiv 2410.11582).

After ``backward()`` and before ``optimizer.step()``, the dominant modality's encoder gradients are scaled by
``k_m``; OGM-GE also adds Gaussian noise (docs/methods.md, sections 2 and 3). Two forms:

- the reference's functions, :func:`calculate_coefficient` and :func:`update_model_with_OGM_GE`, for ported code;
- :class:`OGMGE`, for any number of modalities: scores, coefficients and the in-place (noisy) scaling on the device
  with no host synchronisation, and a reproducible noise stream whose offset lives in ``state_dict()``.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ... import _backend, distributed, sharding
from ..._select import resolve_modalities
from ..._validate import check_choice, check_class_labels, check_per_modality_logits, check_seed
from ...fusion import per_modality_logits
from ...ops.ogm_ge import ogm_ge_
from ...ops.ogm_scores import ogm_coefficients_torch, ogm_scores
from ...window import Window, WindowLike
from ..hparams import declare
from .config import HPARAMS, MODULATION_MODES

__all__ = ["MODULATION_MODES", "calculate_coefficient", "update_model_with_OGM_GE", "OGMGE"]


def _check_mode(mode: str) -> str:
    return check_choice("mode", mode, MODULATION_MODES)


def _gather_grads(params: Sequence[Sequence[nn.Parameter]]) -> Tuple[List[Tensor], List[int]]:
    """The existing gradients of the selected parameters, with their modality index. Parameters whose ``grad`` is
    None (unused in this step's forward) are skipped; no gradient at all is an error."""
    grads: List[Tensor] = []
    group: List[int] = []
    for m, ps in enumerate(params):
        for p in ps:
            g = p.grad
            if g is None or g.numel() == 0:
                continue
            if g.is_sparse:
                raise TypeError("OGM modulates dense gradients; got a sparse gradient (nn.Embedding(sparse=True)?)")
            if not g.is_contiguous():
                # The op needs contiguous memory; the optimizer reads p.grad at step time, so replacing it is safe.
                p.grad = g = g.contiguous()
            grads.append(g)
            group.append(m)
    if not grads:
        raise RuntimeError(
            "none of the selected parameters has a gradient: call OGM between loss.backward() and optimizer.step()"
        )
    return grads, group


def _shard_noise_args(grads: List[Tensor], noise: bool) -> Tuple[List[Tensor], List[int], Optional[Tensor]]:
    """FSDP2 gradients: the local shards, their global element offsets and (with noise) the std of each whole
    gradient from the merged shard moments (one all-gather of ``[T, 3]`` numbers, no host sync), as the op takes
    them: ``sqrt(M2 / (N - 1)) + 1e-8``, std 0 for a one-element tensor, NaN kept (docs/methods.md, section 2)."""
    local, starts, group = sharding.local_shards(grads, "gradients")
    if not noise:
        return local, starts, None
    total, _, m2, _ = distributed.merge_moments(distributed.shard_moments(local), group)
    var = torch.where(total > 1, m2.clamp_min(0) / (total - 1).clamp_min(1), torch.zeros_like(m2))
    sigma = var.sqrt().to(torch.float32) + 1e-8
    return local, starts, sigma


def _as_coefficient(k: Union[Tensor, float], name: str) -> Tensor:
    if isinstance(k, Tensor):
        if k.numel() != 1:
            raise ValueError(f"{name}: expected a scalar coefficient, got shape {tuple(k.shape)}")
        return k.detach().reshape(()).to(torch.float32)
    if isinstance(k, (int, float)) and not isinstance(k, bool):
        return torch.tensor(float(k), dtype=torch.float32)
    raise TypeError(f"{name}: expected a float or a 0-d tensor, got {type(k).__name__}")


def calculate_coefficient(
    label: Tensor, out_a: Tensor, out_v: Tensor, alpha: float, continuous: bool = False
) -> Tuple[Tensor, Tensor]:
    """The reference's two-modality OGM coefficients, computed on the device with no host synchronisation.

    ``s_m = sum_b softmax(out_m)[b, y_b]``, ``rho = s_v / s_a``; if ``rho > 1``: ``k_v = 1 - tanh(alpha * relu(rho))``,
    ``k_a = 1``; else ``k_a = 1 - tanh(alpha * relu(1 / rho))``, ``k_v = 1``. As in the reference there is no "-1"
    (a tie damps the audio modality); ``continuous=True`` uses ``relu(rho - 1)``.

    Args:
        label: ``[B]`` int64 class indices.
        out_a: ``[B, C]`` audio (modality 0) logits.
        out_v: ``[B, C]`` visual (modality 1) logits.
        alpha: modulation strength >= 0.
        continuous: use ``relu(rho - 1)``.

    Returns:
        ``(k_a, k_v)``: 0-d float32 tensors on the logits' device.
    """
    for name, out in (("out_a", out_a), ("out_v", out_v)):
        if not isinstance(out, Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{name}: expected logits [B, C], got {got}")
    if out_a.shape != out_v.shape:
        raise ValueError(f"out_v: shape {tuple(out_v.shape)} differs from out_a's {tuple(out_a.shape)}")
    if out_a.device != out_v.device:
        raise ValueError(f"out_v: on {out_v.device}, but out_a is on {out_a.device}")
    logits = torch.stack([out_a.detach(), out_v.detach().to(out_a.dtype)])
    _, coeffs = ogm_scores(logits, label, alpha, continuous)
    return coeffs[0], coeffs[1]


def update_model_with_OGM_GE(
    model: nn.Module,
    k_a: Union[Tensor, float],
    k_v: Union[Tensor, float],
    mode: str = "OGM_GE",
    audio: str = "audio",
    visual: str = "visual",
    conv_only: bool = True,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """The reference's gradient update, in place, in one op over all selected gradients.

    Every selected gradient g of modality m becomes ``k_m g`` (``"OGM"``) or ``k_m g + N(0, (std(g) + 1e-8)^2)``
    (``"OGM_GE"``, noise on both modalities, ``std`` the unbiased std of g before scaling); ``"Normal"`` leaves the
    gradients as they are. Call it between ``loss.backward()`` and ``optimizer.step()``.

    Selection: parameters whose name, after an optional DataParallel ``module.`` prefix, starts with ``audio`` or
    ``visual`` (so ``"audio"`` selects ``audio_net.*``; end a prefix with ``"."`` to match one module exactly).
    ``conv_only=True`` keeps only 4-D (conv) weights, as the reference does. Unlike the reference, a prefix that
    selects nothing raises instead of silently modulating nothing. Parameters without a gradient are skipped.

    Args:
        model: the whole model.
        k_a: audio coefficient (float or 0-d tensor, e.g. from :func:`calculate_coefficient`).
        k_v: visual coefficient.
        mode: ``"Normal"``, ``"OGM"`` or ``"OGM_GE"`` (the reference's ``--modulation``).
        audio: name prefix of the audio encoder's parameters.
        visual: name prefix of the visual encoder's parameters.
        conv_only: modulate only 4-D parameters (the reference's selection).
        seed: noise seed; with ``offset``, it keys the noise (same key, same noise).
        offset: noise offset; advance it every step for fresh noise.
    """
    _check_mode(mode)
    if mode == "Normal":
        return
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for what, prefix in (("audio", audio), ("visual", visual)):
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"{what}: expected a non-empty parameter-name prefix, got {prefix!r}")
    _, params, _ = resolve_modalities({"audio": audio, "visual": visual}, model, conv_only=conv_only, arg="")
    grads, group = _gather_grads(params)
    device = grads[0].device
    coeffs = torch.stack([_backend.to_device(_as_coefficient(k, n), device) for k, n in ((k_a, "k_a"), (k_v, "k_v"))])
    _modulate(grads, group, coeffs, mode == "OGM_GE", seed, offset)


def _modulate(grads: List[Tensor], group: List[int], coeffs: Tensor, noise: bool, seed: int, offset: int) -> None:
    """The op on plain gradients, or on FSDP2 shards with their offsets and the whole gradients' std."""
    starts = sigma = None
    if any(sharding.is_sharded(g) for g in grads):
        grads, starts, sigma = _shard_noise_args(grads, noise)
    # The op takes one coefficient per modality index up to max(group): a modality without gradients at the end of
    # the list has none.
    ogm_ge_(
        grads, group, coeffs[: max(group) + 1], noise=noise, seed=seed, offset=offset, starts=starts, sigma=sigma
    )


EncoderSpec = Union[nn.Module, str]


@declare(HPARAMS)
class OGMGE:
    """OGM / OGM-GE for any number of modalities, and the journal version (warm-up, tie rule, OGM+).

    Each call of :meth:`step` (between ``loss.backward()`` and ``optimizer.step()``) computes the scores and
    coefficients on the device in one op and modulates every selected gradient in place with one more op: OGM
    ``g <- k_m g``, OGM-GE ``g <- k_m g + N(0, (std(g) + 1e-8)^2)`` with noise on every modulated modality, including
    the one with ``k = 1`` (docs/methods.md, section 2). Nothing synchronises with the host.

    Modulation happens only in the epochs of ``window`` (an :class:`agm_fast.Window`, inclusive, after the warm-up);
    other steps leave the gradients untouched and return coefficients 1.

    The journal version (``journal=True``, docs/methods.md section 3): no modulation in the first ``warmup_epochs``
    epochs (6 by default in journal mode, 0 otherwise), and on an exact score tie between two modalities modality 1 is
    damped (the CVPR code damps modality 0). ``ogm_plus=True`` (the journal's OGM+) replaces the damping: the dominant
    modality's coefficient is 1 and the weak modality's is ``plus_factor`` (4).

    Parameter selection: each modality's encoder is a module (all its trainable parameters), a parameter-name prefix
    in ``model`` (a DataParallel ``module.`` prefix is ignored), parameters or a param group; ``conv_only=True`` keeps
    4-D weights only, the reference's choice. A modality that selects no parameter raises at construction;
    parameters whose ``grad`` is None in a step (unused by that forward) are skipped, and a step where no selected
    parameter has a gradient raises.

    Noise: Philox keyed on ``(seed, offset, tensor index, element index)``, the offset advancing by one per
    modulated step, so a run is reproducible, every data-parallel replica with the same seed draws the same noise,
    and ``load_state_dict`` resumes the stream exactly.

    Args:
        encoders: modality -> encoder, as a list (modality m = position m) or a dict (modality m = m-th key); each
            an ``nn.Module`` or a parameter-name prefix (prefixes need ``model``).
        alpha: modulation strength >= 0 (default 0.8, CREMA-D; VGGSound 0.1; journal CREMA-D 2.6).
        mode: ``"Normal"`` (no modulation), ``"OGM"`` or ``"OGM_GE"`` (the reference's ``--modulation``).
        window: the modulation window (:class:`agm_fast.Window` or ``(modulation_starts, modulation_ends)``,
            inclusive epochs), or None (default: every epoch).
        conv_only: modulate only 4-D parameters (the reference's selection). Default False: every parameter.
        continuous: use ``relu(rho - 1)`` in the coefficient (the reference before May 2022).
        seed: noise seed, an int in [0, 2**63).
        model: the model in which string prefixes are looked up.
        journal: the journal code's rules (tie damps modality 1; a 6-epoch warm-up unless ``warmup_epochs`` says).
        ogm_plus: the journal's OGM+: dominant modalities get 1, the others ``plus_factor``.
        warmup_epochs: no modulation before this epoch (the window starts at ``max(window.start, warmup_epochs)``);
            None: 6 with ``journal=True``, else 0.
        plus_factor: the OGM+ coefficient of the weak modalities (4 in the journal), finite and > 0.
        process_group: the ``torch.distributed`` group of data-parallel replicas (None: the default group). When
            distributed is initialised with more than one rank, the seed is broadcast from rank 0 at construction
            and the scores are summed over the group before the coefficients are computed, so every replica uses
            the coefficients of the global batch and draws the same noise; otherwise nothing is reduced.
    """

    def __init__(
        self,
        encoders: Union[Sequence[EncoderSpec], Mapping[str, EncoderSpec]],
        window: WindowLike = None,
        seed: int = 0,
        model: Optional[nn.Module] = None,
        process_group=None,
    ):
        if self.warmup_epochs is None:
            self.warmup_epochs = 6 if self.journal else 0
        self.window = Window.of(window).starting_at(self.warmup_epochs)
        if isinstance(encoders, Mapping):
            self.modalities = list(encoders.keys())
        elif isinstance(encoders, (list, tuple, nn.ModuleList)):
            self.modalities = list(range(len(encoders)))
        else:
            raise TypeError(
                f"encoders: expected a list or dict of modules / name prefixes, got {type(encoders).__name__}"
            )
        if len(self.modalities) < 2:
            raise ValueError(f"encoders: expected at least two modalities, got {len(self.modalities)}")
        _, self.params, _ = resolve_modalities(encoders, model, conv_only=self.conv_only, arg="encoders")
        self.process_group = process_group
        self.seed = distributed.broadcast_seed(check_seed("seed", seed), process_group)
        self.offset = 0
        self.steps = 0
        self.modulated_steps = 0
        self.last_scores: Optional[Tensor] = None
        self.last_coeffs: Optional[Tensor] = None

    @property
    def num_modalities(self) -> int:
        """M."""
        return len(self.params)

    def active(self, epoch: int) -> bool:
        """Whether :meth:`step` modulates in ``epoch``: mode is not Normal and the epoch lies in the window."""
        return self.mode != "Normal" and self.window.contains(epoch)

    def coefficients(self, scores: Tensor) -> Tensor:
        """``[M]`` float32 coefficients from ``[M]`` scores by this object's rules (tie rule, continuous, OGM+)."""
        plus = self.plus_factor if self.ogm_plus else None
        return ogm_coefficients_torch(scores, self.alpha, self.continuous, self.journal, plus)

    def _stack_logits(self, logits: Sequence[Tensor]) -> Tensor:
        if len(logits) == 1 and isinstance(logits[0], Tensor) and logits[0].dim() == 3:
            stacked = logits[0]
            if stacked.shape[0] != self.num_modalities:
                raise ValueError(
                    f"per_modality_logits: expected {self.num_modalities} modalities, got [M, B, C] with "
                    f"M = {stacked.shape[0]}"
                )
            return stacked.detach()
        if len(logits) != self.num_modalities:
            raise ValueError(
                f"per_modality_logits: expected {self.num_modalities} tensors [B, C] (one per encoder), "
                f"got {len(logits)}"
            )
        for m, out in enumerate(logits):
            if not isinstance(out, Tensor) or out.dim() != 2:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"per_modality_logits[{m}]: expected logits [B, C], got {got}")
            if out.shape != logits[0].shape:
                raise ValueError(
                    f"per_modality_logits[{m}]: shape {tuple(out.shape)} differs from the first's "
                    f"{tuple(logits[0].shape)}"
                )
            if out.device != logits[0].device:
                raise ValueError(f"per_modality_logits[{m}]: on {out.device}, but the first is on {logits[0].device}")
        return torch.stack([out.detach().to(logits[0].dtype) for out in logits])

    def step(self, labels: Tensor, *per_modality_logits: Tensor, epoch: int) -> Tensor:
        """Modulate the gradients of this step in place; call between ``backward()`` and ``optimizer.step()``.

        Args:
            labels: ``[B]`` int64 class indices.
            *per_modality_logits: M tensors ``[B, C]`` in the order of ``encoders`` (or one stacked ``[M, B, C]``),
                e.g. from :func:`agm_fast.fusion.per_modality_logits`; treated as constants.
            epoch: the current epoch (keyword), compared with ``window`` and ``warmup_epochs``.

        Returns:
            ``[M]`` float32 coefficients on the logits' device (ones when this step does not modulate; with
            ``ogm_plus``, 1 for the dominant modalities and ``plus_factor`` for the others).
        """
        coeffs, modulate = self.decide(labels, *per_modality_logits, epoch=epoch)
        if modulate:
            grads, group = _gather_grads(self.params)
            _modulate(grads, group, coeffs.to(grads[0].device), self.mode == "OGM_GE", self.seed, self.offset - 1)
        return coeffs

    def decide(self, labels: Tensor, *per_modality_logits: Tensor, epoch: int) -> Tuple[Tensor, bool]:
        """This step's coefficients and whether it modulates, without touching any gradient (the first half of
        :meth:`step`; a modulating step takes the noise offset ``self.offset - 1``)."""
        logits = self._stack_logits(per_modality_logits)
        check_per_modality_logits(logits, "per_modality_logits")
        check_class_labels(labels, logits.shape[1], logits.shape[2], logits.device)
        modulate = self.active(epoch)
        self.steps += 1
        if not modulate:
            coeffs = torch.ones(self.num_modalities, dtype=torch.float32, device=logits.device)
            self.last_coeffs = coeffs
            return coeffs, False
        scores, coeffs = ogm_scores(logits, labels, self.alpha, self.continuous)
        if distributed.is_active(self.process_group):
            # The softmax-at-label sums of the global batch; the coefficients follow from them (M numbers).
            scores = distributed.global_sums(scores, self.process_group)
            coeffs = self.coefficients(scores)
        elif self.journal or self.ogm_plus:
            # The fused op implements the CVPR rule; the journal tie rule and OGM+ are M-element device arithmetic.
            coeffs = self.coefficients(scores)
        self.offset += 1
        self.modulated_steps += 1
        self.last_scores = scores
        self.last_coeffs = coeffs
        return coeffs, True

    def modulate_one(self, m: int, index: int, grad: Tensor, coeffs: Tensor, offset: int) -> Tensor:
        """One parameter's gradient of one micro-batch, modulated as :meth:`step` modulates it in a list where it is
        number ``index`` (its noise index) and belongs to modality ``m``; returns a new tensor."""
        if self.mode != "OGM_GE":
            return grad * coeffs[m].to(device=grad.device, dtype=grad.dtype)
        g = grad.contiguous().clone()
        # Empty tensors before it keep the noise index of the whole list (the op skips them).
        pad = g.new_empty(0)
        ogm_ge_([pad] * index + [g], [0] * index + [m], coeffs[: m + 1].to(g.device), noise=True,
                           seed=self.seed, offset=offset)
        return g

    def features_logits(self, fusion: nn.Module, features: Sequence[Tensor]) -> Tensor:
        """The per-modality logits ``[M, B, C]`` of the detached head on the features (as :meth:`step_from_features`
        uses them)."""
        if len(features) != self.num_modalities:
            raise ValueError(f"features: expected {self.num_modalities} tensors (one per encoder), got {len(features)}")
        # Features from an autocast region may be half precision; the head runs here, outside it, in its own dtype.
        param = next(fusion.parameters(), None)
        dtype = None if param is None else param.dtype
        with torch.no_grad():
            return per_modality_logits(fusion, [h.detach().to(dtype or h.dtype) for h in features])

    def step_from_features(self, labels: Tensor, fusion: nn.Module, features: Sequence[Tensor], epoch: int) -> Tensor:
        """:meth:`step` with the per-modality logits computed from the encoder features.

        The logits come from :func:`agm_fast.fusion.per_modality_logits` under ``torch.no_grad()`` (the journal's
        detached head): concat heads by slices plus ``b / M``, sum heads by ``fc_m`` with its bias, others by
        zero-out.

        Args:
            labels: ``[B]`` int64 class indices.
            fusion: the fusion head, ``fusion(*features) -> [B, C]``.
            features: M tensors ``[B, d_m]``, in the order of ``encoders``.
            epoch: the current epoch.

        Returns:
            ``[M]`` coefficients, as :meth:`step`.
        """
        return self.step(labels, self.features_logits(fusion, features), epoch=epoch)

    def state_dict(self) -> Dict[str, int]:
        """The training state: seed, noise offset and step counters (what resuming needs)."""
        return {
            "seed": self.seed,
            "offset": self.offset,
            "steps": self.steps,
            "modulated_steps": self.modulated_steps,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore :meth:`state_dict`; the next modulated step draws the noise it would have drawn."""
        missing = {"seed", "offset", "steps", "modulated_steps"} - set(state)
        if missing:
            raise KeyError(f"state: missing keys {sorted(missing)}")
        self.seed = int(state["seed"])
        self.offset = int(state["offset"])
        self.steps = int(state["steps"])
        self.modulated_steps = int(state["modulated_steps"])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}: {len(ps)} tensors" for name, ps in zip(self.modalities, self.params))
        return (
            f"OGMGE(mode={self.mode!r}, alpha={self.alpha}, window={self.window}, conv_only={self.conv_only}, "
            f"continuous={self.continuous}, journal={self.journal}, ogm_plus={self.ogm_plus}, "
            f"{sizes})"
        )
