"""Epoch passes with data over 2 gloo ranks spawned by the test: each rank passes over its own (unequal, possibly
empty) shard, and the sums the method's finish step receives are those of one process over all the data."""

from __future__ import annotations

import torch
from epoch_recorder import C, Recorder, models
from test_distributed import _spawn

from agm_fast.methods import EpochPass, run_epoch_passes

# Batch numbers of each rank's shard: unequal, and in the second pass rank 1 has none.
SHARDS = {"train": ([0, 1, 2], [3]), "val": ([0, 1], [])}


def _data(n, rows=5):
    g = torch.Generator().manual_seed(3)
    return [([torch.randn(rows, 5, generator=g), torch.randn(rows, 2, generator=g)],
             torch.randint(0, C, (rows,), generator=g)) for _ in range(n)]


def _check_two_ranks(rank: int, world: int) -> None:
    encoders, fusion = models(seed=0)
    train, val = _data(4), _data(2)
    method = Recorder(encoders, fusion, default=(EpochPass("train", "end"), EpochPass("val", "end")))
    shard = {k: [data[i] for i in SHARDS[k][rank]] for k, data in (("train", train), ("val", val))}
    report = run_epoch_passes(method, 0, "end", shard["train"], shard["val"])
    assert report.batches == len(SHARDS["train"][rank]) + len(SHARDS["val"][rank])
    for finished, data in zip(method.finished, (train, val)):
        with torch.no_grad():
            for e in encoders:
                e.eval()
            feats = [torch.cat([e(xs[m]) for xs, _ in data]) for m, e in enumerate(encoders)]
        ys = torch.cat([y for _, y in data])
        sums = finished["sums"]
        torch.testing.assert_close(sums["rows"], torch.tensor(float(len(ys))))
        torch.testing.assert_close(sums["classes"], torch.bincount(ys, minlength=C).float())
        for m in range(2):
            torch.testing.assert_close(sums[f"feat{m}"], feats[m].sum(0))


def test_a_sharded_pass_reduces_to_one_process_over_all_the_data():
    _spawn(_check_two_ranks)


def _check_relearning(rank: int, world: int) -> None:
    import copy

    import torch.distributed as dist
    from torch import nn

    from agm_fast import ConcatFusion, methods

    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Sequential(nn.Linear(2, 4), nn.Tanh())]
    fusion = ConcatFusion([4, 4], C)
    solo_encoders = copy.deepcopy(encoders)
    kwargs = {"reinit_epoch": 1, "kmeans_restarts": 2, "move_lambda": 5.0}
    sharded = methods.create("relearning", encoders, fusion, **kwargs)
    solo = methods.create("relearning", solo_encoders, copy.deepcopy(fusion), **kwargs)
    with torch.no_grad():
        for e in encoders + solo_encoders:
            for p in e.parameters():
                p.add_(0.5)
    train, val = _data(4), _data(3)
    # Rank r holds batches r, r + 2, ...: one process sees them in rank order (the order the gather makes).
    shard = {k: d[rank::world] for k, d in (("train", train), ("val", val))}
    order = {k: d[0::world] + d[1::world] for k, d in (("train", train), ("val", val))}
    groups = [dist.new_group([r]) for r in range(world)]
    methods.run_epoch_passes(sharded, 1, "end", shard["train"], shard["val"])
    methods.run_epoch_passes(solo, 1, "end", order["train"], order["val"], process_group=groups[rank])
    for key in ("train_purity", "val_purity", "weight"):
        torch.testing.assert_close(sharded.decisions()[key], solo.decisions()[key])
    for p, q in zip([p for e in encoders for p in e.parameters()], [p for e in solo_encoders for p in e.parameters()]):
        torch.testing.assert_close(p, q)


def test_relearning_gathers_every_rank_s_features():
    _spawn(_check_relearning, timeout=90.0)


def _check_pmr(rank: int, world: int) -> None:
    import copy

    import torch.distributed as dist
    from torch import nn

    from agm_fast import ConcatFusion, methods

    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Sequential(nn.Linear(2, 4), nn.Tanh())]
    fusion = ConcatFusion([4, 4], C)
    solo_enc, solo_fus = copy.deepcopy(encoders), copy.deepcopy(fusion)
    groups = [dist.new_group([r]) for r in range(world)]
    sharded = methods.create("pmr", encoders, fusion, proto_fraction=1.0)
    solo = methods.create("pmr", solo_enc, solo_fus, proto_fraction=1.0, process_group=groups[rank])
    train = _data(4)
    methods.run_epoch_passes(sharded, 0, "start", train[rank::world])
    methods.run_epoch_passes(solo, 0, "start", train, process_group=groups[rank])
    for p, q in zip(sharded.prototypes, solo.prototypes):
        torch.testing.assert_close(p, q)
    # One step: each rank half of a batch; the scores are global-batch sums, so the strengths are one process's.
    (xs, y), = _data(1, rows=10)
    half = slice(5 * rank, 5 * rank + 5)
    out = sharded.forward([x[half] for x in xs], y[half], 0)
    sharded.loss(out, y[half])
    out = solo.forward(xs, y, 0)
    solo.loss(out, y)
    for key in ("scores", "ratios", "strength"):
        torch.testing.assert_close(sharded.decisions()[key], solo.decisions()[key])


def test_pmr_prototypes_and_scores_are_global():
    _spawn(_check_pmr, timeout=90.0)
