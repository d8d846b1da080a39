"""Small multimodal models shared by the AGM tests (not a test module)."""

from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn


class Encoder(nn.Module):
    """Linear, (BatchNorm), ReLU, (Dropout), Linear: ``[B, d_in] -> [B, d]``."""

    def __init__(self, d_in: int, d: int = 6, bn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        layers = [nn.Linear(d_in, d)]
        if bn:
            layers.append(nn.BatchNorm1d(d))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(d, d))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPFusion(nn.Module):
    """Non-linear head over the concatenated features, with BatchNorm and dropout."""

    def __init__(self, d_total: int, num_classes: int, bn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        layers = [nn.Linear(d_total, 8)]
        if bn:
            layers.append(nn.BatchNorm1d(8))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(8, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, *features: Tensor) -> Tensor:
        return self.net(torch.cat(features, dim=1))


class AdditiveFusion(nn.Module):
    """Sum of per-modality linear maps plus a bias, exposing ``contributions`` (the duck-typed closed form)."""

    def __init__(self, dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(d, num_classes, bias=False) for d in dims)
        self.bias = nn.Parameter(torch.randn(num_classes) * 0.1)

    def contributions(self, *features: Tensor) -> Tuple[List[Tensor], Tensor]:
        return [f_m(h) for f_m, h in zip(self.maps, features)], self.bias

    def forward(self, *features: Tensor) -> Tensor:
        pieces, bias = self.contributions(*features)
        return torch.stack(pieces).sum(0) + bias


class Composite(nn.Module):
    """Black-box form ``model(*xs) = fusion(enc_0(x_0), ...)``; an nn.Linear fusion takes the concatenation."""

    def __init__(self, encoders: Sequence[nn.Module], fusion: nn.Module) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion

    def forward(self, *xs: Tensor) -> Tensor:
        feats = [enc(x) for enc, x in zip(self.encoders, xs)]
        if isinstance(self.fusion, nn.Linear):
            return self.fusion(torch.cat(feats, dim=1))
        return self.fusion(*feats)


def make_model(
    M: int, head: str = "mlp", bn: bool = True, dropout: float = 0.0, d: int = 6, num_classes: int = 4, seed: int = 0
) -> Composite:
    """A random composite model: M encoders (input dims 3, 4, 5, ...) and a head (``mlp``, ``linear``, ``contrib``)."""
    torch.manual_seed(seed)
    encoders = [Encoder(3 + m, d, bn=bn, dropout=dropout) for m in range(M)]
    if head == "mlp":
        fusion = MLPFusion(d * M, num_classes, bn=bn, dropout=dropout)
    elif head == "linear":
        fusion = nn.Linear(d * M, num_classes)
    elif head == "contrib":
        fusion = AdditiveFusion([d] * M, num_classes)
    else:
        raise ValueError(head)
    return Composite(encoders, fusion)


def make_batch(M: int, B: int = 5, num_classes: int = 4, seed: int = 1) -> Tuple[List[Tensor], Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, 3 + m, generator=gen) for m in range(M)]
    return xs, torch.randint(0, num_classes, (B,), generator=gen)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def grads(model: nn.Module) -> List[Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
