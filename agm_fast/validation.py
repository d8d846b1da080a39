"""Validation metrics of a multimodal model, fused and per modality, with one definition everywhere.

"Per-modality accuracy" (and loss) in agm_fast is the accuracy (cross-entropy) of the Shapley mono-modal output
``psi_m = sum_S W[m, S] f(S)`` over every non-empty subset S of the modalities, where f(S) is the model with the
inputs of the modalities outside S set to zero (AGM's muted baseline; docs/methods.md, sections 1.2-1.3, the
reference variant with ``sum_m psi_m = f(A)``); for two modalities ``psi_a = (f(a, v) - f(v) + f(a)) / 2``. The
CLI, the Lightning module and the HF callback all use :func:`modality_metrics`, and MSLR and MSES follow its
``modality_accuracy`` and ``modality_loss``.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coalitions import full_mask, shapley_weights, subset_masks
from .ops.shapley import shapley_outputs_torch
from .ops.subset_batch import subset_batch_torch

__all__ = ["metrics_from_sums", "modality_metrics", "modality_sums", "split_batch"]

Batch = Union[Tuple, List, Dict]


def split_batch(batch) -> Tuple[List[Tensor], Tensor]:
    """``(inputs, labels)`` from a ``(x_0, ..., x_{M-1}, y)`` tuple, an ``(inputs, y)`` pair whose first item is the
    list of M inputs, or an ``{"inputs": [...], "labels": y}`` dict."""
    if isinstance(batch, Mapping):
        if "inputs" not in batch or "labels" not in batch:
            raise KeyError(f"batch: expected the keys 'inputs' and 'labels', got {sorted(batch)}")
        return list(batch["inputs"]), batch["labels"]
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], (list, tuple)):
        return list(batch[0]), batch[1]
    if not isinstance(batch, (list, tuple)) or len(batch) < 3:
        raise TypeError("batch: expected (x_0, ..., x_{M-1}, y) with M >= 2, ([x_0, ...], y), or a dict with 'inputs' "
                        f"and 'labels', got {type(batch).__name__}")
    return list(batch[:-1]), batch[-1]


def _parts(model) -> Tuple[List[nn.Module], nn.Module]:
    encoders, fusion = getattr(model, "encoders", None), getattr(model, "fusion", None)
    if encoders is None or not isinstance(fusion, nn.Module):
        raise TypeError(f"model: expected an agm_fast Method or a model with .encoders and .fusion, got "
                        f"{type(model).__name__}")
    return list(encoders), fusion


def _modules(encoders: Sequence[nn.Module], fusion: nn.Module) -> List[nn.Module]:
    seen, out = set(), []
    for mod in [*encoders, fusion]:
        if id(mod) not in seen:
            seen.add(id(mod))
            out.append(mod)
    return out


@torch.no_grad()
def modality_sums(encoders: Sequence[nn.Module], fusion: nn.Module, xs: Sequence[Tensor], y: Tensor,
                  predict: Optional[Callable[[List[Tensor]], Tensor]] = None) -> Tensor:
    """One batch's sums, in the modules' current modes: ``[correct, loss, count, correct_m (M), loss_m (M)]``
    (float32, on the labels' device; losses are sums of cross-entropies). Add them over batches (and ranks), then
    :func:`metrics_from_sums`. ``predict(inputs) -> [B, C]``, when given, replaces ``fusion(*encoders(inputs))``
    (a method's own prediction rule, e.g. MLA's); it is called once per subset."""
    M = len(encoders)
    masks = subset_masks(M, "reference")
    full = masks.index(full_mask(M))
    W = shapley_weights(M, masks, torch.float32).to(y.device)
    B = y.shape[0]
    stacked = subset_batch_torch(list(xs), masks, None)
    if predict is None:
        feats = [enc(x) for enc, x in zip(encoders, stacked)]
        # As Method.head: an nn.Linear head reads the concatenated features.
        logits = fusion(torch.cat(feats, dim=1)) if isinstance(fusion, nn.Linear) else fusion(*feats)
        subset_logits = logits.float().view(len(masks), B, -1)
    else:
        subset_logits = torch.stack([predict([x[s * B : (s + 1) * B] for x in stacked]).float()
                                     for s in range(len(masks))])
    psi = shapley_outputs_torch(subset_logits, W)
    fused = subset_logits[full]
    return torch.cat([
        torch.stack([(fused.argmax(-1) == y).sum().float(), F.cross_entropy(fused, y, reduction="sum"),
                     torch.tensor(float(B), device=y.device)]),
        (psi.argmax(-1) == y).sum(1).float(),
        F.cross_entropy(psi.permute(1, 2, 0), y.unsqueeze(1).expand(B, M), reduction="none").sum(0),
    ])


def metrics_from_sums(sums: Tensor, M: int) -> Dict[str, object]:
    """``{"accuracy", "loss", "modality_accuracy", "modality_loss", "count"}`` from :func:`modality_sums` totals."""
    sums = sums.double()
    n = float(sums[2])
    if n <= 0:
        raise ValueError("data: expected at least one sample, got none")
    return {
        "accuracy": float(sums[0]) / n,
        "loss": float(sums[1]) / n,
        "modality_accuracy": (sums[3 : 3 + M] / n).tolist(),
        "modality_loss": (sums[3 + M :] / n).tolist(),
        "count": int(n),
    }


@torch.no_grad()
def modality_metrics(
    model,
    data: Union[Tuple[Sequence[Tensor], Tensor], Iterable[Batch]],
    *,
    chunk: int = 32768,
    device: Optional[torch.device] = None,
    process_group=None,
    predict: Optional[Callable[[List[Tensor]], Tensor]] = None,
    modules: Sequence[nn.Module] = (),
) -> Dict[str, object]:
    """Fused and per-modality accuracy and cross-entropy of a model on a validation set, in eval mode.

    Args:
        model: an :class:`agm_fast.methods.Method` or any module with ``.encoders`` (M modules) and ``.fusion``
            (``fusion(*features) -> [B, C]``).
        data: ``(xs, y)`` with M full input tensors ``[N, ...]`` and labels ``[N]`` (evaluated in chunks), or an
            iterable of batches as :func:`split_batch` reads them (a DataLoader).
        chunk: at most this many rows (subsets x samples) per model call, for ``(xs, y)`` data.
        device: where batches are moved (default: where they are).
        process_group: with ``torch.distributed`` initialised, the sums and counts are reduced over this group
            (None: the default group), so every rank gets the metrics of the whole validation set (each rank passes
            its shard).
        predict: a prediction rule ``inputs -> [B, C]`` in place of the fusion head (default: a method that owns
            its step gives its :meth:`~agm_fast.methods.Method.predict`).
        modules: further modules put in eval mode for the evaluation (default: such a method's own modules).

    Returns:
        ``{"accuracy", "loss", "modality_accuracy" (M floats), "modality_loss" (M floats), "count"}``. The modes of
        the encoders and the head are restored.
    """
    from . import distributed

    encoders, fusion = _parts(model)
    if predict is None and getattr(model, "owns_step", False):
        predict, modules = model.predict, list(modules) or list(model.modules())
    M = len(encoders)
    if M < 2:
        raise ValueError(f"model: expected at least 2 encoders, got {M}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    subsets = (1 << M) - 1
    roots = _modules([*encoders, *modules], fusion)
    modes = [(mod, mod.training) for root in roots for mod in root.modules()]
    for root in roots:
        root.eval()
    sums: Optional[Tensor] = None
    try:
        for xs, y in _batches(data, M, chunk // subsets or 1, device):
            part = modality_sums(encoders, fusion, xs, y, predict)
            sums = part if sums is None else sums + part
    finally:
        for mod, training in modes:
            mod.training = training
    if sums is None:
        raise ValueError("data: expected at least one sample, got none")
    return metrics_from_sums(distributed.global_sums(sums.double(), process_group), M)


def _batches(data, M: int, step: int, device):
    if isinstance(data, (list, tuple)) and len(data) == 2 and isinstance(data[1], Tensor) and \
            isinstance(data[0], (list, tuple)) and all(isinstance(x, Tensor) for x in data[0]):
        xs, y = data
        _check(xs, y, M)
        for start in range(0, y.shape[0], step):
            yield [_to(x[start : start + step], device) for x in xs], _to(y[start : start + step], device)
        return
    for batch in data:
        xs, y = split_batch(batch)
        _check(xs, y, M)
        yield [_to(x, device) for x in xs], _to(y, device)


def _to(t: Tensor, device) -> Tensor:
    return t if device is None else t.to(device)


def _check(xs: Sequence[Tensor], y: Tensor, M: int) -> None:
    if len(xs) != M:
        raise ValueError(f"data: expected {M} inputs per batch (one per encoder), got {len(xs)}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype != torch.int64:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"data: expected labels [B] int64 (class indices), got {got}")
    for m, x in enumerate(xs):
        if not isinstance(x, Tensor) or x.shape[0] != y.shape[0]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"data: expected input {m} with {y.shape[0]} rows (the labels'), got {got}")
