"""The functional AGM and OGM ops under data parallelism: with ``process_group=`` over 2 gloo ranks, ``shapley_scores``
and ``ogm_scores`` on each rank's shard (unequal shards) equal one process on the global batch; without a group they
are the ops themselves, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_distributed import _gathered_equal, _spawn
from torch.testing import assert_close

from agm_fast import functional as Fn
from agm_fast.ops.ogm_scores import ogm_scores_op
from agm_fast.ops.shapley import shapley_scores_op

# Unequal local batches: a plain average of the per-rank means would be wrong.
SHARDS = (5, 3)


def _agm_args(M: int, B: int, C: int, gen: torch.Generator, task: str = "classification"):
    masks, W = Fn.shapley_subsets(M)
    F = torch.randn(len(masks), B, C, generator=gen)
    if task == "classification":
        y = torch.randint(0, C, (B,), generator=gen)
    else:
        y = torch.randn(B, C, generator=gen)
    return F, W, y


def _local(x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    return x.narrow(dim, sum(SHARDS[:rank]), SHARDS[rank])


def test_without_a_group_the_functions_are_the_ops_bitwise():
    gen = torch.Generator().manual_seed(3)
    F, W, y = _agm_args(3, 6, 5, gen)
    running, count, prev = torch.rand(3, generator=gen), torch.full((), 4.0), torch.rand(3, generator=gen) + 0.5
    got = Fn.shapley_scores(F, W, y, running, count, prev, 1.5, 10.0, True, False, process_group=None)
    want = shapley_scores_op(F, W, y, running, count, prev, 1.5, 10.0, True, False, False)
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    logits = torch.randn(3, 6, 5, generator=gen)
    for g, w in zip(Fn.ogm_scores(logits, y, 0.8, process_group=None), ogm_scores_op(logits, y, 0.8, False)):
        assert torch.equal(g, w)


def test_process_group_of_the_wrong_type_is_refused():
    gen = torch.Generator().manual_seed(4)
    F, W, y = _agm_args(2, 4, 3, gen)
    with pytest.raises(TypeError, match="process_group: expected a torch.distributed.ProcessGroup"):
        Fn.shapley_scores(F, W, y, torch.zeros(2), torch.zeros(()), torch.ones(2), 1.0, process_group="world")
    with pytest.raises(TypeError, match="process_group: expected a torch.distributed.ProcessGroup"):
        Fn.ogm_scores(F[:2], y, 0.8, process_group=0)


def _check_agm(rank: int, M: int, task: str, steps: int) -> None:
    gen = torch.Generator().manual_seed(10 + M)
    B, C = sum(SHARDS), 4
    # One process on the global batch (the op: what the public function runs without a group) ...
    run1, cnt1, prev1 = torch.zeros(M), torch.zeros(()), torch.ones(M)
    # ... and this rank on its shard, through the public function with the world group.
    run2, cnt2, prev2 = run1.clone(), cnt1.clone(), prev1.clone()
    for step in range(steps):
        F, W, y = _agm_args(M, B, C, gen, task)
        in_window, hold_last = step != 1, step == 1
        want = shapley_scores_op(F, W, y, run1, cnt1, prev1, 1.5, 0.5, in_window, hold_last, task == "regression")
        F_local = _local(F, rank, 1).clone().requires_grad_(True)
        got = Fn.shapley_scores(F_local, W, _local(y, rank, 0), run2, cnt2, prev2, 1.5, 0.5, in_window, hold_last,
                                task, process_group=dist.group.WORLD)
        psi, scores, running, count, coeffs = got
        assert_close(psi, _local(want[0], rank, 1))
        for g, w in zip((scores, running, count, coeffs), want[1:]):
            assert g.dtype == torch.float32 and g.shape == w.shape
            assert_close(g, w)
            assert _gathered_equal(g.reshape(-1))
        # The gradient still reaches this rank's subset logits through psi only. (Drawn for the global batch, so that
        # the generator stays in step on every rank.)
        g_psi = _local(torch.randn(want[0].shape, generator=gen), rank, 1)
        psi.backward(g_psi)
        assert_close(F_local.grad, torch.einsum("ms,mbc->sbc", W, g_psi))
        run1, cnt1, prev1 = want[2], want[3], want[4]
        run2, cnt2, prev2 = running, count, coeffs


def _check_ogm(rank: int, M: int) -> None:
    gen = torch.Generator().manual_seed(20 + M)
    B, C = sum(SHARDS), 5
    for continuous in (False, True):
        logits = torch.randn(M, B, C, generator=gen) * 3
        y = torch.randint(0, C, (B,), generator=gen)
        want = ogm_scores_op(logits, y, 0.8, continuous)
        got = Fn.ogm_scores(_local(logits, rank, 1), _local(y, rank, 0), 0.8, continuous,
                            process_group=dist.group.WORLD)
        for g, w in zip(got, want):
            assert_close(g, w)
            assert _gathered_equal(g)
        # Without a group the op reduces nothing, though the default group is initialised (the classes that call
        # it reduce for themselves).
        mine = [_local(logits, rank, 1), _local(y, rank, 0)]
        for g, w in zip(Fn.ogm_scores(*mine, 0.8, continuous), ogm_scores_op(*mine, 0.8, continuous)):
            assert torch.equal(g, w)


def _check_functional(rank: int, world: int) -> None:
    assert world == len(SHARDS)
    _check_agm(rank, 2, "classification", steps=3)
    _check_agm(rank, 3, "classification", steps=3)
    _check_agm(rank, 2, "regression", steps=2)
    _check_ogm(rank, 2)
    _check_ogm(rank, 3)
    # A group of this rank alone: nothing is reduced, the local batch's values come back.
    singles = [dist.new_group([r]) for r in range(world)]
    gen = torch.Generator().manual_seed(30)
    F, W, y = _agm_args(2, SHARDS[rank], 3, gen)
    state = (torch.zeros(2), torch.zeros(()), torch.ones(2))
    got = Fn.shapley_scores(F, W, y, *state, 1.0, process_group=singles[rank])
    want = shapley_scores_op(F, W, y, *state, 1.0, 10.0, True, False, False)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_two_ranks_unequal_shards_match_one_process_on_the_global_batch():
    _spawn(_check_functional)
