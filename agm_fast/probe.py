"""Linear-probe evaluation of each modality: how much class information a (frozen) encoder's features hold.

For each modality a fresh linear classifier is fitted on the frozen encoder's features of a training split and
scored on another split. Unlike the accuracy of a multimodal head's per-modality logits, the probe does not depend on
how the fusion head weighs the modality: it measures the encoder itself, which is how balancing papers report
"unimodal" accuracy when they do not train separate unimodal heads.

The fit is deterministic: features standardised with the training split's statistics, a multinomial logistic
regression with a small L2 penalty, full-batch L-BFGS in float64.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_float, check_int

__all__ = ["linear_probe", "probe_encoders"]


def _features(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected features [N, ...], got {got}")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite features, got NaN or infinite values")
    return x


def _labels(y: Tensor, n: int, name: str) -> Tensor:
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (n,):
        got = (y.dtype, tuple(y.shape)) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{name}: expected [{n}] int64 class indices, got {got}")
    return y


def linear_probe(
    train_features: Sequence[Tensor],
    train_labels: Tensor,
    test_features: Sequence[Tensor],
    test_labels: Tensor,
    num_classes: int = 0,
    max_iter: int = 100,
    weight_decay: float = 1e-4,
) -> Tensor:
    """Per-modality linear-probe accuracy.

    Args:
        train_features: M tensors ``[N, ...]`` (flattened per sample), the features the probes are fitted on.
        train_labels: ``[N]`` int64 class indices.
        test_features: M tensors ``[N_test, ...]`` with the same per-sample sizes.
        test_labels: ``[N_test]`` int64 class indices.
        num_classes: C (default: ``max(label) + 1`` over both splits).
        max_iter: L-BFGS iterations per probe (default 100).
        weight_decay: the L2 penalty on the probe's weights (default 1e-4).

    Returns:
        ``[M]`` float64 accuracies of the probes on the test split, on the CPU.
    """
    if len(train_features) == 0 or len(train_features) != len(test_features):
        raise ValueError(
            f"test_features: expected as many modalities as train_features ({len(train_features)}), "
            f"got {len(test_features)}"
        )
    max_iter = check_int("max_iter", max_iter, low=1)
    weight_decay = check_float("weight_decay", weight_decay, low=0.0)
    accs = []
    for m, (tr, te) in enumerate(zip(train_features, test_features)):
        X = _features(tr, f"train_features[{m}]").cpu()
        Xt = _features(te, f"test_features[{m}]").cpu()
        if X.shape[1] != Xt.shape[1]:
            raise ValueError(f"test_features[{m}]: expected {X.shape[1]} features per sample, got {Xt.shape[1]}")
        y = _labels(train_labels, X.shape[0], "train_labels").cpu()
        yt = _labels(test_labels, Xt.shape[0], "test_labels").cpu()
        C = num_classes or int(max(int(y.max()), int(yt.max()))) + 1
        mean, std = X.mean(0), X.std(0).clamp(min=1e-12)
        X, Xt = (X - mean) / std, (Xt - mean) / std
        probe = nn.Linear(X.shape[1], C, dtype=torch.float64)
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        opt = torch.optim.LBFGS(probe.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(probe(X), y) + weight_decay * probe.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            accs.append((probe(Xt).argmax(-1) == yt).double().mean())
    return torch.stack(accs)


@torch.no_grad()
def probe_encoders(
    encoders: Sequence[nn.Module],
    train_inputs: Sequence[Tensor],
    train_labels: Tensor,
    test_inputs: Sequence[Tensor],
    test_labels: Tensor,
    chunk: int = 4096,
    **kwargs,
) -> Tensor:
    """Freeze each encoder (eval mode, no gradient), take its features on both splits, and probe them.

    Args:
        encoders: M encoder modules.
        train_inputs: M tensors ``[N, ...]``, one per modality.
        train_labels: ``[N]`` int64 class indices.
        test_inputs: M tensors ``[N_test, ...]``.
        test_labels: ``[N_test]`` int64 class indices.
        chunk: at most this many samples per encoder call.
        **kwargs: passed to :func:`linear_probe` (``num_classes``, ``max_iter``, ``weight_decay``).

    Returns:
        ``[M]`` float64 probe accuracies on the test split (the encoders' modes are restored afterwards).
    """
    if not (len(encoders) == len(train_inputs) == len(test_inputs)):
        raise ValueError(
            f"train_inputs: expected one tensor per encoder ({len(encoders)}), got {len(train_inputs)} and "
            f"{len(test_inputs)}"
        )

    def features(enc: nn.Module, x: Tensor) -> Tensor:
        return torch.cat([enc(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])

    # Every submodule's own mode comes back afterwards (a BatchNorm frozen with .eval() inside a training encoder
    # stays frozen).
    modes = [(sub, sub.training) for e in encoders for sub in e.modules()]
    try:
        for e in encoders:
            e.eval()
        train = [features(e, x) for e, x in zip(encoders, train_inputs)]
        test = [features(e, x) for e, x in zip(encoders, test_inputs)]
    finally:
        for sub, mode in modes:
            sub.training = mode
    return linear_probe(train, train_labels, test, test_labels, **kwargs)
