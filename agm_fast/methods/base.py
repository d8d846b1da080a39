"""The training-step interface every balancing method implements, and the one loop that drives them.

A method is built on the model's ``encoders`` (M modules) and ``fusion`` head; a loop calls its hooks in order::

    out = method.forward(inputs, target, epoch)            # features in, logits out (OPM drops features here)
    loss = method.loss(out, target)                        # task loss (+ CGGM's direction term)
    optimizer.zero_grad(); loss.backward()
    coeffs = method.before_optimizer_step(out, target)     # modulate the gradients; [M] float32 on the device
    optimizer.step()
    method.end_epoch(epoch, {"modality_accuracy": [...], "modality_loss": [...]})   # MSLR, MSES

and, at the start and end of each epoch, ``run_epoch_passes`` (agm_fast/methods/epoch_data.py) runs the passes over
the data that a method asks for in ``epoch_passes`` (PMR's prototypes); the base class asks for none.

:func:`training_step` is those lines, written once. docs/architecture.md states the contract (hooks, window,
state) that every registered method passes.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, ClassVar, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import sharding
from .._validate import check_choice, check_int, check_seed
from ..window import Window, WindowLike
from .hparams import HParams

__all__ = ["Method", "StepOutput", "StepResult", "encode", "TASKS"]

# The version of the layout of Method.state_dict().
STATE_FORMAT = 1

TASKS = ("classification", "regression")


class StepOutput(NamedTuple):
    """What :meth:`Method.forward` returns for one training step.

    Attributes:
        logits: ``[B, C]`` the logits the loss is computed on.
        features: the M encoder features of this step (before any change the method makes to them), or None when the
            method evaluates the model itself (AGM).
        sample_weight: ``[B]`` float32 loss weights (OPM: 0 for samples whose every modality was dropped), or None.
        coeffs: ``[M]`` float32 coefficients decided in the forward (AGM's c_m, OPM's keep probabilities), or None.
        epoch: the epoch the step belongs to.
    """

    logits: Tensor
    features: Optional[List[Tensor]]
    sample_weight: Optional[Tensor]
    coeffs: Optional[Tensor]
    epoch: Optional[int]


class StepResult(NamedTuple):
    """What :func:`training_step` returns, all detached.

    Attributes:
        loss: ``[]`` the task loss (without the method's extra term).
        correct: ``[]`` how many of the trained rows the logits classify correctly.
        rows: ``[]`` how many rows the step trained on (OPM: the rows that kept a modality).
        coeffs: ``[M]`` float32 coefficients the method applied.
    """

    loss: Tensor
    correct: Tensor
    rows: Tensor
    coeffs: Tensor


def encode(encoders: Sequence[nn.Module], xs: Sequence[Tensor]) -> List[Tensor]:
    """Each encoder on its modality's input; an encoder must return one feature tensor ``[B, ...]``."""
    feats = []
    for m, (enc, x) in enumerate(zip(encoders, xs)):
        h = enc(x)
        if not isinstance(h, Tensor):
            raise TypeError(
                f"encoders[{m}]: expected a module that returns one feature tensor [B, ...], got "
                f"{type(h).__name__}; wrap it so that it returns the features only"
            )
        feats.append(h)
    return feats


class Method:
    """Base class of the balancing methods: plain joint training unless a subclass overrides a hook.

    Args:
        encoders: M >= 2 encoder modules, one per modality, in modality order.
        fusion: the fusion head, ``fusion(*features) -> [B, C]`` (an ``nn.Linear`` runs on the concatenated
            features).
        window: the modulation window (:class:`agm_fast.Window`, ``(start, end)`` inclusive epochs, or None for
            every epoch).
        seed: the seed of the method's randomness, an int in [0, 2**63).
        task: ``"classification"`` (cross-entropy on class indices) or ``"regression"`` (mean squared error).
    """

    #: The registry key (set by :func:`agm_fast.methods.register`).
    name: ClassVar[str] = ""
    #: The hyper-parameters, declared once (:func:`agm_fast.methods.hparams.declare` sets it).
    HPARAMS: ClassVar[HParams] = HParams()
    #: Whether the method has a modulation window (joint training has none).
    windowed: ClassVar[bool] = True
    #: Whether :meth:`end_epoch` needs per-modality validation metrics (MSLR, MSES).
    needs_epoch_metrics: ClassVar[bool] = False
    #: How gradient accumulation over micro-batches works (docs/training-at-scale.md, "Gradient accumulation"):
    #: ``"exact"``: the method acts in the forward, in the loss, or by a factor that is constant within an optimizer
    #: step, so the summed micro-batch gradients are already what modulating each one and summing gives;
    #: ``"hooks"``: each micro-batch's gradient is modulated as it reaches the parameters (``micro_batch_decision``,
    #: ``modulate_micro_gradient``); ``"refused"``: the maths needs the whole step's gradient.
    accumulation: ClassVar[str] = "refused"
    #: Why accumulation is refused (for the error), when it is.
    accumulation_refusal: ClassVar[str] = "its modulation needs the whole step's gradient"
    #: Fusion heads of :mod:`agm_fast.fusion` (by name) that the method cannot work with.
    unsupported_fusions: ClassVar[Tuple[str, ...]] = ()

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        fusion: nn.Module,
        *,
        window: WindowLike = None,
        seed: int = 0,
        task: str = "classification",
    ) -> None:
        if isinstance(encoders, nn.Module) and not isinstance(encoders, nn.ModuleList):
            raise TypeError("encoders: expected a list of M modules (one per modality), got a single module")
        encoders = list(encoders)
        for m, enc in enumerate(encoders):
            if not isinstance(enc, nn.Module):
                raise TypeError(f"encoders[{m}]: expected an nn.Module, got {type(enc).__name__}")
        if len(encoders) < 2:
            raise ValueError(f"encoders: expected at least two modalities, got {len(encoders)}")
        if not isinstance(fusion, nn.Module):
            raise TypeError(f"fusion: expected an nn.Module, got {type(fusion).__name__}")
        self.encoders: Tuple[nn.Module, ...] = tuple(encoders)
        self.fusion = fusion
        self.window = Window.of(window)
        self.seed = check_seed("seed", seed)
        self.task = check_choice("task", task, TASKS)
        self._first_params = [sharding.first_parameter(enc) for enc in self.encoders]
        self._last: Optional[Tuple[StepOutput, Tensor]] = None
        self._ones: Dict[torch.device, Tensor] = {}
        self._constants: Dict[torch.device, Tuple[Tuple[float, ...], Tensor]] = {}
        if not hasattr(self, "hparams_values"):
            self.hparams_values: Dict[str, Any] = {}
            self.hparams_given = frozenset()
        self.accumulation_steps = 1
        self._hooks: List[Any] = []
        self._micro_pending: Optional[Tensor] = None
        #: The coefficients of each micro-batch of the current (then last) optimizer step, under accumulation.
        self.micro_coefficients: List[Tensor] = []

    @property
    def num_modalities(self) -> int:
        """M."""
        return len(self.encoders)

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """The default of every hyper-parameter."""
        return cls.HPARAMS.defaults()

    def hyperparameters(self) -> Dict[str, Any]:
        """The value of every hyper-parameter of this instance (what a checkpoint records)."""
        return dict(getattr(self, "hparams_values", {}))

    def describe(self) -> Dict[str, Any]:
        """The method's name, window and every hyper-parameter."""
        window = None if not self.windowed else [self.window.start, self.window.end]
        return {"method": self.name, "window": window, **self.hyperparameters()}

    def in_window(self, epoch: Optional[int]) -> bool:
        """Whether ``epoch`` lies in the modulation window."""
        return self.window.contains(epoch)

    def first_active_epoch(self) -> Optional[int]:
        """The first epoch (from 0) in which the method can change training, or None if it never does (joint).

        The window's start by default; a method whose modulation needs a history first (MSLR's accuracy ratios,
        MSES's patience) starts later. Trainers say it once at the start and warn when a run ends before it.
        """
        return self.window.start if self.windowed else None

    def activity(self, epochs: Optional[int] = None) -> Optional[str]:
        """One line saying when the method starts to act (None for joint training); with ``epochs`` (the run's
        length), a warning instead when the run ends before it ever acts."""
        first = self.first_active_epoch()
        if first is None:
            return None
        name = self.name or type(self).__name__
        if epochs is not None:
            if first < epochs:
                return None
            return (f"{name} never acted: it starts at epoch {first} (counted from 0) and the run had {epochs} "
                    f"epochs, so it trained as joint training; train longer or move its window")
        return f"{name} acts from epoch {first} (counted from 0)"

    def feature_dims(self, feature_dims: Optional[Sequence[int]], required: bool = True) -> Optional[List[int]]:
        """The M feature sizes: ``feature_dims`` if given, else the fusion head's ``dims`` (every head of
        :mod:`agm_fast.fusion` has them); else None when not ``required`` (the method takes them from the first
        forward's features)."""
        dims = feature_dims if feature_dims is not None else getattr(self.fusion, "dims", None)
        if dims is None and not required:
            return None
        if dims is None:
            raise ValueError("feature_dims: expected the M feature sizes (the fusion head has no .dims), got None")
        if len(dims) != self.num_modalities:
            raise ValueError(f"feature_dims: expected {self.num_modalities} sizes (one per encoder), got {len(dims)}")
        return [check_int(f"feature_dims[{m}]", d, low=1) for m, d in enumerate(dims)]

    def check_shared_width(self, m: int, features: Tensor) -> Tensor:
        """For a head that every modality's features go through (MLA, ReconBoost): ``features`` of modality m must
        be as wide as the other modalities' (the first seen sets the width); returns them."""
        width = int(features.shape[-1])
        seen = getattr(self, "_shared_width", None)
        if seen is None:
            self._shared_width = width
        elif width != seen:
            raise ValueError(
                f"encoders[{m}]: {self.name}'s shared head reads every modality's features, expected features of "
                f"width {seen} (the other modalities'), got {width}; use encoders with equal feature sizes or pass a "
                "head= that takes them"
            )
        return features

    def constant(self, values: Sequence[float], device: torch.device) -> Tensor:
        """``values`` as an ``[M]`` float32 tensor on ``device``, built once per new value (coefficients that change
        per epoch, not per step, so no step copies host data to the device)."""
        key = tuple(float(v) for v in values)
        cached = self._constants.get(device)
        if cached is None or cached[0] != key:
            cached = self._constants[device] = (key, torch.tensor(key, dtype=torch.float32).to(device))
        return cached[1]

    def ones(self, device: torch.device) -> Tensor:
        """``[M]`` float32 ones on ``device`` (the coefficients of a step that does not modulate)."""
        t = self._ones.get(device)
        if t is None:
            t = self._ones[device] = torch.ones(self.num_modalities, dtype=torch.float32, device=device)
        return t

    def encode(self, inputs: Sequence[Tensor]) -> List[Tensor]:
        """Run each encoder on its modality's input; returns the M features."""
        if len(inputs) != self.num_modalities:
            raise ValueError(
                f"inputs: expected {self.num_modalities} tensors (one per modality, in modality order), got "
                f"{len(inputs)}"
            )
        return encode(self.encoders, inputs)

    def head(self, features: Sequence[Tensor]) -> Tensor:
        """The fusion head on M features (an ``nn.Linear`` on their concatenation)."""
        if isinstance(self.fusion, nn.Linear):
            return self.fusion(torch.cat(list(features), dim=1))
        return self.fusion(*features)

    def forward(self, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int]) -> StepOutput:
        """The training forward of one step: encoders, then the fusion head.

        Args:
            inputs: M tensors ``[B, ...]``, one per modality.
            target: ``[B]`` int64 class indices (regression: float targets).
            epoch: the current epoch (from 0), compared with the window.

        Returns:
            :class:`StepOutput`.
        """
        self.in_window(epoch)
        feats = self.encode(inputs)
        out = StepOutput(self.head(feats), feats, None, None, epoch)
        self._set_last(out, target)
        return out

    def _set_last(self, out: StepOutput, target: Tensor) -> None:
        """Record the step's forward (a new micro-batch: its modulation is still to be decided)."""
        self._last = (out, target)
        self._micro_pending = None

    @property
    def accumulating(self) -> bool:
        """Whether micro-batch gradients are modulated one by one (``set_accumulation(k)`` with k > 1 and hooks)."""
        return bool(self._hooks)

    def set_accumulation(self, steps: int) -> None:
        """Declare that each optimizer step sums the gradients of ``steps`` micro-batches (one ``forward``, loss and
        ``backward`` each), so that every micro-batch is modulated with its own coefficients, as if each were
        modulated alone and the results summed. The trainer integrations call it from their own setting.

        Args:
            steps: micro-batches per optimizer step, >= 1 (1: no accumulation).

        Raises:
            ValueError: the method cannot split its modulation over micro-batches (``accumulation == "refused"``).
        """
        steps = check_int("steps", steps, low=1)
        if steps > 1 and self.accumulation == "refused":
            raise ValueError(
                f"steps: {self.name or type(self).__name__} cannot modulate micro-batches one by one "
                f"({self.accumulation_refusal}); expected 1 (no gradient accumulation), got {steps}"
            )
        if steps > 1 and self.accumulation == "hooks":
            if any(sharding.is_sharded(p) for ps in self.modulated_parameters() for p in ps):
                # FSDP2 computes the gradients on gathered copies and writes the shards' .grad itself: a hook
                # registered on a sharded parameter is never called, so its gradients would not be modulated.
                raise ValueError(
                    f"steps: {self.name or type(self).__name__} modulates micro-batches by gradient hooks, which "
                    f"FSDP2-sharded parameters never call; expected 1 (no gradient accumulation) under FSDP2, got "
                    f"{steps}"
                )
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.accumulation_steps = steps
        self.micro_coefficients = []
        if steps > 1 and self.accumulation == "hooks":
            index = 0
            for m, params in enumerate(self.modulated_parameters()):
                for p in params:
                    if p.requires_grad:
                        self._hooks.append(p.register_hook(functools.partial(self._micro_hook, m, index)))
                    index += 1

    def modulated_parameters(self) -> List[List[Tensor]]:
        """The parameters whose gradients the method modulates, per modality (``"hooks"`` methods)."""
        return [[p for p in enc.parameters()] for enc in self.encoders]

    def micro_batch_decision(self, out: StepOutput, target: Tensor) -> Tensor:
        """``"hooks"`` methods: this micro-batch's ``[M]`` coefficients (and whatever the gradient hooks need),
        decided from its forward before its backward."""
        raise NotImplementedError

    def modulate_micro_gradient(self, m: int, index: int, grad: Tensor, coeffs: Tensor) -> Tensor:
        """``"hooks"`` methods: modality ``m``'s parameter number ``index`` receives ``grad`` from this micro-batch's
        backward; returns what is accumulated instead."""
        raise NotImplementedError

    def prepare_backward(self, out: StepOutput, target: Tensor) -> None:
        """Decide this micro-batch's modulation before its backward (a no-op without accumulation). :meth:`loss` and
        :func:`training_step` call it; a gradient hook calls it too if nothing did."""
        if self.accumulating and self._micro_pending is None:
            self._micro_pending = self.micro_batch_decision(out, target)
            self.micro_coefficients.append(self._micro_pending.detach().to(torch.float32))

    def _micro_hook(self, m: int, index: int, grad: Tensor) -> Tensor:
        if self._micro_pending is None:
            out, target = self._resolve(None, None)
            self.prepare_backward(out, target)
        return self.modulate_micro_gradient(m, index, grad, self._micro_pending)

    def finish_accumulated_step(self) -> Tensor:
        """Under accumulation, the end of an optimizer step: the mean of its micro-batches' coefficients."""
        coeffs = torch.stack(self.micro_coefficients).mean(0) if self.micro_coefficients else None
        self.micro_coefficients = []
        return coeffs

    def task_loss(self, out: StepOutput, target: Tensor) -> Tensor:
        """The task loss of the step: cross-entropy (regression: MSE), averaged over the weighted samples."""
        if self.task == "regression":
            return F.mse_loss(out.logits, target.to(out.logits.dtype).reshape(out.logits.shape))
        if out.sample_weight is None:
            return F.cross_entropy(out.logits, target)
        ce = F.cross_entropy(out.logits, target, reduction="none")
        w = out.sample_weight.to(ce.dtype)
        return (ce * w).sum() / w.sum().clamp(min=1)

    def loss_term(self, task_loss: Tensor, out: StepOutput) -> Optional[Tensor]:
        """An extra loss term to add to the task loss (CGGM's direction term), or None."""
        return None

    def loss(self, out: StepOutput, target: Tensor) -> Tensor:
        """The loss to back-propagate: the task loss plus :meth:`loss_term` (under accumulation it also decides this
        micro-batch's modulation, :meth:`prepare_backward`)."""
        task = self.task_loss(out, target)
        term = self.loss_term(task, out)
        self.prepare_backward(out, target)
        return task if term is None else task + term

    def _resolve(self, out: Optional[StepOutput], target: Optional[Tensor]) -> Tuple[StepOutput, Tensor]:
        for m, (enc, first) in enumerate(zip(self.encoders, self._first_params)):
            if sharding.first_parameter(enc) is not first:
                # fully_shard (or any re-registration) replaced the parameters the method selected at construction:
                # their gradients would never be modulated.
                raise RuntimeError(
                    f"encoders[{m}]: its parameters were replaced after the method was built (fully_shard?); build "
                    "the method after sharding the model"
                )
        if out is None or target is None:
            if self._last is None:
                raise RuntimeError("before_optimizer_step: no step to modulate; call forward() first")
            last_out, last_target = self._last
            out = last_out if out is None else out
            target = last_target if target is None else target
        return out, target

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Modulate the gradients in place, between ``loss.backward()`` (after AMP unscaling) and the step.

        Args:
            out: this step's :class:`StepOutput` (default: the last :meth:`forward`'s).
            target: this step's targets (default: the last :meth:`forward`'s).

        Returns:
            ``[M]`` float32 coefficients on the targets' device.
        """
        out, target = self._resolve(out, target)
        return out.coeffs if out.coeffs is not None else self.ones(target.device)

    def end_epoch(self, epoch: int, metrics: Optional[Mapping[str, Sequence[float]]] = None) -> None:
        """End of an epoch with the validation metrics: ``"modality_accuracy"`` and ``"modality_loss"``, M floats
        each (MSLR follows the accuracies, MSES the losses; the others ignore them). Every method checks them
        (:meth:`check_epoch_metrics`) before it acts, so a wrong shape is an error for every method alike."""
        self.check_epoch_metrics(epoch, metrics)

    def check_epoch_metrics(self, epoch, metrics) -> None:
        """Raise a clear error for an ``end_epoch`` call with a bad epoch or metrics: ``epoch`` an int >= 0;
        ``metrics`` None or a mapping whose ``"modality_accuracy"`` / ``"modality_loss"`` (when present) hold M real
        numbers (a sequence or a 1-D tensor); methods that follow them (:attr:`needs_epoch_metrics`) need them."""
        check_int("epoch", epoch, low=0)
        if metrics is None:
            if self.needs_epoch_metrics:
                raise TypeError(f"metrics: {self.name} follows per-modality validation metrics, expected a mapping "
                                "with 'modality_accuracy' and 'modality_loss', got None")
            return
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics: expected a mapping such as {{'modality_accuracy': [M floats], "
                            f"'modality_loss': [M floats]}}, got {type(metrics).__name__}")
        M = self.num_modalities
        for key in ("modality_accuracy", "modality_loss"):
            if key not in metrics:
                continue
            values = metrics[key]
            if isinstance(values, Tensor):
                values = values.detach().reshape(-1).tolist() if values.dim() == 1 else values
            if isinstance(values, (str, bytes, Tensor)) or not isinstance(values, Sequence):
                raise TypeError(f"metrics[{key!r}]: expected a sequence of {M} numbers (one per modality), got "
                                f"{type(values).__name__}")
            if len(values) != M or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
                raise ValueError(f"metrics[{key!r}]: expected {M} numbers (one per modality), got {list(values)!r}")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("end_epoch")
        if own is not None and not getattr(own, "_checks_metrics", False):
            @functools.wraps(own)
            def end_epoch(self, epoch, metrics=None, *args, **kw):
                self.check_epoch_metrics(epoch, metrics)
                return own(self, epoch, metrics, *args, **kw)

            end_epoch._checks_metrics = True
            cls.end_epoch = end_epoch

    # --- Epoch passes with data (agm_fast/methods/epoch_data.py). The defaults ask for nothing and do nothing. ---

    def epoch_passes(self, epoch: int) -> Sequence[Any]:
        """The passes over the data the method asks for in ``epoch``: :class:`~agm_fast.methods.epoch_data.EpochPass`
        requests (split, start or end, fraction of the batches); none by default. The same on every rank."""
        return ()

    def begin_pass(self, request: Any, epoch: int, device: torch.device) -> Dict[str, Tensor]:
        """The zero sums a pass starts from (every key :meth:`pass_batch` returns, so that a rank with no batches
        still takes part in the reduction)."""
        return {}

    def pass_batch(self, request: Any, batch: Any) -> Optional[Dict[str, Tensor]]:
        """One :class:`~agm_fast.methods.epoch_data.PassBatch` of a pass (no gradients): the sums it adds."""
        return None

    def finish_pass(self, request: Any, epoch: int, sums: Dict[str, Tensor], process_group: Any = None) -> None:
        """The end of a pass, with its sums over every batch and rank; may change parameters (under no_grad)."""
        return None

    # --- end of the epoch passes ---

    def decisions(self) -> Dict[str, Tensor]:
        """What the last step decided, beyond its coefficients, for logging (detached tensors on the device: e.g.
        MMPareto's per-encoder cosines and weights); empty by default. Each method documents its keys."""
        return {}

    def modules(self) -> List[nn.Module]:
        """The method's own modules (AGM's state, OPM, CGGM's heads), not the model's."""
        return []

    def to(self, device) -> "Method":
        """Move the method's own modules and state to ``device`` (the model is the trainer's to move)."""
        for module in self.modules():
            module.to(device)
        return self

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """Optimizer param groups of the method's own trainable parameters (none by default).

        Args:
            lr: the main learning rate.
        """
        return []

    def method_state(self) -> Dict[str, Any]:
        """The method's own training state (what a subclass keeps; none by default)."""
        return {}

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`method_state`."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        """The method's training state (not the model's weights), with M and the hyper-parameters it was taken
        under."""
        return {
            "format": STATE_FORMAT,
            "method": self.name,
            "num_modalities": self.num_modalities,
            "hparams": self.hyperparameters(),
            "state": self.method_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the state was taken with another number of modalities.

        A hyper-parameter that differs from the state's is kept as this instance has it, with one warning that
        names each difference.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected the dict of Method.state_dict(), got {type(state).__name__}")
        if "format" not in state:
            # A state saved before the hyper-parameters were recorded: the method's own state alone.
            self.load_method_state(state)
            return
        M = int(state["num_modalities"])
        if M != self.num_modalities:
            raise ValueError(
                f"state: taken with {M} modalities, expected {self.num_modalities} (the encoders of this method)"
            )
        saved, mine = dict(state.get("hparams", {})), self.hyperparameters()
        diff = [f"{k}={saved[k]!r} in the state, {mine[k]!r} here" for k in mine if k in saved and saved[k] != mine[k]]
        if diff:
            warnings.warn(f"state: hyper-parameters differ from this method's: {'; '.join(diff)}", stacklevel=2)
        self.load_method_state(state["state"])

    def _metric(self, metrics: Mapping[str, Sequence[float]], key: str) -> List[float]:
        if key not in metrics:
            raise KeyError(f"metrics: expected a {key!r} entry (M floats) for {self.name}, got keys {sorted(metrics)}")
        return [float(v) for v in metrics[key]]

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "method")
        return f"{type(self).__name__}({params})"

    # ---- A method-owned step (agm_fast.methods.owned_step): the defaults change nothing. ----

    #: Whether the method runs the forward, backward and optimizer steps of a batch itself (:meth:`train_step`).
    owns_step: ClassVar[bool] = False

    def train_step(self, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int], steps: Any, *,
                   progress: Optional[float] = None) -> StepResult:
        """The whole training step of one batch, for a method with ``owns_step = True``: its own sequence of forwards
        and of sub-steps, each run by ``steps.run(loss, before_step)`` (:class:`agm_fast.methods.owned_step.SubSteps`).

        Args:
            inputs: M tensors ``[B, ...]``.
            target: ``[B]`` targets.
            epoch: the current epoch.
            steps: the :class:`~agm_fast.methods.owned_step.SubSteps` of the trainer.
            progress: the fraction of the epoch done before this batch, in [0, 1], or None when the trainer does not
                know it.

        Returns:
            :class:`StepResult` (detached), as :func:`training_step` returns it.
        """
        raise NotImplementedError(f"{self.name or type(self).__name__} does not own its step (owns_step is False); "
                                  "train it with agm_fast.methods.training_step")

    def predict(self, inputs: Sequence[Tensor]) -> Tensor:
        """The test-time logits ``[B, C]``: the fusion head on the encoders' features, unless the method has its own
        rule (MLA's entropy-weighted unimodal outputs)."""
        return self.head(self.encode(inputs))

    # ---- End of the method-owned step. ----

