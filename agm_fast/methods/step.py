"""The one training step of the plain loop: forward, loss, backward, the method's modulation, optimizer step.

It names no method: every method plugs into it through the hooks of :class:`agm_fast.methods.Method` (a method that
owns its step runs its own sub-steps, :mod:`agm_fast.methods.owned_step`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import Method, StepResult

__all__ = ["training_step"]


def training_step(
    method: Method,
    inputs: Sequence[Tensor],
    target: Tensor,
    epoch: Optional[int],
    optimizer: torch.optim.Optimizer,
    *,
    progress: Optional[float] = None,
) -> StepResult:
    """One training step of any method: forward, loss, backward, gradient modulation, optimizer step.

    Args:
        method: the method.
        inputs: M tensors ``[B, ...]``.
        target: ``[B]`` targets.
        epoch: the current epoch.
        optimizer: the optimizer of the model (and of :meth:`Method.param_groups`).
        progress: the fraction of the epoch done before this batch (read only by a method that owns its step).

    Returns:
        :class:`StepResult`.
    """
    if method.owns_step:  # the method runs its own sub-steps (agm_fast.methods.owned_step)
        from . import owned_step

        return owned_step.run(method, inputs, target, epoch, optimizer, progress=progress)
    out = method.forward(inputs, target, epoch)
    task = method.task_loss(out, target)
    term = method.loss_term(task, out)
    method.prepare_backward(out, target)
    loss = task if term is None else task + term
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    coeffs = method.before_optimizer_step(out, target)
    optimizer.step()
    logits = out.logits.detach()
    # Regression has no "correct": its count stays 0.
    hits = logits.argmax(-1) == target if method.task == "classification" else torch.zeros_like(logits[:, 0]).bool()
    if out.sample_weight is None:
        # A fill kernel, not a host-to-device copy: nothing waits for the device.
        rows = torch.full((), float(target.shape[0]), device=target.device)
        correct = hits.sum()
    else:
        rows = out.sample_weight.sum()
        correct = (hits & (out.sample_weight > 0)).sum()
    return StepResult(task.detach(), correct, rows, coeffs.detach().to(torch.float32))
