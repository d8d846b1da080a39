"""MMPareto and GDL under ``DistributedDataParallel`` over 2 gloo ranks spawned by the test.

The model (encoders and fusion head) is wrapped in a real DDP, whose forward runs the method's forward; each rank
trains on its rows of a batch of 12 (6 and 6, then 5 and 7 with each rank's loss weighted by its share of the
global batch), and must end every step with the parameters and decisions of one process that trains the same model
on the whole batch (computed inside each rank with a one-rank process group, for which the methods communicate
nothing). The method's own heads (MMPareto) are outside the DDP module, as the method owns them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from test_distributed import _spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import agm_fast
from agm_fast import distributed as agm_dist
from agm_fast import methods

C, DIMS, ROWS, STEPS = 5, (7, 4), 12, 4

# Options that make each method act from the first step on this tiny problem.
CASES = {
    "gdl": {"clip_grad_norm": 0.5},
    "mmpareto": {},
}
# Decisions compared with one process (those that are not the same on every rank are local by definition).
DECISIONS = {"gdl": ("unimodal_loss", "grad_norm", "clip_coef"), "mmpareto": ("cos", "weight", "unimodal_loss")}


class _Model(nn.Module):
    """The encoders and the head in one module whose forward is the method's (what DDP wraps)."""

    def __init__(self, encoders, fusion):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion
        self.method = None

    def forward(self, xs, y, epoch):
        return self.method.forward(xs, y, epoch)


def _build(name, group, ddp):
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(d, 9), nn.ReLU(), nn.Linear(9, 8)) for d in DIMS]
    model = _Model(encoders, agm_fast.ConcatFusion([8, 8], C))
    model.method = methods.create(name, list(model.encoders), model.fusion, seed=3, process_group=group,
                                  **CASES[name])
    params = list(model.parameters()) + [p for g in model.method.param_groups(0.1) for p in g["params"]]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return model.method, (DistributedDataParallel(model) if ddp else model), params, optimizer


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [([torch.randn(ROWS, d, generator=gen) for d in DIMS], torch.randint(0, C, (ROWS,), generator=gen))
            for _ in range(STEPS)]


def _train(name, group, batches, rows=None, rank=0):
    """``rows``: each rank's number of rows (None: one process on every row)."""
    method, model, params, optimizer = _build(name, group, ddp=rows is not None)
    history = []
    for xs, y in batches:
        weight = 1.0
        if rows is not None:
            start = sum(rows[:rank])
            xs, y = [x[start:start + rows[rank]] for x in xs], y[start:start + rows[rank]]
            weight = rows[rank] * len(rows) / ROWS
        out = model(xs, y, 0)
        optimizer.zero_grad(set_to_none=True)
        (method.loss(out, y) * weight).backward()
        method.before_optimizer_step(out, y)
        optimizer.step()
        decided = method.decisions()
        history.append(([p.detach().clone() for p in params], {k: decided[k].clone() for k in DECISIONS[name]}))
    return history


def _check(rank: int, world: int) -> None:
    own = [dist.new_group([r]) for r in range(world)][rank]
    batches = _batches()
    for name in CASES:
        want = _train(name, own, batches)
        for rows in [(6, 6), (5, 7)]:
            got = _train(name, None, batches, rows, rank)
            for step, ((gp, gd), (wp, wd)) in enumerate(zip(got, want)):
                where = f"{name}, rows {rows}, step {step}"
                for i, (a, b) in enumerate(zip(gp, wp)):
                    torch.testing.assert_close(a, b, msg=lambda m: f"{where}, parameter {i}: {m}")
                for key in DECISIONS[name]:
                    torch.testing.assert_close(gd[key], wd[key], msg=lambda m: f"{where}, {key}: {m}")
        if name == "mmpareto":
            # Both branches of the rule ran in this run, so the check covers the min-norm weights too.
            pareto = [bool(d["weight"].ne(0.5).any()) for _, d in want]
            assert any(pareto) and not all(pareto), pareto
    _check_collectives(rank, world)


def _check_collectives(rank: int, world: int) -> None:
    # Per step, besides DDP's own gradient buckets: GDL one all-reduce (its reported losses), MMPareto one (the
    # unimodal gradients and the heads' gradients, with the sample count).
    batches = _batches()
    for name, want in [("gdl", 1), ("mmpareto", 1)]:
        method, model, params, optimizer = _build(name, None, ddp=True)
        xs, y = [x[rank * 6:(rank + 1) * 6] for x in batches[0][0]], batches[0][1][rank * 6:(rank + 1) * 6]
        out = model(xs, y, 0)
        optimizer.zero_grad()
        loss = method.loss(out, y)
        loss.backward()
        calls = []
        reduce = agm_dist._reduce

        def counted(*args, **kwargs):
            calls.append(args[0].numel())
            return reduce(*args, **kwargs)

        agm_dist._reduce = counted
        try:
            method.before_optimizer_step(out, y)
        finally:
            agm_dist._reduce = reduce
        assert len(calls) == want, (name, calls)


def test_mmpareto_and_gdl_under_ddp_equal_one_process_on_the_global_batch():
    _spawn(_check, timeout=240.0)
