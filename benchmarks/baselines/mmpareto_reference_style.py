"""A reference-style MMPareto step, written from docs/methods.md, section 9: the baseline of ``bench_method_step``.

It computes what the reference training loop computes, the way that loop computes it:

- M + 2 backward passes: the multimodal loss, then each unimodal loss, one at a time with ``retain_graph``, each
  followed by a copy of the encoders' gradients and a ``zero_grad``; then the backward of the summed loss, whose
  head gradients are kept;
- per encoder, the gradients flattened into one vector (``torch.cat``), the cosine and the min-norm weight as
  Python floats (host reads);
- a Python loop over the encoder's named parameters that rebuilds each gradient, with one host read per tensor for
  the norm ratio.

The redundant work against :class:`agm_fast.methods.mmpareto.MMParetoMethod` is M backward passes (two suffice,
because each unimodal loss reaches only its own encoder and head), the gradient copies, the flattening, and one
host round trip per tensor. A test checks that both give the same parameter gradients.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

__all__ = ["ReferenceStyleMMPareto"]


class ReferenceStyleMMPareto:
    """MMPareto as the reference trains it (classification).

    Args:
        encoders: M modules ``x_m -> [B, d_m]``.
        fusion: ``fusion(*features) -> [B, C]``.
        heads: M unimodal heads ``[B, d_m] -> [B, C]``.
        encoder_scale: the factor on the encoders' gradients (1.5 in the reference).
    """

    def __init__(self, encoders: Sequence[nn.Module], fusion: nn.Module, heads: Sequence[nn.Module],
                 encoder_scale: float = 1.5):
        self.encoders = list(encoders)
        self.fusion = fusion
        self.heads = list(heads)
        self.encoder_scale = encoder_scale
        self.weights: List[float] = []

    def _copy(self, m: int) -> List[Tensor]:
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.encoders[m].parameters()]

    def backward(self, optimizer: torch.optim.Optimizer, inputs: Sequence[Tensor], labels: Tensor) -> None:
        """Forward, the M + 2 backward passes and the integration: leaves the step's gradients in ``.grad``."""
        M = len(self.encoders)
        optimizer.zero_grad()
        feats = [enc(x) for enc, x in zip(self.encoders, inputs)]
        loss_mm = Fn.cross_entropy(self.fusion(*feats), labels)
        losses = [Fn.cross_entropy(head(f), labels) for head, f in zip(self.heads, feats)]
        loss_mm.backward(retain_graph=True)
        g_mm = [self._copy(m) for m in range(M)]
        optimizer.zero_grad()
        g_u = []
        for m in range(M):
            losses[m].backward(retain_graph=True)
            g_u.append(self._copy(m))
            optimizer.zero_grad()
        (loss_mm + sum(losses)).backward()
        self.weights = []
        for m in range(M):
            u = torch.cat([g.reshape(-1) for g in g_mm[m]])
            v = torch.cat([g.reshape(-1) for g in g_u[m]])
            a, b, c = torch.dot(u, u).item(), torch.dot(u, v).item(), torch.dot(v, v).item()
            cos = b / (max(a ** 0.5, 1e-8) * max(c ** 0.5, 1e-8))
            if cos > 0:
                w = 0.5
            elif b >= a:
                w = 0.999
            elif b >= c:
                w = 0.001
            else:
                w = (c - b) / (a + c - 2 * b)
            self.weights.append(w)
            for (name, p), gm, gu in zip(self.encoders[m].named_parameters(), g_mm[m], g_u[m]):
                h = 2 * (w * gm + (1 - w) * gu)
                ratio = (gm + gu).norm().item() / max(h.norm().item(), 1e-30)
                if ratio > 1:
                    h = h * ratio
                p.grad = self.encoder_scale * h

    def step(self, optimizer: torch.optim.Optimizer, inputs: Sequence[Tensor], labels: Tensor) -> None:
        """One training step: :meth:`backward`, then the optimizer step."""
        self.backward(optimizer, inputs, labels)
        optimizer.step()
