"""The reference-style CGGM training step, written from docs/methods.md, section 4: the baseline of ``bench_cggm_step``.

It does what the reference training loop does, in the way it does it:

- the direction term of the previous step is added to the task loss, and the model is back-propagated;
- the classifier heads run on the detached features, their loss is back-propagated, and the output-layer weights
  are found by scanning ``named_parameters()`` for a name;
- the cosine between each head's output weight and the fusion output weight is built on ``clone()``\\ s, so the
  graph of the next step's direction term holds this step's values;
- each head's accuracy is computed on the host (``argmax`` moved to the CPU, one round trip per modality); the
  changes, S, the coefficients B and the direction term are Python floats;
- the encoders' gradients are scaled in a Python loop over ``named_parameters()`` that matches each name against
  every encoder prefix, one in-place multiply per tensor;
- the heads' optimizer steps, then the main optimizer.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

__all__ = ["ReferenceStyleCGGM"]


class ReferenceStyleCGGM:
    """CGGM as the reference trains it, for a model returning ``(logits, [features])``.

    Args:
        model: ``model(*inputs) -> (logits [B, C], [h_0 [B, d_0], ...])``.
        heads: one ``nn.Linear(d_m, C)`` head per modality (an ``nn.ModuleList``).
        encoder_prefixes: the parameter-name prefix of each encoder in ``model``.
        fusion_weight_name: the name of the fusion output layer's weight in ``model``.
        slices: per modality, the columns of the fusion weight compared with head m (a concat head).
        rho: the gradient scale factor.
        lam: the direction-term weight.
        head_optimizer: the heads' optimizer.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: nn.ModuleList,
        encoder_prefixes: Sequence[str],
        fusion_weight_name: str,
        slices: Sequence[slice],
        rho: float,
        lam: float,
        head_optimizer: torch.optim.Optimizer,
    ):
        self.model = model
        self.heads = heads
        self.prefixes = list(encoder_prefixes)
        self.fusion_weight_name = fusion_weight_name
        self.slices = list(slices)
        self.rho = rho
        self.lam = lam
        self.head_optimizer = head_optimizer
        self.acc_prev: List[float] = [0.0] * len(self.prefixes)
        self.l_gm: Optional[Tensor] = None
        self.coeffs: List[float] = []

    def step(self, optimizer: torch.optim.Optimizer, inputs: Sequence[Tensor], labels: Tensor) -> None:
        """One training step: forward, loss (+ the previous direction term), backward, heads, scaling, steps."""
        optimizer.zero_grad()
        logits, hs = self.model(*inputs)
        loss = Fn.cross_entropy(logits, labels)
        if self.l_gm is not None:
            loss = loss + self.lam * self.l_gm
        loss.backward()
        self.after_backward(hs, labels)
        optimizer.step()

    def after_backward(self, hs: Sequence[Tensor], labels: Tensor) -> None:
        """The CGGM work between the main backward and the main optimizer step: heads, accuracies, coefficients,
        the next direction term, the encoder-gradient scaling and the heads' step."""
        M = len(self.prefixes)
        self.head_optimizer.zero_grad()
        cls_res = [self.heads[m](hs[m].detach()) for m in range(M)]
        fusion_weight = None
        for name, p in self.model.named_parameters():
            if name == self.fusion_weight_name:
                fusion_weight = p
        cls_loss = Fn.cross_entropy(cls_res[0], labels)
        for m in range(1, M):
            cls_loss = cls_loss + Fn.cross_entropy(cls_res[m], labels)
        cls_loss.backward()
        cls_weights = [p for name, p in self.heads.named_parameters() if name.endswith("weight")]

        fused = fusion_weight.clone()
        cos = [
            Fn.cosine_similarity(cls_weights[m].clone().view(-1), fused[:, self.slices[m]].reshape(-1), dim=0)
            for m in range(M)
        ]
        truth = labels.cpu().numpy()
        acc = [float((cls_res[m].detach().argmax(1).cpu().numpy() == truth).mean()) for m in range(M)]
        diff = [acc[m] - self.acc_prev[m] for m in range(M)]
        diff_sum = sum(diff) + 1e-8
        coeff = [(diff_sum - d) / diff_sum for d in diff]
        self.acc_prev = acc
        self.coeffs = coeff
        l_gm = sum(abs(c) for c in coeff) - sum(coeff[m] * cos[m] for m in range(M))
        self.l_gm = l_gm / M

        for name, p in self.model.named_parameters():
            for m, prefix in enumerate(self.prefixes):
                if name.startswith(prefix) and p.grad is not None:
                    p.grad *= coeff[m] * self.rho

        self.head_optimizer.step()
