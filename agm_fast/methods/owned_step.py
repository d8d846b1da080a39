"""A method-owned step: the method runs its own forward, backward and optimizer steps for one batch.

MLA trains one modality at a time through a shared head, ReconBoost alternates boosting stages: several optimizer
steps per batch. Such a method sets ``owns_step = True`` and implements ``train_step(inputs, target, epoch, steps,
progress=None) -> StepResult``; it runs each of its sub-steps through the :class:`SubSteps` it is given, which says how
the trainer back-propagates (``loss.backward()``, Lightning's ``manual_backward``, accelerate's ``backward``), clips and
steps. ``Method.predict(inputs)`` is its test-time rule (the fusion head on the features by default).
:func:`agm_fast.methods.training_step` calls :func:`run` for such a method; docs/owned-step.md says what each trainer
does with it.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed, sharding

__all__ = ["SubSteps", "check_trainer", "data_parallel_group", "release", "run"]


class SubSteps:
    """How the sub-steps of an owned step run: zero the gradients, back-propagate, average over the ranks, let the
    method act on the gradients, clip, step.

    Args:
        optimizer: the optimizer of the model and of the method's ``param_groups`` (Lightning's and accelerate's
            wrappers work too).
        backward: ``backward(loss)`` (default ``loss.backward()``; Lightning: ``manual_backward``; the Hugging Face
            Trainer: ``accelerator.backward``).
        clip: ``clip(parameters)`` run on each sub-step's gradients before its optimizer step (the trainer's
            clipping), or None.
        process_group: data parallelism without DDP's hooks (the plain loop on ranks that each hold the model, and
            the trainers under DDP, whose reducer stays out of an owned step): each sub-step's gradients are averaged
            over this group (None: no averaging unless ``torch.distributed`` is initialised, then the default group).
            Under FSDP2 (a parameter the optimizer steps is sharded) the group is the mesh's, and only the gradients
            FSDP does not reduce (the unsharded parameters) are averaged. Unequal local batches: the method scales
            each sub-step's loss by :meth:`share`.

    Attributes:
        steps: the optimizer steps taken so far.

    Example::

        steps = SubSteps(optimizer)
        steps.run(loss_a)           # zero_grad, backward, step
    """

    def __init__(self, optimizer: Any, backward: Optional[Callable[[Tensor], Any]] = None,
                 clip: Optional[Callable[[List[Tensor]], Any]] = None, process_group: Any = None) -> None:
        if not callable(getattr(optimizer, "step", None)) or not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer: expected a torch optimizer (with step() and param_groups), got "
                            f"{type(optimizer).__name__}")
        if backward is not None and not callable(backward):
            raise TypeError(f"backward: expected a callable backward(loss), got {type(backward).__name__}")
        if clip is not None and not callable(clip):
            raise TypeError(f"clip: expected a callable clip(parameters), got {type(clip).__name__}")
        distributed.is_active(process_group)  # checks its type
        self.optimizer = optimizer
        self._backward = backward
        self.clip = clip
        self.process_group = process_group
        self.steps = 0

    def parameters(self) -> List[Tensor]:
        """Every parameter the optimizer steps."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Set every gradient to None (a parameter that a sub-step does not reach is then not stepped), or, with
        ``set_to_none=False``, fill the existing ones with zeros (the optimizer then steps them with momentum and
        weight decay only)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _mesh_group(self) -> Any:
        for p in self.parameters():
            if sharding.is_sharded(p):
                if p.device_mesh.ndim != 1:
                    raise ValueError(f"parameters: expected parameters sharded over a 1-D mesh (fully_shard's), got a "
                                     f"{p.device_mesh.ndim}-D mesh")
                return p.device_mesh.get_group()
        return None

    @property
    def group(self) -> Any:
        """The data-parallel group of the sub-steps: the mesh's group when a parameter the optimizer steps is sharded
        by FSDP2, else ``process_group`` (the default group for None) when it has more than one rank, else None."""
        group = self._mesh_group()
        if group is not None:
            if self.process_group is not None and not _same_ranks(self.process_group, group):
                raise ValueError(
                    "process_group: expected None or the group the parameters are sharded over (FSDP2 reduces their "
                    f"gradients over its mesh), got a group of ranks {dist.get_process_group_ranks(self.process_group)}"
                    f" for a mesh of ranks {dist.get_process_group_ranks(group)}"
                )
            return group if distributed.is_active(group) else None
        if not distributed.is_active(self.process_group):
            return None
        return dist.group.WORLD if self.process_group is None else self.process_group

    def share(self, rows: int, device: Any) -> Optional[Tensor]:
        """This rank's share of the global batch, ``W n_r / N`` (``[]`` float32 on ``device``, one all-reduce of one
        number), or None without data parallelism. A method multiplies each sub-step's loss (a mean over this rank's
        ``rows``) by it, so that the gradients averaged over the ranks are the global batch mean's, for unequal local
        batches too (equal ones: exactly 1)."""
        group = self.group
        if group is None:
            return None
        n = torch.full((), float(rows), dtype=torch.float32, device=device)
        total = distributed.all_reduce_sum(n, group, async_op=False).wait()
        return n * dist.get_world_size(group) / total

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss``; under data parallelism, average the gradients over the ranks (under FSDP2 those of
        the parameters it does not shard, e.g. a method's own head: FSDP reduced the others)."""
        if self._backward is None:
            loss.backward()
        else:
            self._backward(loss)
        group = self.group
        if group is None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        distributed.mean_over_ranks_([g for g in grads if not sharding.is_sharded(g)], group)

    def step(self) -> None:
        """Clip (when the trainer clips) and take one optimizer step."""
        if self.clip is not None:
            self.clip([p for p in self.parameters() if p.grad is not None])
        self.optimizer.step()
        self.steps += 1

    def reset_state(self, params: Sequence[Tensor]) -> None:
        """Forget the optimizer's state (momentum buffers) of ``params``: a phase that the released code trains with
        a fresh optimizer."""
        opt = self.optimizer
        while not hasattr(opt, "state") or not isinstance(getattr(opt, "state"), dict):
            inner = getattr(opt, "_optimizer", None) or getattr(opt, "optimizer", None)
            if inner is None or inner is opt:
                break
            opt = inner
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            for p in params:
                state.pop(p, None)

    def run(self, loss: Tensor, before_step: Optional[Callable[[], Any]] = None, *, set_to_none: bool = True) -> None:
        """One sub-step: zero the gradients (:meth:`zero_grad`), back-propagate ``loss``, ``before_step()`` (the
        method's change to the gradients), clip, step."""
        self.zero_grad(set_to_none)
        self.backward(loss)
        if before_step is not None:
            before_step()
        self.step()


def _same_ranks(a: Any, b: Any) -> bool:
    return a is b or dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def run(method, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int], optimizer: Any, *,
        progress: Optional[float] = None):
    """One owned training step of ``method`` (``owns_step = True``): its ``train_step`` with a :class:`SubSteps`
    around ``optimizer`` (or ``optimizer`` itself when it is one).

    Returns:
        The method's :class:`agm_fast.methods.StepResult`.
    """
    from .base import StepResult

    if progress is not None and not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"progress: expected the fraction of the epoch done, in [0, 1], got {progress!r}")
    steps = optimizer if isinstance(optimizer, SubSteps) else SubSteps(optimizer)
    result = method.train_step(list(inputs), target, epoch, steps, progress=progress)
    if not isinstance(result, StepResult):
        raise TypeError(f"{method.name or type(method).__name__}.train_step: expected a StepResult, got "
                        f"{type(result).__name__}")
    return result


def release(steps: SubSteps) -> None:
    """After an owned step inside a trainer that steps once more by itself (the Hugging Face Trainer): clear every
    gradient, so that its step finds none and changes nothing."""
    steps.zero_grad()


def data_parallel_group(model: Any) -> Any:
    """The process group of a DDP-wrapped ``model`` (None for any other model): a trainer passes it to
    :class:`SubSteps`, which averages each sub-step's gradients itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.process_group if isinstance(model, DistributedDataParallel) else None


def check_trainer(method, *, world_size: int, where: str, model: Any = None) -> None:
    """Refuse what an owned step cannot do in a trainer: a model wrapped for data parallelism by anything but DDP
    (FSDP, DeepSpeed). Under DDP the sub-steps run outside DDP's reducer and :class:`SubSteps` averages their
    gradients over the DDP group (docs/owned-step.md). (Gradient accumulation is refused by ``set_accumulation``: an
    owned-step method declares ``accumulation = "refused"``.)

    Args:
        world_size: the trainer's number of processes.
        where: the argument or object named in the error.
        model: the trainer's wrapped model (Lightning's ``trainer.strategy.model``, the HF Trainer's
            ``model_wrapped``).
    """
    if not getattr(method, "owns_step", False) or world_size <= 1 or data_parallel_group(model) is not None:
        return
    name = method.name or type(method).__name__
    raise NotImplementedError(
        f"{where}: {name} runs its sub-steps on the encoders and its shared head directly, outside the wrapper's "
        f"forward, so a wrapper that shards the parameters (FSDP, DeepSpeed) never gathers them nor reduces their "
        f"gradients; expected a DDP-wrapped model (its gradients are averaged by SubSteps) or one device, got "
        f"{type(model).__name__} over world size {world_size}"
    )
