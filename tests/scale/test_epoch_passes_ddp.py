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
