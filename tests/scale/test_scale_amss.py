"""AMSS / AMSS+ under data parallelism over 2 gloo ranks spawned by the test.

DDP: each rank trains on its rows of the batch with gradients averaged over the ranks by hand (what DDP does; the
loss weighted by the rank's share of the global batch, so that unequal local batches average to the global mean), and
must take the decisions and reach the parameters of one process on the whole batch (computed in each rank with a
one-rank group). Each rank is given its own seed: rank 0's is the one used. FSDP2 (the equivalence itself is in
test_scale_fsdp.py): one all-gather per step, and a group other than the shards' is refused; gradient accumulation
under data parallelism is refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_distributed import _spawn
from torch import nn

import agm_fast
from agm_fast import distributed as agm_dist
from agm_fast import methods

B, C, DIMS, STEPS = 6, 5, (7, 4), 4
SPLITS = {"equal": (6, 6), "unequal": (5, 7)}
CHANNELS = 9 + 8  # output channels of the masked weights of each encoder


def _build(name, group, seed=3, shard=None):
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(d, 9), nn.ReLU(), nn.Linear(9, 8)) for d in DIMS]
    fusion = agm_fast.ConcatFusion([8, 8], C)
    if shard is not None:
        for module in [*encoders, fusion]:
            shard(module)
    method = methods.create(name, encoders, fusion, seed=seed, process_group=group)
    params = [p for m in [*encoders, fusion] for p in m.parameters()]
    return method, params, torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [([torch.randn(2 * B, d, generator=gen) for d in DIMS], torch.randint(0, C, (2 * B,), generator=gen))
            for _ in range(STEPS)]


def _train(name, group, rows, seed, data_parallel):
    method, params, optimizer = _build(name, group, seed)
    history = []
    for xs, y in _batches():
        N = len(y)
        if data_parallel:
            xs, y = [x[rows] for x in xs], y[rows]
        out = method.forward(xs, y, 0)
        optimizer.zero_grad(set_to_none=True)
        weight = len(y) * dist.get_world_size() / N if data_parallel else 1.0
        (method.loss(out, y) * weight).backward()
        if data_parallel:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        method.before_optimizer_step(out, y)
        optimizer.step()
        d = method.decisions()
        history.append((d["c"].clone(), d["kept"].clone(), [p.detach().clone() for p in params]))
    return history


def _check_ddp(rank: int, world: int) -> None:
    own = [dist.new_group([r]) for r in range(world)][rank]
    for name in ("amss", "amss_plus"):
        for case, split in SPLITS.items():
            start = sum(split[:rank])
            rows = slice(start, start + split[rank])
            want = _train(name, own, rows, 3, data_parallel=False)
            got = _train(name, None, rows, 3 + rank, data_parallel=True)
            for step, ((c, kept, ps), (wc, wkept, wps)) in enumerate(zip(got, want)):
                where = f"{name}, {case} local batches, step {step}"
                torch.testing.assert_close(c, wc, msg=lambda m: f"{where}, c: {m}")
                assert torch.equal(kept, wkept), f"{where}: kept {kept.tolist()}, one process {wkept.tolist()}"
                assert all(0 < k < CHANNELS for k in kept.tolist()), f"{where}: kept {kept.tolist()}"
                for i, (a, b) in enumerate(zip(ps, wps)):
                    torch.testing.assert_close(a, b, msg=lambda m: f"{where}, parameter {i}: {m}")
            # The local batch alone decides otherwise: the reduction is what makes the ranks agree with one process.
            alone = _train(name, own, rows, 3, data_parallel=True)
            assert any(not torch.equal(a[0], w[0]) for a, w in zip(alone, want)), f"{name}: local c equal global"


def _count_collectives(method, out, y):
    calls = []
    originals = {"all_gather": agm_dist._all_gather, "all_reduce": dist.all_reduce, "broadcast": dist.broadcast}

    def counted(key):
        def call(*args, **kwargs):
            calls.append(key)
            return originals[key](*args, **kwargs)
        return call

    agm_dist._all_gather, dist.all_reduce, dist.broadcast = (counted(k) for k in originals)
    try:
        method.before_optimizer_step(out, y)
    finally:
        agm_dist._all_gather, dist.all_reduce, dist.broadcast = originals.values()
    return calls


def _check_collectives(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    xs, y = _batches()[0]
    xs, y = [x[rank * B : (rank + 1) * B] for x in xs], y[rank * B : (rank + 1) * B]
    for shard in (None, lambda module: fully_shard(module, mesh=mesh)):
        method, params, _ = _build("amss_plus", None, shard=shard)
        out = method.forward(xs, y, 0)
        method.loss(out, y).backward()
        # FSDP2's own all-gather of the fusion head (for the per-modality logits) is not counted here.
        assert _count_collectives(method, out, y) == ["all_gather"]
        assert 0 < int(method.decisions()["kept"].sum()) < 2 * CHANNELS

    # Gradient accumulation under data parallelism: the micro-batch's averaged gradient never exists.
    method, params, _ = _build("amss", None)
    method.set_accumulation(2)
    out = method.forward(xs, y, 0)
    with pytest.raises(ValueError, match="^steps: AMSS draws each micro-batch's channels from the energies"):
        method.loss(out, y)

    own = [dist.new_group([r]) for r in range(world)][rank]
    method, params, _ = _build("amss", own, shard=lambda module: fully_shard(module, mesh=mesh))
    out = method.forward(xs, y, 0)
    method.loss(out, y).backward()
    with pytest.raises(ValueError, match="^process_group: expected the group the encoders' weights are sharded"):
        method.before_optimizer_step(out, y)


def test_amss_under_ddp_equals_one_process_on_the_global_batch():
    _spawn(_check_ddp, timeout=240.0)


def test_amss_collectives_per_step_and_the_shards_group():
    _spawn(_check_collectives, timeout=120.0)
