"""PyTorch Lightning integration: a Callback that drives any agm_fast method, and a LightningModule whose training
step is the method's.

::

    method = agm_fast.methods.create("ogm_ge", encoders=[enc_a, enc_v], fusion=head, alpha=0.8)
    module = BalancedModule(method, lr=0.05, momentum=0.9)          # adds its BalancingCallback itself
    lightning.Trainer(max_epochs=30, precision="bf16-mixed").fit(module, train_loader, val_loader)

Batches are ``(x_0, ..., x_{M-1}, y)`` tuples or ``{"inputs": [...], "labels": y}`` dicts. The gradients are modulated
in ``on_before_optimizer_step`` (after AMP unscaling, before clipping); the method's state is saved in Lightning's
checkpoints. A LightningModule of your own works too: call ``self.method.forward`` and ``self.method.loss`` in its
``training_step`` and pass ``BalancingCallback(method)`` to the Trainer. docs/training-at-scale.md says what is exact
where.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..methods import Method, owned_step
from ..methods.epoch_data import run_epoch_passes
from ..validation import metrics_from_sums, modality_sums, split_batch
from . import missing

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise missing("lightning", "lightning") from None

__all__ = ["BalancedModule", "BalancingCallback", "split_batch"]


class BalancingCallback(pl.Callback):
    """Modulates the gradients with ``method.before_optimizer_step()`` and keeps the method's state in checkpoints.

    Args:
        method: the :class:`agm_fast.methods.Method` whose ``forward`` the LightningModule's ``training_step`` calls.

    Attributes:
        coefficients: the ``[M]`` coefficients of every optimizer step of the current fit (detached, on the device).
        pass_times: ``(epoch, pass seconds, epoch seconds)`` of each epoch in which the method's epoch passes ran
            (over the trainer's own train / val dataloaders; the fraction is logged as ``epoch_pass_fraction``).
    """

    def __init__(self, method: Method) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method: expected an agm_fast.methods.Method, got {type(method).__name__}")
        self.method = method
        self.coefficients: List[Tensor] = []
        self._kept: Optional[List[Optional[Tensor]]] = None
        self.pass_times: List[Tuple[int, float, float]] = []
        self._epoch_clock = (0.0, 0.0)

    @property
    def state_key(self) -> str:
        return f"BalancingCallback[{self.method.name or type(self.method).__name__}]"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.method.needs_epoch_metrics and not callable(getattr(pl_module, "modality_metrics", None)):
            raise TypeError(
                f"pl_module: expected a modality_metrics() method for {self.method.name} (it follows per-modality "
                "validation metrics), got a LightningModule without one; use BalancedModule or define it"
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.method.owns_step:
            # The method runs its own optimizer steps inside training_step (Lightning's manual optimisation).
            if pl_module.automatic_optimization:
                raise TypeError(f"pl_module: {self.method.name} runs its own optimizer steps, expected a "
                                "LightningModule with automatic_optimization = False that calls method.train_step "
                                "(BalancedModule does), got automatic optimisation")
            owned_step.check_trainer(self.method, world_size=trainer.world_size, where="Trainer",
                                     model=trainer.strategy.model)
        self.method.to(pl_module.device)
        # Each micro-batch of an accumulated step is modulated with its own coefficients.
        self.method.set_accumulation(trainer.accumulate_grad_batches)
        starts = self.method.activity()
        if starts is not None and trainer.is_global_zero:
            print(f"agm_fast: {starts}")

    def on_fit_end(self, trainer, pl_module) -> None:
        never = self.method.activity(trainer.current_epoch)
        if never is not None and trainer.is_global_zero:
            warnings.warn(never, stacklevel=2)

    # Under accumulation a method may compute its own parameters' gradients in the forward (CGGM trains its heads
    # when it decides a micro-batch's coefficients), but Lightning zeroes the gradients of a step's first micro-batch
    # after its training_step. Those gradients are zeroed at the batch start instead and kept across that zero_grad.
    def _own_parameters(self) -> List[Tensor]:
        return [p for group in self.method.param_groups(1.0) for p in group["params"]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._kept = None
        if self.method.accumulating and batch_idx % trainer.accumulate_grad_batches == 0:
            for p in self._own_parameters():
                p.grad = None

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        if self.method.accumulating:
            self._kept = [None if p.grad is None else p.grad.clone() for p in self._own_parameters()]

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._kept is not None:
            for p, grad in zip(self._own_parameters(), self._kept):
                p.grad = grad
            self._kept = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.method.owns_step:  # a sub-step of the method's own step: BalancedModule records its coefficients
            return
        coeffs = self.method.before_optimizer_step().detach()
        self.coefficients.append(coeffs)
        # Through the trainer's loggers: each modality's coefficient, averaged over the epoch's steps.
        for m, c in enumerate(coeffs.float().unbind(0)):
            pl_module.log(f"coeff_{m}", c, on_step=False, on_epoch=True, batch_size=1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        fn = getattr(pl_module, "modality_metrics", None)
        metrics = fn() if callable(fn) else None
        if metrics:
            self.method.end_epoch(trainer.current_epoch, metrics)
        end = self._epoch_passes(trainer, pl_module, "end")
        start_s, t0 = self._epoch_clock
        if start_s or end:
            pass_s = start_s + end
            self.pass_times.append((trainer.current_epoch, pass_s, time.perf_counter() - t0 + start_s))
            pl_module.log("epoch_pass_fraction", pass_s / max(self.pass_times[-1][2], 1e-12), on_epoch=True)

    # Epoch passes with data (agm_fast/methods/epoch_data.py), over the trainer's own (sharded) dataloaders.
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        self._epoch_clock = (self._epoch_passes(trainer, pl_module, "start"), t0)

    def _epoch_passes(self, trainer, pl_module, when: str) -> float:
        def val():
            loaders = trainer.val_dataloaders
            if loaders is None and trainer.fit_loop.epoch_loop.val_loop is not None:
                trainer.fit_loop.epoch_loop.val_loop.setup_data()  # before the first validation of the fit
                loaders = trainer.val_dataloaders
            return loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders

        report = run_epoch_passes(self.method, trainer.current_epoch, when, lambda: trainer.train_dataloader, val,
                                  device=pl_module.device)
        return 0.0 if report is None else report.seconds

    def state_dict(self) -> Dict[str, Any]:
        return {"method": self.method.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.method.load_state_dict(state_dict["method"])


class BalancedModule(pl.LightningModule):
    """A LightningModule that trains ``method``'s encoders and fusion head with the method's training step.

    ``training_step`` runs ``method.forward`` (AGM evaluates its subsets there, OPM drops features there) and
    ``method.loss``; the :class:`BalancingCallback` it returns from ``configure_callbacks`` modulates the gradients.
    ``validation_step`` records the fused accuracy and loss and, per modality, the accuracy and cross-entropy of the
    Shapley outputs (:mod:`agm_fast.validation`, the one definition the CLI uses too), logged as ``val_acc``,
    ``val_loss``, ``val_acc_<m>`` and ``val_loss_<m>``; ``modality_metrics`` hands them to ``method.end_epoch``
    (MSLR and MSES follow them). The callback logs each modality's coefficient as ``coeff_<m>`` (epoch mean).
    A method that owns its step (MLA) is trained with manual optimisation through ``method.train_step`` and evaluated
    with ``method.predict`` (docs/owned-step.md), the per-modality metrics too.

    Args:
        method: the method (built on the encoders and fusion head this module trains).
        lr: the learning rate (the method's own parameter groups, e.g. CGGM's heads, are scaled from it).
        optimizer: the optimizer class (default ``torch.optim.SGD``).
        **optimizer_kwargs: passed to the optimizer (``momentum``, ``weight_decay``, ...).
    """

    def __init__(self, method: Method, lr: float, optimizer=torch.optim.SGD, **optimizer_kwargs: Any) -> None:
        super().__init__()
        if not isinstance(method, Method):
            raise TypeError(f"method: expected an agm_fast.methods.Method, got {type(method).__name__}")
        self.method = method
        self.encoders = nn.ModuleList(method.encoders)
        self.fusion = method.fusion
        self.lr = float(lr)
        self.optimizer_class = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs)
        self.callback = BalancingCallback(method)
        self._val: Optional[Dict[str, Tensor]] = None
        # A method that owns its step takes its optimizer steps itself (Lightning's manual optimisation).
        self.automatic_optimization = not method.owns_step
        self._last_metrics: Optional[Dict[str, List[float]]] = None

    def forward(self, *inputs: Tensor) -> Tensor:
        """Inference: the fused logits ``[B, C]`` (the method's prediction rule)."""
        return self.method.predict(list(inputs))

    def train(self, mode: bool = True):
        # A method that owns its step predicts with its own modules (a shared head): they follow train / eval too.
        super().train(mode)
        method = getattr(self, "method", None)
        if method is not None and method.owns_step:
            for module in method.modules():
                module.train(mode)
        return self

    def configure_callbacks(self):
        return [self.callback]

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.encoders.parameters()] + list(self.fusion.parameters())}]
        groups += self.method.param_groups(self.lr)
        return self.optimizer_class(groups, lr=self.lr, **self.optimizer_kwargs)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        inputs, labels = split_batch(batch)
        if self.method.owns_step:
            return self._owned_step(inputs, labels, batch_idx)
        out = self.method.forward(inputs, labels, self.current_epoch)
        loss = self.method.loss(out, labels)
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def _owned_step(self, inputs: List[Tensor], labels: Tensor, batch_idx: int) -> None:
        # Under DDP this runs inside DDP's forward, where manual_backward would arm DDP's reducer: the flag is cleared
        # for the rest of the forward (as no_sync does; Lightning sets it again after the forward) and SubSteps
        # averages each sub-step's gradients over DDP's group instead.
        wrapped = self.trainer.strategy.model
        group = owned_step.data_parallel_group(wrapped)
        if group is not None:
            wrapped.require_backward_grad_sync = False
        steps = owned_step.SubSteps(self.optimizers(), backward=self.manual_backward, process_group=group)
        n = self.trainer.num_training_batches
        progress = batch_idx / n if isinstance(n, int) and n > 0 else None
        res = owned_step.run(self.method, inputs, labels, self.current_epoch, steps, progress=progress)
        self.callback.coefficients.append(res.coeffs)
        self.log("train_loss", res.loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return None

    def on_validation_epoch_start(self) -> None:
        self._val = None

    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, labels = split_batch(batch)
        # agm_fast's one definition of per-modality metrics (agm_fast.validation): Shapley outputs over the
        # subsets with the muted inputs zero; a method that owns its step is evaluated with its prediction rule.
        predict = self.method.predict if self.method.owns_step else None
        sums = modality_sums(list(self.method.encoders), self.fusion, inputs, labels, predict)
        self._val = sums if self._val is None else self._val + sums

    def on_validation_epoch_end(self) -> None:
        if self._val is None:
            return
        M = self.method.num_modalities
        metrics = metrics_from_sums(self.trainer.strategy.reduce(self._val.double(), reduce_op="sum"), M)
        self.log("val_acc", metrics["accuracy"], sync_dist=False)
        self.log("val_loss", metrics["loss"], sync_dist=False)
        for m in range(M):
            self.log(f"val_acc_{m}", metrics["modality_accuracy"][m], sync_dist=False)
            self.log(f"val_loss_{m}", metrics["modality_loss"][m], sync_dist=False)
        self._last_metrics = {k: metrics[k] for k in ("modality_accuracy", "modality_loss")}

    def modality_metrics(self) -> Optional[Dict[str, Sequence[float]]]:
        """The last validation epoch's per-modality accuracy and loss (None before the first validation)."""
        return self._last_metrics
