"""Epoch hooks with data: a method asks for a feature pass over the training or validation data at the start or end
of an epoch, and may change parameters when it ends.

A method returns :class:`EpochPass` requests from ``Method.epoch_passes(epoch)``; :func:`run_epoch_passes` (called by
the CLI, the Lightning and HF callbacks and a plain loop) runs each one: ``Method.begin_pass`` gives the zero sums,
every batch goes through the encoders (and the fusion head if asked) under ``torch.no_grad``, ``Method.pass_batch``
returns its sums, which are added up; the totals are reduced over the process group in one collective and
``Method.finish_pass`` gets them (and may change parameters, still without gradients). Under DDP each rank passes
over its own shard, and the reduced sums are what one process gets on all the data. A method that requests nothing
costs one call per epoch start and end: no data is read, no random stream is used. docs/training-at-scale.md,
"Epoch passes with data", has the details.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import distributed, sharding
from ..validation import split_batch

__all__ = ["EpochPass", "PassBatch", "PassReport", "SPLITS", "WHEN", "run_epoch_passes", "split_pass_batch"]

SPLITS = ("train", "val")
WHEN = ("start", "end")


class EpochPass(NamedTuple):
    """One pass a method asks for.

    Attributes:
        split: ``"train"`` or ``"val"``: which data the trainer passes over.
        when: ``"start"`` (before the epoch's first step) or ``"end"`` (after its last step and validation).
        fraction: the share of the loader's batches to pass over, in (0, 1]: the first ``max(1, floor(n *
            fraction))`` of its n batches (a shuffled loader gives a random subset).
        outputs: also run the fusion head (``PassBatch.logits``).
        train_mode: keep the encoders and the fusion head in train mode (default: eval mode, restored after).
    """

    split: str
    when: str
    fraction: float = 1.0
    outputs: bool = False
    train_mode: bool = False


class PassBatch(NamedTuple):
    """One batch of a pass, as ``Method.pass_batch`` receives it (no tensor requires grad).

    Attributes:
        features: the M encoder features ``[B, ...]``.
        logits: ``[B, C]`` the fusion head's output (only if the request asked for ``outputs``), else None.
        target: ``[B]`` the targets.
        index: the batch's number in the pass (from 0).
    """

    features: List[Tensor]
    logits: Optional[Tensor]
    target: Tensor
    index: int


class PassReport(NamedTuple):
    """What :func:`run_epoch_passes` did.

    Attributes:
        passes: how many passes ran.
        batches: how many batches they read (this rank).
        rows: how many rows they read (this rank).
        seconds: wall time of the passes (finish steps included).
    """

    passes: int
    batches: int
    rows: int
    seconds: float


LoaderLike = Union[Iterable, Callable[[], Iterable], None]


def check_pass(request: Any, name: str = "request") -> EpochPass:
    """``request`` checked (a clear error names the field)."""
    if not isinstance(request, EpochPass):
        raise TypeError(f"{name}: expected an agm_fast.methods.epoch_data.EpochPass, got {type(request).__name__}")
    if request.split not in SPLITS:
        raise ValueError(f"{name}.split: expected one of {SPLITS}, got {request.split!r}")
    if request.when not in WHEN:
        raise ValueError(f"{name}.when: expected one of {WHEN}, got {request.when!r}")
    f = request.fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ValueError(f"{name}.fraction: expected a number in (0, 1], got {f!r}")
    return request


# One reader of batch layouts for the passes, the validation metrics and the trainers.
split_pass_batch = split_batch


def _loader(loader: LoaderLike, split: str, method, epoch: int, when: str) -> Iterable:
    if callable(loader) and not hasattr(loader, "__iter__"):
        loader = loader()
    if loader is None:
        raise ValueError(
            f"{split}: {method.name or type(method).__name__} asks for a pass over the {split} data at the {when} "
            f"of epoch {epoch}; expected a loader of the {split} data, got None"
        )
    return loader


def _count(loader: Iterable, fraction: float, split: str) -> Optional[int]:
    if fraction >= 1:
        return None
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{split}: a pass over a fraction {fraction} of the batches needs a loader with len(), got "
                        f"{type(loader).__name__}") from None
    return max(1, math.floor(n * fraction + 1e-9))


def _modules(method) -> List[torch.nn.Module]:
    return list(method.encoders) + [method.fusion]


def _device_of(method) -> torch.device:
    for module in _modules(method):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def _reduce(sums: Dict[str, Tensor], process_group) -> Dict[str, Tensor]:
    """Every sum over the ranks, packed in one collective per dtype."""
    if not sums or not distributed.is_active(process_group):
        return sums
    out: Dict[str, Tensor] = {}
    by_dtype: Dict[Tuple[torch.dtype, torch.device], List[str]] = {}
    for k, v in sums.items():
        by_dtype.setdefault((v.dtype, v.device), []).append(k)
    for keys in by_dtype.values():
        flat = torch.cat([sums[k].reshape(-1) for k in keys])
        total = distributed.all_reduce_sum(flat, process_group, async_op=False).wait()
        start = 0
        for k in keys:
            n = sums[k].numel()
            out[k] = total[start:start + n].view_as(sums[k])
            start += n
    return out


def _one_pass(method, request: EpochPass, loader: Iterable, epoch: int, device, process_group) -> Tuple[int, int]:
    limit = _count(loader, request.fraction, request.split)
    modules = _modules(method)
    modes = [m.training for m in modules]
    sums: Dict[str, Tensor] = dict(method.begin_pass(request, epoch, device) or {})
    batches = rows = 0
    try:
        for module in modules:
            module.train(request.train_mode)
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if limit is not None and index >= limit:
                    break
                inputs, target = split_pass_batch(batch)
                inputs = [x.to(device, non_blocking=True) for x in inputs]
                target = target.to(device, non_blocking=True)
                feats = method.encode(inputs)
                logits = method.head(feats) if request.outputs else None
                part = method.pass_batch(request, PassBatch(feats, logits, target, index))
                for k, v in (part or {}).items():
                    if not isinstance(v, Tensor):
                        raise TypeError(f"pass_batch: expected a dict of tensors, got {type(v).__name__} for {k!r}")
                    sums[k] = v.detach().clone() if k not in sums else sums[k] + v.detach()
                batches += 1
                rows += int(target.shape[0])
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
            # FSDP2: a forward without gradients leaves a root unit gathered; the finish step (which may change the
            # parameters) and the next forward need its sharded parameters.
            sharding.reshard(module)
    with torch.no_grad():
        method.finish_pass(request, epoch, _reduce(sums, process_group), process_group)
    return batches, rows


def run_epoch_passes(
    method,
    epoch: int,
    when: str,
    train: LoaderLike = None,
    val: LoaderLike = None,
    *,
    device: Optional[torch.device] = None,
    process_group=None,
) -> Optional[PassReport]:
    """Run the passes ``method`` asks for at ``when`` (``"start"`` or ``"end"``) of ``epoch``.

    Args:
        method: the :class:`agm_fast.methods.Method`.
        epoch: the epoch (from 0).
        when: ``"start"`` or ``"end"``.
        train, val: the loaders of the training and validation data (this rank's shard under DDP), or zero-argument
            callables that return them (called only when a pass needs them), or None.
        device: where the batches go (default: the device of the encoders' first parameter).
        process_group: the group the sums are reduced over (None: the default group when ``torch.distributed`` is
            initialised).

    Returns:
        :class:`PassReport`, or None when the method asked for nothing at ``when``.
    """
    if when not in WHEN:
        raise ValueError(f"when: expected one of {WHEN}, got {when!r}")
    requests = [check_pass(r, f"epoch_passes({epoch})[{i}]") for i, r in enumerate(method.epoch_passes(epoch))]
    requests = [r for r in requests if r.when == when]
    if not requests:
        return None
    t0 = time.perf_counter()
    device = _device_of(method) if device is None else torch.device(device)
    batches = rows = 0
    # Every loader is resolved before the first pass runs: a missing one fails before any state changes.
    loaders = {}
    for request in requests:
        if request.split not in loaders:
            source = train if request.split == "train" else val
            loaders[request.split] = _loader(source, request.split, method, epoch, when)
    for request in requests:
        b, r = _one_pass(method, request, loaders[request.split], epoch, device, process_group)
        batches += b
        rows += r
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return PassReport(len(requests), batches, rows, time.perf_counter() - t0)
