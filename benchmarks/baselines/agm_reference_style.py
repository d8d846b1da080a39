"""A reference-style AGM training step, written from docs/methods.md, section 1: the baseline of the AGM benchmarks.

It computes what the public reference training loop computes, the way that loop computes it:

- 2^M - 1 separate calls of the whole model, one per non-empty subset: the full pass in train mode, then every
  masked pass (zeros in place of the muted inputs) in eval mode, after which the model is put back in train mode;
- the mono-modal outputs by the Shapley formula with the empty coalition dropped (psi), in Python loops over subsets;
- identity modules with full backward hooks that multiply the incoming gradient by a Python-float scale set by
  ``update_scale``; the loss is taken on ``sum_m psi_m`` (which equals f(A));
- the scores in a per-sample Python loop with ``.item()``; running means and coefficients as Python floats.

It is deliberately slow and is the baseline the speedups of :mod:`agm_fast.agm` are measured against; a test checks
that both give the same coefficients and parameter gradients.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ReferenceGradMod", "ReferenceAGMState", "reference_agm_step"]


class _ScaledIdentity(nn.Module):
    """Identity whose full backward hook multiplies the gradient by ``self.scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0
        self.register_full_backward_hook(self._hook)

    def _hook(self, module, grad_input, grad_output):
        return (grad_input[0] * self.scale,)

    def forward(self, x: Tensor) -> Tensor:
        return x.view_as(x)


class ReferenceGradMod(nn.Module):
    """Reference-style wrapper: ``forward(*inputs) -> (psi_0, ..., psi_{M-1}, out)`` with ``out = sum_m psi_m``.

    Args:
        model: ``model(*inputs) -> [B, C]``.
        num_modalities: M.
    """

    def __init__(self, model: nn.Module, num_modalities: int) -> None:
        super().__init__()
        self.model = model
        self.num_modalities = num_modalities
        self.scalers = nn.ModuleList(_ScaledIdentity() for _ in range(num_modalities))

    def update_scale(self, *coeffs: float) -> None:
        for scaler, c in zip(self.scalers, coeffs):
            scaler.scale = c

    def forward(self, *inputs: Tensor) -> Tuple[Tensor, ...]:
        M = self.num_modalities
        full = (1 << M) - 1
        outs = {full: self.model(*inputs)}
        self.model.eval()
        for mask in range(1, full):
            muted = [x if (mask >> m) & 1 else torch.zeros_like(x) for m, x in enumerate(inputs)]
            outs[mask] = self.model(*muted)
        self.model.train()
        psis = []
        for m in range(M):
            psi = 0
            for mask in range(full + 1):
                if (mask >> m) & 1:
                    continue
                size = bin(mask).count("1")
                w = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
                with_m = outs[mask | (1 << m)]
                # The reference drops the empty coalition's f(empty) term.
                psi = psi + w * (with_m - outs[mask] if mask else with_m)
            psis.append(self.scalers[m](psi))
        out = psis[0]
        for p in psis[1:]:
            out = out + p
        return (*psis, out)


class ReferenceAGMState:
    """Python-float running means and coefficients of the reference training loop (docs/methods.md, section 1.4).

    Args:
        num_modalities: M.
        alpha: modulation strength.
        cap: upper bound on ``rbar - r``, or None.
        window: ``(start, end)`` epochs inclusive, or None.
        hold_last: outside the window keep the last coefficients instead of 1.
    """

    def __init__(
        self,
        num_modalities: int,
        alpha: float,
        cap: Optional[float] = 10.0,
        window: Optional[Tuple[int, int]] = None,
        hold_last: bool = False,
    ) -> None:
        self.M = num_modalities
        self.alpha = alpha
        self.cap = cap
        self.window = window
        self.hold_last = hold_last
        self.running = [0.0] * num_modalities
        self.steps = 0
        self.last = [1.0] * num_modalities

    def scores(self, psis: Sequence[Tensor], labels: Tensor) -> List[float]:
        """Per-sample loop with ``.item()``: ``s_m = mean_b -log(max(softmax(psi_m)[b, y_b], 1e-8))``."""
        out = []
        for psi in psis:
            total = 0.0
            for b in range(psi.shape[0]):
                p = torch.softmax(psi[b].detach(), dim=0)[labels[b]].item()
                total += -math.log(max(p, 1e-8))
            out.append(total / psi.shape[0])
        return out

    def coefficients(self, s: List[float], epoch: Optional[int]) -> List[float]:
        """This step's coefficients (from the running means before the update), then the running-mean update."""
        M = self.M
        coeffs = []
        for m in range(M):
            r = math.exp(sum(s[j] for j in range(M) if j != m) / (M - 1) - s[m])
            rbar = math.exp(sum(self.running[j] for j in range(M) if j != m) / (M - 1) - self.running[m])
            d = rbar - r
            if self.cap is not None:
                d = min(d, self.cap)
            coeffs.append(math.exp(self.alpha * d))
        if self.window is not None and not (self.window[0] <= epoch <= self.window[1]):
            coeffs = list(self.last) if self.hold_last else [1.0] * M
        t = self.steps
        self.running = [self.running[m] * t / (t + 1) + s[m] / (t + 1) for m in range(M)]
        self.steps += 1
        self.last = coeffs
        return coeffs


def reference_agm_step(
    wrapper: ReferenceGradMod,
    state: ReferenceAGMState,
    inputs: Sequence[Tensor],
    labels: Tensor,
    optimizer: Optional[torch.optim.Optimizer],
    epoch: Optional[int] = None,
) -> Tuple[List[float], List[float], Tensor]:
    """One reference-style training step: forward, scores, coefficients, ``update_scale``, backward, optimizer step.

    Args:
        wrapper: the :class:`ReferenceGradMod` around the model.
        state: the :class:`ReferenceAGMState`.
        inputs: M tensors ``[B, ...]``.
        labels: ``[B]`` int64 class indices.
        optimizer: stepped after backward (gradients are zeroed first); None leaves the gradients in place.
        epoch: the current epoch (needed with a window).

    Returns:
        ``(coeffs, scores, loss)``: Python floats and the detached loss.
    """
    *psis, out = wrapper(*inputs)
    loss = nn.functional.cross_entropy(out, labels)
    s = state.scores(psis, labels)
    coeffs = state.coefficients(s, epoch)
    wrapper.update_scale(*coeffs)
    if optimizer is not None:
        optimizer.zero_grad()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return coeffs, s, loss.detach()
