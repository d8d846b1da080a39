"""Process-group helpers that make the balancing methods see the global batch under data parallelism.

Each method reduces the few statistics its coefficients depend on, so every rank computes what one process computes
on the global batch: AGM's score sums and counts (:func:`global_mean_scores`, 2M numbers), OGM's softmax-at-label
sums and CGGM's correct / total counts (:func:`global_sums`). :func:`broadcast_seed` gives every rank the same noise
seed; :func:`sharded_std` merges per-shard moments into the std of a whole FSDP-sharded gradient; :func:`all_gather`
gives every rank every rank's small vector (AMSS's statistics and sharded channel energies).

Nothing is communicated when ``torch.distributed`` is not initialised, the rank is not in the group, or the group
has one rank (:func:`is_active` is False). The reductions never read a value on the host, and inside
``torch.compile`` they use the traceable functional collectives. docs/training-at-scale.md has the details.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "ReduceHandle",
    "is_active",
    "all_reduce_sum",
    "global_mean_scores",
    "global_sums",
    "mean_over_ranks_",
    "all_gather",
    "broadcast_seed",
    "shard_moments",
    "merge_moments",
    "sharded_std",
]

_SEED_LIMIT = 1 << 64
_INT64_WRAP = 1 << 63


def _non_member(process_group) -> bool:
    # new_group() hands ranks outside the group a sentinel rather than a ProcessGroup; those ranks do nothing.
    return isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER


def _check_group(process_group) -> None:
    if process_group is None or not dist.is_available() or _non_member(process_group):
        return
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group: expected a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}"
        )


def _check_tensor(tensor, name: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")


def is_active(process_group: Optional["ProcessGroup"] = None) -> bool:
    """Whether a reduction over ``process_group`` has anything to do.

    Args:
        process_group: the group to reduce over; None means the default (world) group.

    Returns:
        True when ``torch.distributed`` is available and initialised, this rank is a member of the group, and the
        group has more than one rank. Everything in this module is a no-op when it is False.
    """
    _check_group(process_group)
    if not dist.is_available() or not dist.is_initialized():
        return False
    if _non_member(process_group):
        return False
    # get_world_size is -1 on a rank outside the group and 1 for a group of one: nothing to reduce in either case.
    return dist.get_world_size(process_group) > 1


def _world(process_group):
    return dist.group.WORLD if process_group is None else process_group


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics are reduced in float32 (float64 stays float64) whatever the autocast or gradient dtype.
    return torch.float64 if dtype == torch.float64 else torch.float32


class ReduceHandle:
    """A reduction that may still be in flight. :meth:`wait` returns its result.

    On NCCL, :meth:`wait` makes the current CUDA stream wait for the collective: the host does not block, and
    kernels queued afterwards see the reduced values. On gloo it blocks the host until the reduction is done.
    """

    def __init__(self, result: Tensor, work=None, finish: Optional[Callable[[Tensor], Tensor]] = None):
        self._result = result
        self._work = work
        self._finish = finish

    def wait(self) -> Tensor:
        """Wait for the reduction (a stream wait on NCCL) and return the result. Calling it again is free."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._finish is not None:
            self._result = self._finish(self._result)
            self._finish = None
        return self._result


def _reduce(buffer: Tensor, process_group, async_op: bool, finish=None) -> ReduceHandle:
    """Sum ``buffer`` over the group, in place on ``buffer`` (which the caller owns); ``finish`` maps the sum to
    the result when it is waited for."""
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        # The functional collective is traceable; the compiled graph places its wait where the sum is first used.
        return ReduceHandle(funcol.all_reduce(buffer, "sum", _world(process_group)), finish=finish)
    work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group, async_op=async_op)
    return ReduceHandle(buffer, work if async_op else None, finish)


def all_reduce_sum(
    tensor: Tensor, process_group: Optional["ProcessGroup"] = None, async_op: bool = True
) -> ReduceHandle:
    """Sum a tensor over the ranks of a group, without touching the caller's tensor.

    Args:
        tensor: any shape and dtype the backend reduces (gloo: CPU tensors; NCCL: CUDA tensors).
        process_group: the group; None means the default group.
        async_op: issue the collective asynchronously; :meth:`ReduceHandle.wait` completes it.

    Returns:
        A :class:`ReduceHandle` whose ``wait()`` gives the sum, same shape and dtype as ``tensor``, reduced on a
        clone. When :func:`is_active` is False, ``wait()`` returns ``tensor`` itself.
    """
    _check_tensor(tensor, "tensor")
    if not is_active(process_group):
        return ReduceHandle(tensor)
    return _reduce(tensor.clone(), process_group, async_op)


def global_mean_scores(
    local_mean: Tensor,
    local_count: Union[Tensor, int, float],
    process_group: Optional["ProcessGroup"] = None,
    async_op: bool = False,
) -> Union[Tensor, ReduceHandle]:
    """The global-batch mean of per-sample scores, from each rank's mean over its shard.

    Every rank contributes ``local_mean * local_count`` and ``local_count`` packed in one tensor of 2M numbers, so
    one collective gives ``sum_r mean_r n_r / sum_r n_r`` on every rank: the batch mean a single process computes
    on the concatenated batch (AGM's scores ``s_m``). A rank with ``local_count == 0`` contributes nothing, even if
    its mean is NaN; a non-finite mean on a rank that has samples makes the global mean non-finite on every rank,
    so every rank skips the same AMP step.

    Args:
        local_mean: ``[M]`` per-modality mean score over this rank's samples.
        local_count: the number of samples behind it: a Python number (the batch size is host metadata, and it is
            written on the device without a copy), a 0-d or ``[1]`` tensor (the same count for every modality) or
            ``[M]`` (one per modality), on ``local_mean``'s device, any real dtype.
        process_group: the group; None means the default group.
        async_op: return a :class:`ReduceHandle` instead of waiting.

    Returns:
        ``[M]`` global mean, float32 (float64 for float64 input; NaN where the total count is 0), or a handle whose
        ``wait()`` gives it. When :func:`is_active` is False, ``local_mean`` itself (or a handle that returns it).
    """
    _check_tensor(local_mean, "local_mean")
    if local_mean.dim() != 1 or not local_mean.is_floating_point():
        raise ValueError(
            f"local_mean: expected a 1-D floating-point tensor [M], got shape {tuple(local_mean.shape)} and "
            f"dtype {local_mean.dtype}"
        )
    M = local_mean.shape[0]
    if isinstance(local_count, bool) or not isinstance(local_count, (Tensor, int, float)):
        raise TypeError(f"local_count: expected a tensor or a number, got {type(local_count).__name__}")
    if not isinstance(local_count, Tensor):
        if not local_count >= 0:
            raise ValueError(f"local_count: expected a number >= 0, got {local_count}")
        local_count = torch.full((), float(local_count), dtype=_stat_dtype(local_mean.dtype), device=local_mean.device)
    if local_count.numel() not in (1, M) or local_count.dim() > 1 or local_count.is_complex():
        raise ValueError(
            f"local_count: expected a real 0-d, [1] or [M] = [{M}] tensor, got shape {tuple(local_count.shape)} and "
            f"dtype {local_count.dtype}"
        )
    if local_count.device != local_mean.device:
        raise ValueError(
            f"local_count: expected a tensor on {local_mean.device} (as local_mean), got {local_count.device}"
        )
    if not is_active(process_group):
        return ReduceHandle(local_mean) if async_op else local_mean
    dt = _stat_dtype(local_mean.dtype)
    count = local_count.to(dt).reshape(-1).expand(M)
    weighted = torch.where(count > 0, local_mean.to(dt) * count, torch.zeros_like(count))
    packed = torch.cat([weighted, count])

    def finish(total: Tensor) -> Tensor:
        return total[:M] / total[M:]

    handle = _reduce(packed, process_group, async_op, finish)
    return handle if async_op else handle.wait()


def global_sums(
    tensor: Tensor, process_group: Optional["ProcessGroup"] = None, async_op: bool = False
) -> Union[Tensor, ReduceHandle]:
    """Sum per-rank statistics over the group: OGM's softmax-at-label sums ``[M]``, CGGM's correct and total
    counts.

    Args:
        tensor: the local statistics, any shape (not modified).
        process_group: the group; None means the default group.
        async_op: return a :class:`ReduceHandle` instead of waiting.

    Returns:
        The sum over ranks (same shape and dtype), or a handle whose ``wait()`` gives it. When :func:`is_active` is
        False, ``tensor`` itself (or a handle that returns it).
    """
    handle = all_reduce_sum(tensor, process_group, async_op=async_op)
    return handle if async_op else handle.wait()


def mean_over_ranks_(
    tensors: Sequence[Tensor], process_group: Optional["ProcessGroup"] = None, count: Union[int, float, None] = None
) -> None:
    """Replace each tensor, in place, by its mean over the ranks of the group, with one collective for all.

    Without ``count`` it is the plain mean ``sum_r t_r / W`` (what DDP does to the model's gradients: a method's own
    heads trained by the same loss); with ``count`` (this rank's number of samples) it is the count-weighted mean
    ``sum_r n_r t_r / sum_r n_r``: the gradient of a global-batch mean from per-rank means, exact for unequal local
    batches.

    Args:
        tensors: floating-point tensors (e.g. ``.grad`` of a method's heads), reduced in float32 (float64 stays).
        process_group: the group; None means the default group.
        count: this rank's sample count (a Python number: host metadata, written on the device without a copy).

    Nothing happens when :func:`is_active` is False.
    """
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        _check_tensor(t, f"tensors[{i}]")
    if not tensors or not is_active(process_group):
        return
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.detach().reshape(-1).to(dt) for t in tensors])
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not count >= 0:
            raise ValueError(f"count: expected a number >= 0, got {count!r}")
        flat = torch.cat([flat * count, torch.full((1,), float(count), dtype=dt, device=flat.device)])
    total = _reduce(flat, process_group, async_op=False).wait()
    if count is None:
        total = total / dist.get_world_size(process_group)
    else:
        total = total[:-1] / total[-1]
    chunks = total.split([t.numel() for t in tensors])
    with torch.no_grad():
        torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors)])


def all_gather(local: Tensor, process_group: Optional["ProcessGroup"] = None) -> Tensor:
    """Every rank's ``local`` (the same shape on every rank), stacked in group-rank order, with one collective.

    Args:
        local: this rank's tensor (gloo: on the CPU; NCCL: on the GPU).
        process_group: the group; None means the default group.

    Returns:
        ``[W, *local.shape]``. When :func:`is_active` is False, ``local[None]``.
    """
    _check_tensor(local, "local")
    if not is_active(process_group):
        return local.unsqueeze(0)
    flat = local.reshape(1) if local.dim() == 0 else local
    return _all_gather(flat, process_group).view((-1,) + tuple(local.shape))


def _comm_device(process_group) -> torch.device:
    # NCCL only moves CUDA tensors; gloo, MPI and the "cpu:gloo,cuda:nccl" combination take CPU tensors.
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_seed(seed: int, process_group: Optional["ProcessGroup"] = None, src: int = 0) -> int:
    """Give every rank of the group rank ``src``'s seed.

    Called once, when a class that draws noise is constructed: it reads the result on the host (a synchronising
    collective), which is fine there and nowhere else.

    Args:
        seed: this rank's seed, an int in ``[0, 2**64)``.
        process_group: the group; None means the default group.
        src: the global rank whose seed wins; it must belong to the group.

    Returns:
        Rank ``src``'s seed. When :func:`is_active` is False, ``seed`` itself.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed}")
    if isinstance(src, bool) or not isinstance(src, int) or src < 0:
        raise ValueError(f"src: expected an int >= 0 (a global rank), got {src!r}")
    if not is_active(process_group):
        return seed
    # int64 carries the full uint64 range in two's complement.
    wire = seed - _SEED_LIMIT if seed >= _INT64_WRAP else seed
    buf = torch.tensor([wire], dtype=torch.int64, device=_comm_device(process_group))
    dist.broadcast(buf, src=src, group=process_group)
    value = int(buf.item())
    return value + _SEED_LIMIT if value < 0 else value


def shard_moments(shards: Sequence[Tensor]) -> Tensor:
    """Per-shard ``(count, mean, M2)`` of a list of local gradient shards, the input of :func:`merge_moments`.

    ``M2 = sum_i (x_i - mean)^2``. Each shard is reduced in float32 (float64 for float64 shards); the statistics
    are stored in float64 so that the counts stay exact and the merge loses nothing. An empty shard gives
    ``(0, 0, 0)``.

    Args:
        shards: T floating-point tensors of any shape (flattened), all on one device.

    Returns:
        ``[T, 3]`` float64 on the shards' device.
    """
    if isinstance(shards, Tensor) or not isinstance(shards, (list, tuple)):
        raise TypeError(f"shards: expected a list or tuple of tensors, got {type(shards).__name__}")
    if len(shards) == 0:
        raise ValueError("shards: expected at least one tensor, got none")
    device = None
    for i, s in enumerate(shards):
        _check_tensor(s, f"shards[{i}]")
        if not s.is_floating_point():
            raise TypeError(f"shards[{i}]: expected a floating-point tensor, got {s.dtype}")
        if device is None:
            device = s.device
        elif s.device != device:
            raise ValueError(f"shards[{i}] is on {s.device} but shards[0] is on {device}")
    rows = []
    for s in shards:
        n = s.numel()
        if n == 0:
            rows.append(torch.zeros(3, dtype=torch.float64, device=device))
            continue
        x = s.detach().reshape(-1).to(_stat_dtype(s.dtype))
        var, mean = torch.var_mean(x, correction=0)
        # torch.full writes the count in a kernel; a tensor built from a host list would be a host-to-device copy.
        count = torch.full((), float(n), dtype=torch.float64, device=device)
        rows.append(torch.stack([count, mean.to(torch.float64), var.to(torch.float64) * n]))
    return torch.stack(rows)


def _all_gather(local: Tensor, process_group) -> Tensor:
    """``[W, *local.shape]``: every rank's ``local``, in group-rank order."""
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        gathered = funcol.all_gather_tensor(local.contiguous(), 0, _world(process_group))
        return gathered.view((-1,) + tuple(local.shape))
    W = dist.get_world_size(process_group)
    # Gathered along dim 0 (the layout every backend accepts); all_gather_single is the newer name of the call.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    out = local.new_empty((W * local.shape[0],) + tuple(local.shape[1:]))
    gather(out, local.contiguous(), group=process_group)
    return out.view((W,) + tuple(local.shape))


def merge_moments(
    local: Tensor, process_group: Optional["ProcessGroup"] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge per-shard moments over the ranks of a group (Chan's parallel formula).

    One ``all_gather`` brings every rank's ``[T, 3]`` statistics; each rank then merges them in the same order
    with the same deterministic reductions, so every rank gets bitwise the same result:
    ``N = sum_r n_r``, ``mean = sum_r n_r mean_r / N``, ``M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2``.
    The shard of rank r starts at global element ``sum_{q<r} n_q`` (shards tile the flattened tensor in rank
    order, as FSDP's do).

    Args:
        local: ``[T, 3]`` float64 ``(count, mean, M2)`` of this rank's shards, from :func:`shard_moments`.
        process_group: the group; None means the default group.

    Returns:
        ``(count [T], mean [T], M2 [T], offset [T])``: float64 totals over the group and this rank's global
        element offset per tensor (int64). When :func:`is_active` is False, this rank's own statistics and
        zero offsets.
    """
    _check_tensor(local, "local")
    if local.dim() != 2 or local.shape[1] != 3 or local.dtype != torch.float64:
        raise ValueError(
            f"local: expected a float64 [T, 3] tensor from shard_moments, got shape {tuple(local.shape)} and dtype "
            f"{local.dtype}"
        )
    if not is_active(process_group):
        return local[:, 0], local[:, 1], local[:, 2], torch.zeros_like(local[:, 0], dtype=torch.int64)
    gathered = _all_gather(local, process_group)
    n, mean_r, m2_r = gathered.unbind(-1)
    total = n.sum(0)
    mean = torch.where(total > 0, (n * mean_r).sum(0) / total, torch.zeros_like(total))
    m2 = m2_r.sum(0) + (n * (mean_r - mean) ** 2).sum(0)
    rank = dist.get_rank(process_group)
    offset = (n[:rank].sum(0) if rank > 0 else torch.zeros_like(total)).to(torch.int64)
    return total, mean, m2, offset


def sharded_std(
    shards: Sequence[Tensor], process_group: Optional["ProcessGroup"] = None, return_offsets: bool = False
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-tensor unbiased std of tensors sharded over a group, from each rank's local shards.

    This is the ``std(g)`` of OGM-GE's noise under FSDP: rank r passes its shard of every modulated gradient
    (FSDP2: ``p.grad.to_local()``; FSDP with ``use_orig_params=True``: ``p.grad``), in the same order on every
    rank, and every rank receives the std of each whole gradient, bitwise the same, after one small all-gather.

    Args:
        shards: T floating-point local shards (any shape, possibly empty), all on one device.
        process_group: the group the tensors are sharded over; None means the default group.
        return_offsets: also return each shard's global element offset (the index of its first element in the
            flattened whole tensor), for keying the noise as the unsharded run does.

    Returns:
        ``std [T]`` (float32; float64 when every shard is float64): ``sqrt(M2 / (N - 1))``, NaN where ``N < 2``
        as ``torch.std``; with ``return_offsets``, ``(std, offset [T] int64)``. When :func:`is_active` is False,
        the std of each local tensor and zero offsets.
    """
    moments = shard_moments(shards)
    total, _, m2, offset = merge_moments(moments, process_group)
    dof = total - 1
    var = torch.where(dof > 0, m2 / dof, torch.full_like(m2, float("nan")))
    out_dtype = torch.float64 if all(s.dtype == torch.float64 for s in shards) else torch.float32
    std = var.sqrt().to(out_dtype)
    return (std, offset) if return_offsets else std
