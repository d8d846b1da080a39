"""Tests of agm_fast.distributed: no-ops without a process group, and over 2 gloo ranks spawned by the test the
global statistics equal a single process's on the concatenated batch."""

import datetime
import queue
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from agm_fast import distributed as D
from agm_fast.ops.ogm_scores import ogm_coefficients_torch, ogm_scores_torch
from agm_fast.ops.shapley import agm_scores_torch

WORLD = 2
SPAWN_TIMEOUT_S = 60.0
# Per-rank batch shards of unequal size, so that a plain average of the per-rank means would be wrong.
SHARD_SIZES = (5, 3)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    error = None
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )
        fn(rank, world)
    except BaseException:
        error = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.put((rank, error))


def _spawn(fn, world: int = WORLD, timeout: float = SPAWN_TIMEOUT_S) -> None:
    """Run ``fn(rank, world)`` in ``world`` fresh processes joined in a gloo group; fail with every rank's error."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    errors, reported = {}, set()
    try:
        while len(reported) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, error = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                continue
            reported.add(rank)
            if error is not None:
                errors[rank] = error
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
        results.join_thread()
    missing = sorted(set(range(world)) - reported)
    message = "".join(f"\nrank {r}:\n{e}" for r, e in sorted(errors.items()))
    if missing:
        message += f"\nranks {missing} did not report within {timeout:.0f} s (exit codes {[p.exitcode for p in procs]})"
    assert not errors and not missing, message


def _shard(x: torch.Tensor, rank: int, dim: int = 0) -> torch.Tensor:
    start = sum(SHARD_SIZES[:rank])
    return x.narrow(dim, start, SHARD_SIZES[rank])


def _gathered_equal(t: torch.Tensor) -> bool:
    """Whether ``t`` is bitwise the same on every rank."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    # Compare bit patterns, so that NaNs in the same places count as equal.
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}[t.dtype]
    return all(torch.equal(parts[0].view(bits), p.view(bits)) for p in parts[1:])


def _fsdp_like_shards(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s piece of the flattened tensor when it is cut like FSDP's ``torch.chunk`` (may be empty)."""
    flat = full.reshape(-1)
    size = -(-flat.numel() // world)
    return flat[rank * size : (rank + 1) * size]


def _check_collectives(rank: int, world: int) -> None:
    assert D.is_active() and D.is_active(dist.group.WORLD)
    gen = torch.Generator().manual_seed(1234)
    B, M, C = sum(SHARD_SIZES), 3, 4

    # AGM: per-sample scores of the mono-modal outputs; the global mean is the single-process batch mean.
    psi = torch.randn(M, B, C, generator=gen)
    labels = torch.randint(0, C, (B,), generator=gen)
    local_psi, local_labels = _shard(psi, rank, 1), _shard(labels, rank)
    local_mean = agm_scores_torch(local_psi, local_labels)
    count = torch.tensor(float(SHARD_SIZES[rank]))
    before = local_mean.clone()
    scores = D.global_mean_scores(local_mean, count)
    assert_close(scores, agm_scores_torch(psi, labels))
    assert scores.dtype == torch.float32
    assert torch.equal(local_mean, before)
    assert _gathered_equal(scores)
    handle = D.global_mean_scores(local_mean, count, async_op=True)
    assert isinstance(handle, D.ReduceHandle)
    assert torch.equal(handle.wait(), scores)
    assert torch.equal(D.global_mean_scores(local_mean, SHARD_SIZES[rank]), scores)
    # float64, per-modality counts, and an integer count.
    x64 = torch.randn(B, M, generator=gen, dtype=torch.float64)
    local64 = _shard(x64, rank)
    out64 = D.global_mean_scores(local64.mean(0), torch.full((M,), float(SHARD_SIZES[rank]), dtype=torch.float64))
    assert out64.dtype == torch.float64
    assert_close(out64, x64.mean(0), rtol=1e-12, atol=1e-12)
    assert_close(D.global_mean_scores(local64.mean(0), torch.tensor(SHARD_SIZES[rank])), x64.mean(0))
    # A non-finite score on one rank reaches every rank (so every rank skips the same AMP step) ...
    poisoned = local_mean.clone()
    if rank == 1:
        poisoned[2] = float("inf")
    out = D.global_mean_scores(poisoned, count)
    assert torch.isfinite(out[:2]).all() and not torch.isfinite(out[2])
    # ... but a rank with no samples contributes nothing, whatever its (undefined) mean holds.
    empty_mean = torch.full((M,), float("nan")) if rank == 1 else local_mean
    empty_count = torch.tensor(0.0) if rank == 1 else count
    out = D.global_mean_scores(empty_mean, empty_count)
    expected = agm_scores_torch(_shard(psi, 0, 1), _shard(labels, 0))
    assert_close(out, expected)

    # OGM: softmax-at-label sums; the coefficients from the summed scores are the single-process coefficients.
    logits = torch.randn(2, B, C, generator=gen)
    local_sums, _ = ogm_scores_torch(_shard(logits, rank, 1), local_labels, 0.8)
    full_sums, full_coeffs = ogm_scores_torch(logits, labels, 0.8)
    sums = D.global_sums(local_sums)
    assert_close(sums, full_sums)
    assert_close(ogm_coefficients_torch(sums, 0.8), full_coeffs)
    assert _gathered_equal(sums)
    # CGGM: correct and total counts per modality, integers, exact.
    hits = torch.randint(0, 2, (M, B), generator=gen)
    local_counts = torch.stack([_shard(hits, rank, 1).sum(1), torch.full((M,), SHARD_SIZES[rank])])
    assert torch.equal(D.global_sums(local_counts), torch.stack([hits.sum(1), torch.full((M,), B)]))
    assert torch.equal(D.global_sums(local_counts, async_op=True).wait(), D.global_sums(local_counts))

    # all_reduce_sum reduces a clone and leaves the caller's tensor alone.
    t = torch.arange(6.0).view(2, 3) * (rank + 1)
    handle = D.all_reduce_sum(t)
    reduced = handle.wait()
    assert reduced is not t and reduced is handle.wait()
    assert torch.equal(reduced, torch.arange(6.0).view(2, 3) * sum(range(1, world + 1)))
    assert torch.equal(t, torch.arange(6.0).view(2, 3) * (rank + 1))
    assert torch.equal(D.all_reduce_sum(t, async_op=False).wait(), reduced)

    # broadcast_seed: rank src's seed on every rank, the full uint64 range included.
    assert D.broadcast_seed(1000 + rank) == 1000
    assert D.broadcast_seed(1000 + rank, src=1) == 1001
    assert D.broadcast_seed(2**64 - 1 if rank == 0 else 7) == 2**64 - 1
    assert D.broadcast_seed(2**63 + rank) == 2**63

    # sharded_std: tensors cut like FSDP's flat shards (one of them leaves rank 1 empty) give torch.std of the
    # whole tensor, bitwise the same on every rank, and the offsets tile the flattened tensor.
    for dtype in (torch.float64, torch.float32):
        fulls = [
            torch.randn(7, generator=gen, dtype=dtype) * 3 + 1,
            torch.randn(5, 3, generator=gen, dtype=dtype),
            torch.randn(1, generator=gen, dtype=dtype),
            torch.randn(2, generator=gen, dtype=dtype) + 100,
            torch.randn(4, 2, 3, generator=gen, dtype=dtype) * 1e-3,
        ]
        shards = [_fsdp_like_shards(f, rank, world) for f in fulls]
        assert shards[2].numel() == (1 if rank == 0 else 0)
        std, offsets = D.sharded_std(shards, return_offsets=True)
        assert std.dtype == dtype
        # fulls[2] has one element: its std is NaN, as torch.std's.
        assert torch.isnan(std[2])
        keep = [0, 1, 3, 4]
        assert_close(std[keep], torch.stack([fulls[i].std() for i in keep]))
        assert _gathered_equal(std)
        # Rank r's shard starts after the elements of ranks 0..r-1 (an empty trailing shard at the tensor's end).
        starts = torch.tensor([min(rank * -(-f.numel() // world), f.numel()) for f in fulls])
        assert torch.equal(offsets, starts)
        assert offsets.dtype == torch.int64
        for f, s, o in zip(fulls, shards, offsets.tolist()):
            assert torch.equal(f.reshape(-1)[o : o + s.numel()], s)
    # bf16 shards are reduced in float32.
    full = torch.randn(9, generator=gen)
    std = D.sharded_std([_fsdp_like_shards(full.to(torch.bfloat16), rank, world)])
    assert std.dtype == torch.float32
    assert_close(std, full.to(torch.bfloat16).float().std().reshape(1))

    # The same reductions inside a compiled function (functional collectives) give the eager results.
    def step(mean, cnt, sums_in, grads):
        return D.global_mean_scores(mean, cnt), D.global_sums(sums_in), D.sharded_std(grads)

    grads = [_fsdp_like_shards(f, rank, world) for f in fulls[:2]]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(local_mean, count, local_sums, grads), step(local_mean, count, local_sums, grads)):
        assert_close(got, want, rtol=0, atol=0)


def _check_subgroup(rank: int, world: int) -> None:
    only0 = dist.new_group([0])
    both = dist.new_group([0, 1])
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(sum(SHARD_SIZES), 3, generator=gen)
    local = _shard(x, rank)
    local_mean, count = local.mean(0), torch.tensor(float(local.shape[0]))

    # A group of one (rank 0) and a rank outside it (rank 1) have nothing to reduce: each keeps its own values.
    assert not D.is_active(only0)
    assert D.global_mean_scores(local_mean, count, only0) is local_mean
    assert D.global_sums(local_mean, only0) is local_mean
    assert D.all_reduce_sum(local_mean, only0).wait() is local_mean
    assert D.broadcast_seed(50 + rank, only0) == 50 + rank
    std, offsets = D.sharded_std([local], only0, return_offsets=True)
    assert_close(std, local.std().reshape(1))
    assert torch.equal(offsets, torch.zeros(1, dtype=torch.int64))

    # An explicit group of both ranks reduces over both, and collectives on the world group still line up after.
    assert D.is_active(both)
    assert_close(D.global_mean_scores(local_mean, count, both), x.mean(0))
    assert_close(D.global_sums(local.sum(0), both), x.sum(0))
    assert D.broadcast_seed(50 + rank, both, src=1) == 51
    assert_close(D.sharded_std([local], both), x.std().reshape(1))
    assert_close(D.global_mean_scores(local_mean, count), x.mean(0))


def test_noop_without_process_group():
    assert not dist.is_initialized()
    assert not D.is_active()
    t = torch.randn(3)
    assert D.all_reduce_sum(t).wait() is t
    assert D.all_reduce_sum(t, async_op=False).wait() is t
    assert D.global_mean_scores(t, torch.tensor(4.0)) is t
    assert D.global_mean_scores(t, torch.tensor(4.0), async_op=True).wait() is t
    assert D.global_mean_scores(t, 4) is t
    assert D.global_sums(t) is t
    assert D.global_sums(t, async_op=True).wait() is t
    assert D.broadcast_seed(123) == 123
    assert D.broadcast_seed(2**64 - 1) == 2**64 - 1
    gathered = D.all_gather(t)
    assert gathered.shape == (1, 3) and torch.equal(gathered[0], t)
    xs = [torch.randn(5, 4), torch.randn(1), torch.randn(0), torch.randn(3, dtype=torch.bfloat16)]
    std, offsets = D.sharded_std(xs, return_offsets=True)
    assert std.dtype == torch.float32
    assert_close(std[0], xs[0].std())
    assert torch.isnan(std[1]) and torch.isnan(std[2])
    assert_close(std[3], xs[3].float().std())
    assert torch.equal(offsets, torch.zeros(4, dtype=torch.int64))
    assert D.sharded_std([x.double() for x in xs[:1]]).dtype == torch.float64
    moments = D.shard_moments(xs)
    assert moments.shape == (4, 3) and moments.dtype == torch.float64
    assert_close(
        moments[0], torch.stack([torch.tensor(20.0), xs[0].mean(), ((xs[0] - xs[0].mean()) ** 2).sum()]).double()
    )
    assert torch.equal(moments[2], torch.zeros(3, dtype=torch.float64))

    def step(mean, cnt, grads):
        return D.global_mean_scores(mean, cnt) * 2, D.global_sums(mean) + 1, D.sharded_std(grads)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(t, torch.tensor(4.0), xs[:2]), step(t, torch.tensor(4.0), xs[:2])):
        assert_close(got, want, equal_nan=True)


def test_bad_input_errors():
    with pytest.raises(TypeError, match="process_group"):
        D.is_active("world")
    with pytest.raises(TypeError, match="tensor"):
        D.all_reduce_sum([1.0, 2.0])
    with pytest.raises(ValueError, match="local_mean"):
        D.global_mean_scores(torch.zeros(2, 2), torch.tensor(1.0))
    with pytest.raises(ValueError, match="local_mean"):
        D.global_mean_scores(torch.zeros(2, dtype=torch.int64), torch.tensor(1.0))
    with pytest.raises(ValueError, match="local_count"):
        D.global_mean_scores(torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="local_count"):
        D.global_mean_scores(torch.zeros(3), torch.ones(3, 1))
    with pytest.raises(ValueError, match="local_count"):
        D.global_mean_scores(torch.zeros(3), torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="local_count"):
        D.global_mean_scores(torch.zeros(3), -1)
    with pytest.raises(TypeError, match="local_count"):
        D.global_mean_scores(torch.zeros(3), None)
    with pytest.raises(TypeError, match="seed"):
        D.broadcast_seed(1.5)
    with pytest.raises(TypeError, match="seed"):
        D.broadcast_seed(True)
    with pytest.raises(ValueError, match="seed"):
        D.broadcast_seed(-1)
    with pytest.raises(ValueError, match="seed"):
        D.broadcast_seed(2**64)
    with pytest.raises(ValueError, match="src"):
        D.broadcast_seed(1, src=-1)
    with pytest.raises(TypeError, match="shards"):
        D.sharded_std(torch.zeros(3))
    with pytest.raises(ValueError, match="shards"):
        D.sharded_std([])
    with pytest.raises(TypeError, match=r"shards\[1\]"):
        D.sharded_std([torch.zeros(3), torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"shards\[1\]"):
        D.sharded_std([torch.zeros(3), torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match="local"):
        D.merge_moments(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="^local: expected a torch.Tensor"):
        D.all_gather([1.0])


def _check_two_ranks(rank: int, world: int) -> None:
    _check_collectives(rank, world)
    _check_subgroup(rank, world)


def test_two_ranks_match_single_process_and_respect_process_group():
    # One spawn for both sets of checks: starting two processes costs more than the checks themselves.
    _spawn(_check_two_ranks)
