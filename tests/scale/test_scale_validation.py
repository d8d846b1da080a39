"""modality_metrics over 2 gloo ranks with unequal shards equals one process on the whole validation set."""

import torch
from test_distributed import _spawn
from torch import nn

from agm_fast.fusion import ConcatFusion
from agm_fast.validation import modality_metrics


def _check(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.encoders = nn.ModuleList(nn.Sequential(nn.Linear(5, 6), nn.ReLU()) for _ in range(2))
    model.fusion = ConcatFusion([6, 6], 3)
    g = torch.Generator().manual_seed(1)
    xs, y = [torch.randn(23, 5, generator=g) for _ in range(2)], torch.randint(0, 3, (23,), generator=g)
    own = [torch.distributed.new_group([r]) for r in range(world)][rank]
    whole = modality_metrics(model, (xs, y), process_group=own)
    rows = slice(0, 9) if rank == 0 else slice(9, 23)
    got = modality_metrics(model, ([x[rows] for x in xs], y[rows]))
    assert got["count"] == 23, got
    for key in ("accuracy", "loss", "modality_accuracy", "modality_loss"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(whole[key]), msg=key)


def test_validation_metrics_reduce_over_ranks():
    _spawn(_check, timeout=120.0)
