"""The reference-style OGM-GE step, written from docs/methods.md, section 2: the baseline of ``bench_ogm_ge``.

It does what the reference training loop does, in the way it does it:

- scores: the softmax of each modality's logits, then a Python loop over the batch that reads the probability at
  the label of every sample with ``.item()`` (one host synchronisation per sample and modality);
- coefficients: Python floats from ``rho = s_v / s_a``, with the reference's discontinuous rule;
- modulation: a Python loop over the selected parameters (4-D weights whose name starts with the encoder's
  prefix), each reading ``grad.std().item()`` (one synchronisation per tensor) and replacing the gradient with
  ``grad * k + normal(0, std + 1e-8)`` drawn into a fresh tensor (OGM-GE), or scaling it in place (OGM).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

__all__ = ["reference_style_coefficients", "select_conv_parameters", "reference_style_modulation"]


def reference_style_coefficients(label: Tensor, out_a: Tensor, out_v: Tensor, alpha: float) -> Tuple[float, float]:
    """Two-modality OGM coefficients with a per-sample Python score loop.

    Args:
        label: ``[B]`` int64 class indices.
        out_a: ``[B, C]`` audio logits.
        out_v: ``[B, C]`` visual logits.
        alpha: modulation strength.

    Returns:
        ``(k_a, k_v)`` as Python floats.
    """
    p_a = torch.softmax(out_a.detach(), dim=1)
    p_v = torch.softmax(out_v.detach(), dim=1)
    score_a = 0.0
    score_v = 0.0
    for i in range(label.shape[0]):
        y = label[i]
        score_a += p_a[i, y].item()
        score_v += p_v[i, y].item()
    rho = score_v / score_a
    if rho > 1:
        return 1.0, 1.0 - math.tanh(alpha * max(rho, 0.0))
    return 1.0 - math.tanh(alpha * max(1.0 / rho, 0.0)), 1.0


def select_conv_parameters(model: nn.Module, prefix: str) -> List[nn.Parameter]:
    """The reference's selection: 4-D parameters whose name (after a ``module.`` prefix) starts with ``prefix``."""
    out = []
    for name, p in model.named_parameters():
        if name.startswith("module."):
            name = name[len("module.") :]
        if name.startswith(prefix) and p.dim() == 4:
            out.append(p)
    return out


def reference_style_modulation(model: nn.Module, k_a: float, k_v: float, mode: str = "OGM_GE") -> None:
    """The reference-style gradient update: one Python iteration, and for OGM-GE one ``.item()``, per tensor.

    Args:
        model: a model with ``audio*`` and ``visual*`` submodules whose gradients are filled.
        k_a: audio coefficient (Python float).
        k_v: visual coefficient (Python float).
        mode: ``"OGM"`` or ``"OGM_GE"``.
    """
    for prefix, k in (("audio", k_a), ("visual", k_v)):
        for p in select_conv_parameters(model, prefix):
            if p.grad is None:
                continue
            if mode == "OGM_GE":
                sigma = p.grad.std().item() + 1e-8
                noise = torch.zeros_like(p.grad).normal_(0.0, sigma)
                p.grad = p.grad * k + noise
            elif mode == "OGM":
                p.grad *= k
