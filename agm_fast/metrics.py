"""Analysis metrics of modality imbalance: competition strength and Shapley attribution of accuracy.

Competition strength is defined in docs/methods.md, section 1.6.

- :func:`competition_strength`: how much of a unimodal "concept" (the features of a separately trained unimodal
  model) the fused multimodal feature contains linearly; lower means more.
- :func:`extract_features`: runs models over a loader and collects the fused feature and the concepts.
- :func:`shapley_accuracy`: the exact Shapley value of each modality for the accuracy of f(S) over all subsets S
  (the imbalance metric of BalanceBenchmark).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._validate import check_float
from .coalitions import shapley_weights

__all__ = ["competition_strength", "extract_features", "shapley_accuracy", "ShapleyAccuracy"]

Concepts = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]


def _as_list(concepts: Concepts, what: str) -> Tuple[List[Tensor], Optional[List[str]], bool]:
    """Flatten one / a list / a dict of concepts; returns ``(tensors, dict keys or None, was_single)``."""
    if isinstance(concepts, Tensor):
        return [concepts], None, True
    if isinstance(concepts, Mapping):
        keys = list(concepts.keys())
        return [concepts[k] for k in keys], keys, False
    if isinstance(concepts, (list, tuple)):
        return list(concepts), None, False
    raise TypeError(f"{what}: expected a tensor, a list of tensors or a dict of tensors, got {type(concepts).__name__}")


def _matrix(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{what}: expected a real (float or int) tensor, got {x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"{what}: expected shape [N, D] (or [N]), got {tuple(x.shape)}")
    x = x.to(torch.float64)
    # An offline analysis metric: reading the values once to reject NaN/inf is worth its host sync.
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: expected finite values, got non-finite values (NaN or inf)")
    return x


def competition_strength(
    fused_train: Tensor,
    concept_train: Concepts,
    fused_test: Tensor,
    concept_test: Concepts,
    ridge_alpha: float = 120.0,
) -> Union[Tensor, Dict[str, Tensor]]:
    """Competition strength d_m of one or several modalities (the AGM paper's "mono-modal concept").

    The definition is in docs/methods.md, section 1.6.

    A ridge regression with an unpenalised intercept is fitted from the fused feature F to the concept Y (the
    features of a separately trained unimodal model) on the train split, in closed form on centred data:
    ``beta = (Fc^T Fc + alpha I)^-1 Fc^T Yc``, ``b = mean(Y) - mean(F) beta``. On the test split
    ``R = F_test beta + b - Y_test`` (rows r_n), ``Bm = N * cov(Y_test)`` (unbiased covariance, N test samples) and
    ``d = (1/D) sum_n r_n^T pinv(Bm) r_n``. Lower d: the fused representation linearly contains more of the modality.
    A perfectly predicted concept gives 0; a concept the fused feature says nothing about gives about
    ``(N - 1) / N`` plus the estimation noise of beta and of the train mean (slightly above 1 for small splits).

    Everything runs in float64 on the inputs' device (CPU or CUDA), with torch only. Several concepts share one
    solve.

    Args:
        fused_train: ``[N_train, P]`` fused features of the train split.
        concept_train: ``[N_train, D]`` concept, or a list / dict of concepts ``[N_train, D_m]``.
        fused_test: ``[N_test, P]`` fused features of the test split.
        concept_test: the test concepts ``[N_test, D_m]``, in the same structure as ``concept_train``.
        ridge_alpha: the ridge penalty (120 in the AGM paper); 0 is ordinary least squares.

    Returns:
        A 0-d float64 tensor for one concept; ``[M]`` for a list; a dict name -> 0-d tensor for a dict.

    Raises:
        ValueError: mismatched shapes or structures, fewer test samples than concept dimensions plus one
            (``N_test <= D``: the covariance is singular), non-finite inputs, a negative ``ridge_alpha``.
        TypeError: inputs that are not real tensors.
    """
    ridge_alpha = check_float("ridge_alpha", ridge_alpha, low=0.0)
    ys_train, keys_train, single = _as_list(concept_train, "concept_train")
    ys_test, keys_test, single_test = _as_list(concept_test, "concept_test")
    if single != single_test or keys_train != keys_test or len(ys_train) != len(ys_test):
        raise ValueError(
            "concept_test: expected the same structure as concept_train (one tensor, a list, or the same dict keys)"
        )
    if not ys_train:
        raise ValueError("concept_train: expected at least one concept, got none")
    X = _matrix(fused_train, "fused_train")
    Xt = _matrix(fused_test, "fused_test")
    if X.device != Xt.device:
        raise ValueError(f"fused_test: expected a tensor on {X.device} (as fused_train), got {Xt.device}")
    if X.shape[1] != Xt.shape[1]:
        raise ValueError(f"fused_test: expected {X.shape[1]} features (as fused_train), got {Xt.shape[1]}")
    Ys, Yts = [], []
    for m, (y, yt) in enumerate(zip(ys_train, ys_test)):
        name = f"concept[{keys_train[m]!r}]" if keys_train else ("concept" if single else f"concept[{m}]")
        y = _matrix(y, f"{name} (train)")
        yt = _matrix(yt, f"{name} (test)")
        if y.device != X.device or yt.device != X.device:
            raise ValueError(f"{name}: expected tensors on {X.device} (as the fused features), got {y.device}")
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"{name} (train): expected {X.shape[0]} rows (as fused_train), got {y.shape[0]}")
        if yt.shape[0] != Xt.shape[0]:
            raise ValueError(f"{name} (test): expected {Xt.shape[0]} rows (as fused_test), got {yt.shape[0]}")
        if y.shape[1] != yt.shape[1]:
            raise ValueError(
                f"{name} (test): expected {y.shape[1]} dims (as on the train split), got {yt.shape[1]}"
            )
        if yt.shape[0] <= yt.shape[1]:
            raise ValueError(
                f"{name} (test): expected N_test > D test samples for cov(Y_test) to be invertible, got "
                f"N_test={yt.shape[0]} for D={yt.shape[1]} concept dims"
            )
        # A constant concept has no covariance to measure the residuals against: pinv(0) = 0 would report d = 0
        # ("fully contained") for a concept that carries no information at all.
        if not bool((yt.max(0).values > yt.min(0).values).any()):
            raise ValueError(
                f"{name} (test): expected a concept that varies over the test split, got a constant one"
            )
        Ys.append(y)
        Yts.append(yt)
    if X.shape[0] < 2:
        raise ValueError(f"fused_train: expected at least 2 samples, got {X.shape[0]}")

    mu_x = X.mean(0)
    Xc = X - mu_x
    Y = torch.cat(Ys, dim=1)
    mu_y = Y.mean(0)
    gram = Xc.T @ Xc
    gram.diagonal().add_(float(ridge_alpha))
    beta = torch.linalg.solve(gram, Xc.T @ (Y - mu_y))
    pred = (Xt - mu_x) @ beta + mu_y

    N = Xt.shape[0]
    out = []
    start = 0
    for yt in Yts:
        D = yt.shape[1]
        R = pred[:, start : start + D] - yt
        start += D
        Bm = N * torch.cov(yt.T, correction=1).reshape(D, D)
        out.append(((R @ torch.linalg.pinv(Bm, hermitian=True)) * R).sum() / D)
    if single:
        return out[0]
    if keys_train is not None:
        return dict(zip(keys_train, out))
    return torch.stack(out)


def _to_device(batch, device):
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)((k, _to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def extract_features(
    loader,
    fused: Callable[[object], Tensor],
    concepts: Union[Callable[[object], Tensor], Sequence[Callable], Mapping[str, Callable]],
    device: Optional[Union[str, torch.device]] = None,
    max_batches: Optional[int] = None,
):
    """Run models over a loader and collect the fused feature and the unimodal concepts for
    :func:`competition_strength`.

    Each callable receives the batch exactly as the loader yields it (moved to ``device`` when given: tensors inside
    tuples, lists and dicts) and returns a ``[B, ...]`` tensor, flattened to ``[B, -1]``. Typical use: ``fused`` is a
    function that runs the multimodal model up to its fused feature, each concept the penultimate layer of a
    unimodal model. Modules among the callables are put in eval mode for the run and restored afterwards; no
    gradient is recorded.

    Args:
        loader: an iterable of batches.
        fused: ``batch -> [B, P]``.
        concepts: one callable ``batch -> [B, D]``, a list of them, or a dict name -> callable.
        device: where to move each batch (None: leave it).
        max_batches: stop after this many batches (None: the whole loader).

    Returns:
        ``(F [N, P], concepts)`` with the concepts in the structure of ``concepts`` (a tensor, a list or a dict of
        ``[N, D_m]`` tensors), on the devices the callables returned them on.
    """
    fns, keys, single = _as_list_fns(concepts)
    modules = [f for f in [fused, *fns] if isinstance(f, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    F_parts: List[Tensor] = []
    Y_parts: List[List[Tensor]] = [[] for _ in fns]
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = _to_device(batch, device)
            f = fused(batch)
            F_parts.append(f.reshape(f.shape[0], -1))
            for m, fn in enumerate(fns):
                y = fn(batch)
                if y.shape[0] != f.shape[0]:
                    raise ValueError(f"concepts[{m}]: expected {f.shape[0]} rows (as fused), got {y.shape[0]}")
                Y_parts[m].append(y.reshape(y.shape[0], -1))
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    if not F_parts:
        raise ValueError("loader: expected at least one batch, got none")
    F = torch.cat(F_parts)
    Ys = [torch.cat(p) for p in Y_parts]
    if single:
        return F, Ys[0]
    if keys is not None:
        return F, dict(zip(keys, Ys))
    return F, Ys


def _as_list_fns(concepts) -> Tuple[List[Callable], Optional[List[str]], bool]:
    if callable(concepts) and not isinstance(concepts, (list, tuple, Mapping)):
        return [concepts], None, True
    if isinstance(concepts, Mapping):
        keys = list(concepts.keys())
        fns = [concepts[k] for k in keys]
    elif isinstance(concepts, (list, tuple)):
        keys, fns = None, list(concepts)
    else:
        raise TypeError(f"concepts: expected a callable, a list or a dict of callables, got {type(concepts).__name__}")
    if not fns or not all(callable(f) for f in fns):
        raise TypeError("concepts: expected at least one callable, and only callables")
    return fns, keys, False


class ShapleyAccuracy(NamedTuple):
    """Result of :func:`shapley_accuracy`.

    Attributes:
        values: ``[M]`` float64, the Shapley value of each modality for the accuracy; they sum to
            ``accuracies[full] - accuracies[0]``.
        accuracies: ``[2^M]`` float64, the accuracy of f(S) indexed by the subset bitmask (entry 0: the empty set,
            evaluated or the stand-in value).
    """

    values: Tensor
    accuracies: Tensor


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).to(torch.float64).mean(-1)


def _agm_subset_logits(module: nn.Module, inputs: Sequence[Tensor]) -> Tensor:
    """Every subset's logits ``[2^M, B, C]`` (ascending masks) from an AGM / GradMod's own subset evaluation."""
    if inputs is None:
        raise ValueError("inputs: expected the M input tensors of the batch with an AGM or GradMod module, got None")
    xs = module._check_inputs(tuple(inputs))
    masks = list(range(1 << module.num_modalities))
    with torch.no_grad():
        return module._evaluate(xs, masks)


def shapley_accuracy(
    outputs: Union[Tensor, Callable[[int], Tensor], nn.Module],
    labels: Tensor,
    masks: Optional[Sequence[int]] = None,
    num_modalities: Optional[int] = None,
    empty_accuracy: Optional[float] = None,
    metric: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    inputs: Optional[Sequence[Tensor]] = None,
) -> ShapleyAccuracy:
    """Shapley-value attribution of accuracy to each modality (BalanceBenchmark's imbalance metric).

    ``v(S)`` = accuracy of f(S) on the batch, and ``value_m = sum_{S not containing m} |S|!(M-|S|-1)!/M!
    (v(S + m) - v(S))`` over all 2^M subsets (exact weights from :func:`agm_fast.coalitions.shapley_weights`).

    The empty coalition: if f(empty) is available (mask 0 among ``masks``, or ``outputs`` is a callable, which is then
    called with mask 0 = every modality muted) its accuracy is used; otherwise the chance level ``1 / C``.
    ``empty_accuracy`` overrides both. Shapley values are linear in v, so the values of a whole evaluation set are
    the batch-size-weighted mean of per-batch values (or pass the concatenated outputs).

    Args:
        outputs: subset logits ``F [S, B, C]`` in the order of ``masks``; or a callable ``mask -> [B, C]`` that
            evaluates f on the given subset bitmask; or an :class:`agm_fast.AGM` / :class:`agm_fast.GradMod`, whose
            subset evaluation (its strategy and muting) then runs on ``inputs`` for all 2^M subsets, the empty one
            included. Its first (full-set) pass runs in the model's current mode: call ``model.eval()`` (or the
            encoders' and fusion's) first to measure eval-mode accuracies.
        labels: ``[B]`` int64 class indices (or whatever ``metric`` takes).
        masks: the S subset bitmasks of ``F``'s rows (bit m set = modality m present); every non-empty subset of
            the M modalities must be among them. Not used with a callable.
        num_modalities: M; needed with a callable, inferred from the largest mask otherwise.
        empty_accuracy: the value of the empty set, overriding f(empty) and the chance level.
        metric: ``metric(logits [..., B, C], labels [B]) -> [...]`` to attribute instead of the accuracy (it must
            reduce the batch dimension, the second to last of the logits).
        inputs: the M input tensors ``[B, ...]``, with an AGM / GradMod ``outputs`` only.

    Returns:
        :class:`ShapleyAccuracy` ``(values [M], accuracies [2^M])``, float64 on the logits' device.
    """
    score = metric if metric is not None else _accuracy
    if isinstance(outputs, nn.Module) and callable(getattr(outputs, "_evaluate", None)):
        masks = list(range(1 << outputs.num_modalities))
        F = _agm_subset_logits(outputs, inputs)
        M = outputs.num_modalities
    elif inputs is not None:
        raise ValueError("inputs: expected None unless outputs is an AGM or GradMod module")
    elif callable(outputs) and not isinstance(outputs, Tensor):
        if not isinstance(num_modalities, int) or num_modalities < 1:
            raise ValueError(f"num_modalities: expected M >= 1 with a callable, got {num_modalities!r}")
        M = num_modalities
        evaluate = list(range(0 if empty_accuracy is None else 1, 1 << M))
        F = torch.stack([outputs(mask) for mask in evaluate])
        masks = evaluate
    else:
        F = outputs
        if not isinstance(F, Tensor) or F.dim() != 3:
            shape = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
            raise ValueError(f"outputs: expected subset logits [S, B, C] or a callable, got {shape}")
        if masks is None:
            raise ValueError("masks: expected the subset bitmask of each row of outputs, got None")
        masks = [int(m) for m in masks]
        if len(masks) != F.shape[0]:
            raise ValueError(f"masks: expected {F.shape[0]} entries (one per row of outputs), got {len(masks)}")
        if len(set(masks)) != len(masks) or min(masks) < 0:
            raise ValueError(f"masks: expected distinct non-negative bitmasks, got {masks}")
        M = num_modalities if num_modalities is not None else max(masks).bit_length()
        if M < 1 or max(masks) >= 1 << M:
            raise ValueError(f"masks: expected bitmasks of num_modalities={M} modalities, got {masks}")
    missing = [m for m in range(1, 1 << M) if m not in masks]
    if missing:
        raise ValueError(f"outputs: expected every non-empty subset of the {M} modalities, got none for {missing}")
    if not isinstance(labels, Tensor) or labels.shape[0] != F.shape[1]:
        raise ValueError(f"labels: expected a [B] tensor with B = {F.shape[1]}, got {type(labels).__name__}")
    if metric is None:
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"labels: expected [B] int64 class indices, got {labels.dtype} {tuple(labels.shape)}")

    with torch.no_grad():
        per_subset = score(F.detach(), labels).to(torch.float64).reshape(-1)
    if per_subset.numel() != F.shape[0]:
        raise ValueError(f"metric: expected one value per subset ([{F.shape[0]}]), got {per_subset.numel()}")
    acc = torch.empty(1 << M, dtype=torch.float64, device=F.device)
    acc[torch.tensor(masks, device=F.device)] = per_subset
    if empty_accuracy is not None:
        acc[0] = float(empty_accuracy)
    elif 0 not in masks:
        acc[0] = 1.0 / F.shape[-1]
    W = shapley_weights(M, list(range(1 << M))).to(F.device)
    return ShapleyAccuracy(values=W @ acc, accuracies=acc)
