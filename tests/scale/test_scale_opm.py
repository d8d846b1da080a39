"""OPM under data parallelism with unequal local batches (5 and 7 rows on 2 gloo ranks): every rank keeps exactly the
drop decisions a single process draws for its rows of the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from test_distributed import _spawn
from torch import nn

import agm_fast
from agm_fast import methods

C, DIMS, SIZES = 4, (6, 3), (5, 7)


def _method(group):
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(d, 8), nn.ReLU()) for d in DIMS]
    fusion = agm_fast.ConcatFusion([8, 8], C)
    return methods.create("opm", encoders, fusion, seed=5, warmup_epochs=0, p_exe=1.0, q_base=0.6,
                          process_group=group)


def _check(rank: int, world: int) -> None:
    own = [dist.new_group([r]) for r in range(world)][rank]
    gen = torch.Generator().manual_seed(2)
    N = sum(SIZES)
    start = sum(SIZES[:rank])
    single, sharded = _method(own), _method(None)
    for step in range(4):
        xs = [torch.randn(N, d, generator=gen) for d in DIMS]
        y = torch.randint(0, C, (N,), generator=gen)
        single.forward(xs, y, 0)
        sharded.forward([x[start : start + SIZES[rank]] for x in xs], y[start : start + SIZES[rank]], 0)
        want = single.opm.last_keep[start : start + SIZES[rank]]
        assert torch.equal(sharded.opm.last_keep, want), f"rank {rank}, step {step}: drop decisions differ"


def test_opm_with_unequal_local_batches_keeps_the_global_decisions():
    _spawn(_check, timeout=120.0)
