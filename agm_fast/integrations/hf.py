"""Hugging Face ``Trainer`` integration: :class:`BalancedModel` (the method's forward inside the model's),
:class:`BalancingCallback` (modulates in ``on_pre_optimizer_step`` and keeps the method's state in checkpoints) and
:class:`BalancedTrainer` (modulates before clipping, and trains the method's own parameters).

::

    method = agm_fast.methods.create("agm", encoders=[enc_a, enc_v], fusion=head, alpha=1.5)
    trainer = BalancedTrainer(method=method, args=TrainingArguments(output_dir="out", max_grad_norm=1.0),
                              train_dataset=dataset, data_collator=collate)
    trainer.train()

A batch is a dict ``{"inputs": [x_0, ..., x_{M-1}], "labels": y}`` (:func:`collate` builds it). What is exact where
(clipping order, fp16 scaling, DDP, FSDP) is in docs/training-at-scale.md.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..methods import Method, owned_step
from ..methods.epoch_data import run_epoch_passes
from ..validation import modality_metrics
from . import missing

try:
    from transformers import Trainer, TrainerCallback
except ImportError:
    raise missing("transformers", "hf") from None

__all__ = ["BalancedModel", "BalancedTrainer", "BalancingCallback", "STATE_FILE", "collate"]

# The method's state, in every checkpoint-N folder the Trainer writes.
STATE_FILE = "agm_fast_method.pt"


def collate(samples: Sequence[Sequence[Tensor]]) -> Dict[str, Any]:
    """``{"inputs": [x_0, ..., x_{M-1}], "labels": y}`` from samples ``(x_0, ..., x_{M-1}, y)``."""
    if not samples:
        raise ValueError("samples: expected at least one sample, got none")
    columns = list(zip(*samples))
    if len(columns) < 3:
        raise ValueError(f"samples: expected (x_0, ..., x_(M-1), y) with M >= 2, got {len(columns)} fields")
    stacked = [torch.stack([torch.as_tensor(v) for v in col]) for col in columns]
    return {"inputs": stacked[:-1], "labels": stacked[-1]}


class BalancedModel(nn.Module):
    """The model the Trainer trains: ``method``'s encoders and fusion head, with the method's forward and loss.

    ``forward(inputs, labels)`` returns ``{"loss", "logits"}`` in training; without labels (or in eval mode) the fused
    logits of a plain forward. ``epoch`` is set by the callback at every epoch start.

    Args:
        method: the method.
    """

    def __init__(self, method: Method) -> None:
        super().__init__()
        if not isinstance(method, Method):
            raise TypeError(f"method: expected an agm_fast.methods.Method, got {type(method).__name__}")
        self.method = method
        self.encoders = nn.ModuleList(method.encoders)
        self.fusion = method.fusion
        # The method's own trainable parameters (CGGM's heads, AGM's learned baselines) are part of the model: the
        # Trainer zeroes their gradients, moves them, and saves and restores them with the model's weights. The rest
        # of the method's state goes to STATE_FILE beside each checkpoint.
        self.method_parameters = nn.ParameterList([p for g in method.param_groups(1.0) for p in g["params"]])
        self.epoch = 0

    def train(self, mode: bool = True):
        # A method that owns its step predicts with its own modules (a shared head): they follow train / eval too.
        super().train(mode)
        method = getattr(self, "method", None)
        if method is not None and method.owns_step:
            for module in method.modules():
                module.train(mode)
        return self

    # The loss is a mean over the micro-batch: the Trainer scales it for gradient accumulation (and nothing else).
    accepts_loss_kwargs = False

    def forward(self, inputs: List[Tensor], labels: Optional[Tensor] = None, **unused: Any):
        if labels is None or not self.training:
            logits = self.method.predict(list(inputs))
            if labels is None:
                return {"logits": logits}
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}
        if self.method.owns_step:
            raise RuntimeError(f"{self.method.name} runs its own optimizer steps: train it with BalancedTrainer, whose "
                               "training_step calls method.train_step")
        out = self.method.forward(list(inputs), labels, self.epoch)
        return {"loss": self.method.loss(out, labels), "logits": out.logits}


def _method_of(model: nn.Module) -> Method:
    inner = getattr(model, "module", model)
    method = getattr(inner, "method", None)
    if not isinstance(method, Method):
        raise TypeError("model: expected an agm_fast.integrations.hf.BalancedModel (or a model with .method)")
    return method


class BalancingCallback(TrainerCallback):
    """Modulates the gradients in ``on_pre_optimizer_step``, sets the epoch, and saves / restores the method's state
    with the Trainer's checkpoints.

    Args:
        method: the method of the model being trained.
        metrics: optional ``metrics(epoch) -> {"modality_accuracy": [...], "modality_loss": [...]}`` for methods that
            follow per-modality validation metrics (MSLR, MSES). Default: :func:`agm_fast.validation.
            modality_metrics` on the validation dataloader (the Trainer's ``eval_dataset``) at each epoch end.

    Logging: :meth:`log_entries` gives ``coeff_<m>`` (each modality's coefficient, averaged over the optimizer steps
    since the last log) and, after an epoch end, ``val_acc_<m>`` and ``val_loss_<m>``; :class:`BalancedTrainer` adds
    them to every ``log`` call, so they reach the Trainer's loggers (``report_to``) and ``state.log_history``.

    Attributes:
        coefficients: the ``[M]`` coefficients of every optimizer step (detached).
        modulated_step: the global step whose gradients were last modulated (:class:`BalancedTrainer` modulates
            before clipping and sets it, so that this callback does not modulate the same step again).
        eval_loader: a zero-argument callable that gives the validation dataloader for the method's epoch passes
            when the Trainer has not built one yet (:class:`BalancedTrainer` sets it).
        pass_times: ``(epoch, pass seconds, epoch seconds)`` of each epoch in which the method's epoch passes ran.
    """

    def __init__(self, method: Method, metrics=None) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method: expected an agm_fast.methods.Method, got {type(method).__name__}")
        if metrics is not None and not callable(metrics):
            raise TypeError(f"metrics: expected a callable epoch -> per-modality metrics, or None, got "
                            f"{type(metrics).__name__}")
        self.method = method
        self.metrics = metrics
        self.coefficients: List[Tensor] = []
        self.modulated_step = -1
        #: The checkpoint folder the run resumes from (set by :class:`BalancedTrainer`; None: ``output_dir``'s).
        self.resume_from: Optional[str] = None
        #: Whether the trainer modulates before clipping itself (:class:`BalancedTrainer`).
        self.modulates_before_clipping = False
        self.eval_loader = None
        self.pass_times: List[tuple] = []
        self._epoch_clock = (0.0, 0.0)
        self._logged = 0
        self._epoch_metrics: Optional[Dict[str, List[float]]] = None

    def log_entries(self) -> Dict[str, float]:
        """Per-modality entries for the next log: ``coeff_<m>`` (mean over the steps since the last call) and the
        last epoch's ``val_acc_<m>`` / ``val_loss_<m>`` (once)."""
        out: Dict[str, float] = {}
        recent = self.coefficients[self._logged:]
        self._logged = len(self.coefficients)
        if recent:
            for m, c in enumerate(torch.stack(recent).float().mean(0).tolist()):
                out[f"coeff_{m}"] = c
        if self._epoch_metrics is not None:
            for key, name in (("modality_accuracy", "val_acc"), ("modality_loss", "val_loss")):
                for m, v in enumerate(self._epoch_metrics.get(key, ())):
                    out[f"{name}_{m}"] = float(v)
            self._epoch_metrics = None
        return out

    def _validation_loader(self, kwargs):
        loader = kwargs.get("eval_dataloader")
        return loader if loader is not None or self.eval_loader is None else self.eval_loader()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.method.owns_step:
            if not self.modulates_before_clipping:
                raise TypeError(f"trainer: {self.method.name} runs its own optimizer steps, expected "
                                "agm_fast.integrations.hf.BalancedTrainer (its training_step calls method.train_step), "
                                "got a Trainer with BalancingCallback")
            if args.fp16:
                raise ValueError(f"fp16: {self.method.name} steps the optimizer several times per batch and the "
                                 "Trainer's own step then finds no gradient, which the fp16 grad scaler refuses; "
                                 "expected bf16 or float32, got fp16=True")
        if model is not None:
            self.method.to(next(model.parameters()).device)
        self.method.set_accumulation(args.gradient_accumulation_steps)
        starts = self.method.activity()
        if starts is not None and state.is_world_process_zero:
            print(f"agm_fast: {starts}")
        if not self.modulates_before_clipping and args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"max_grad_norm: the stock Trainer clips the gradients before on_pre_optimizer_step, so "
                f"BalancingCallback modulates clipped gradients (the reference loops modulate, then clip); use "
                f"agm_fast.integrations.hf.BalancedTrainer, or max_grad_norm=0, got {args.max_grad_norm}",
                stacklevel=2,
            )
        # A resumed run: the Trainer has restored its state, so the step names the checkpoint it resumed from.
        if state.global_step > 0:
            folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, STATE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"resume_from_checkpoint: no {STATE_FILE} in {folder}, so the method's state (running means, "
                    "noise offsets, heads) cannot be restored; resume from a checkpoint written with "
                    "BalancingCallback"
                )
            self.method.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def on_train_end(self, args, state, control, **kwargs):
        never = self.method.activity(int(round(state.epoch or 0)))
        if never is not None and state.is_world_process_zero:
            warnings.warn(never, stacklevel=2)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            getattr(model, "module", model).epoch = int(state.epoch or 0)
        t0 = time.perf_counter()
        self._epoch_clock = (self._epoch_passes(int(state.epoch or 0), "start", model, kwargs), t0)

    # Epoch passes with data (agm_fast/methods/epoch_data.py), over the Trainer's own (sharded) dataloaders.
    def _epoch_passes(self, epoch: int, when: str, model, kwargs) -> float:
        def val():
            return self._validation_loader(kwargs)

        device = None if model is None else next(model.parameters()).device
        report = run_epoch_passes(self.method, epoch, when, lambda: kwargs.get("train_dataloader"), val,
                                  device=device)
        return 0.0 if report is None else report.seconds

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.modulate(state.global_step)

    def modulate(self, step: int) -> None:
        """Modulate the gradients of optimizer step ``step`` (once; not for a method that owns its step)."""
        if self.modulated_step != step and not self.method.owns_step:
            self.coefficients.append(self.method.before_optimizer_step().detach())
            self.modulated_step = step

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = int(round(state.epoch or 0)) - 1
        if self.metrics is not None:
            metrics = self.metrics(epoch)
        elif self.method.needs_epoch_metrics:
            loader = self._validation_loader(kwargs)
            if loader is None:
                raise TypeError(
                    f"metrics: {self.method.name} follows per-modality validation metrics; give the Trainer an "
                    "eval_dataset (BalancedTrainer computes them from it) or pass metrics=, got neither"
                )
            device = None if model is None else next(model.parameters()).device
            metrics = modality_metrics(self.method, loader, device=device)
        else:
            metrics = None
        if metrics is not None:
            self._epoch_metrics = {k: list(metrics[k]) for k in ("modality_accuracy", "modality_loss") if k in metrics}
            self.method.end_epoch(epoch, metrics)
        end = self._epoch_passes(epoch, "end", model, kwargs)
        start_s, t0 = self._epoch_clock
        if start_s or end:
            self.pass_times.append((epoch, start_s + end, time.perf_counter() - t0 + start_s))

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.method.state_dict(), os.path.join(folder, STATE_FILE))


class BalancedTrainer(Trainer):
    """A ``Trainer`` that trains a :class:`BalancedModel` and modulates the gradients after AMP unscaling and before
    gradient clipping; a method that owns its step (MLA) runs its sub-steps in :meth:`training_step`
    (docs/owned-step.md).

    Args:
        method: the method; the model (a :class:`BalancedModel`) is built from it unless ``model`` is given.
        metrics: as :class:`BalancingCallback`.
        **kwargs: the ``Trainer``'s arguments.
    """

    def __init__(self, method: Method, metrics=None, model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if method.needs_epoch_metrics and metrics is None and kwargs.get("eval_dataset") is None:
            raise TypeError(
                f"metrics: {method.name} follows per-modality validation metrics; pass eval_dataset= (they are "
                "computed from it at each epoch end) or metrics=, got neither"
            )
        model = BalancedModel(method) if model is None else model
        self.balancing = BalancingCallback(method, metrics=metrics)
        self.balancing.modulates_before_clipping = True
        self.balancing.eval_loader = lambda: None if self.eval_dataset is None else self.get_eval_dataloader()
        callbacks = [self.balancing] + list(kwargs.pop("callbacks", None) or [])
        super().__init__(model=model, callbacks=callbacks, **kwargs)
        kind = str(getattr(self.accelerator, "distributed_type", ""))
        if "FSDP" in kind or "DEEPSPEED" in kind:
            raise NotImplementedError(
                f"BalancedTrainer: {kind} shards the gradients, and agm_fast's methods need each parameter's whole "
                "gradient; train with DDP (or one device)"
            )

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        """``Trainer.train``; the method's state is read from the checkpoint the run resumes from, wherever it is."""
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)
        self.balancing.resume_from = folder if isinstance(folder, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with the method's per-modality entries added (:meth:`BalancingCallback.log_entries`)."""
        if "loss" in logs or "eval_loss" not in logs:
            logs = {**logs, **self.balancing.log_entries()}
        return super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; for a method that owns its step, the method's sub-steps (each clipped to
        ``max_grad_norm``), after which every gradient is cleared so that the Trainer's own optimizer step changes
        nothing (its scheduler still steps once per batch)."""
        method = self.balancing.method
        if not method.owns_step:
            return super().training_step(model, inputs, num_items_in_batch)
        # Under DDP the sub-steps run the method's modules, not DDP's forward, so DDP's reducer never expects a
        # backward; SubSteps averages each sub-step's gradients over DDP's group instead.
        owned_step.check_trainer(method, world_size=self.args.world_size, where="BalancedTrainer", model=model)
        model.train()
        inputs = self._prepare_inputs(inputs)
        norm = self.args.max_grad_norm
        clip = (lambda params: self.accelerator.clip_grad_norm_(params, norm)) if norm and norm > 0 else None
        steps = owned_step.SubSteps(self.optimizer, backward=self.accelerator.backward, clip=clip,
                                    process_group=owned_step.data_parallel_group(model))
        epoch = float(self.state.epoch or 0.0)
        res = owned_step.run(method, list(inputs["inputs"]), inputs["labels"], int(epoch), steps,
                             progress=min(max(epoch - int(epoch), 0.0), 1.0))
        owned_step.release(steps)
        self.balancing.coefficients.append(res.coeffs)
        return res.loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer over the model, plus the method's own parameter groups (CGGM's heads at their
        scaled learning rate, without weight decay)."""
        if self.optimizer is None:
            model = self.model if model is None else model
            extra = self.balancing.method.param_groups(self.args.learning_rate)
            own = {id(p) for group in extra for p in group["params"]}
            params = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            groups = [{"params": params, "weight_decay": self.args.weight_decay}] + extra
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _clip_grad_norm(self, model):
        # Modulate first and clip the modulated gradients, as the reference loops do. With an fp16 grad scaler the
        # gradients are only unscaled inside the clipping, so there the callback modulates right after it.
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            self.balancing.modulate(self.state.global_step)
        return super()._clip_grad_norm(model)
