"""Data-parallel correctness over 2 gloo ranks spawned by the test.

Each rank trains on its half of a batch of 2B with gradients averaged across ranks (what DDP does), and must end
with the coefficients and parameters of a single process training on the whole batch. The single-process run is
computed inside each rank with a one-rank process group, for which the classes communicate nothing. Models have no
BatchNorm: its batch statistics differ between a shard and the whole batch (use SyncBatchNorm for that).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from test_distributed import _spawn
from torch import nn

import agm_fast

B, C, STEPS_EQUAL, STEPS_NOISE = 6, 5, 5, 20
DIMS = (7, 4)


def _models(seed: int = 0):
    torch.manual_seed(seed)
    encoders = [nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 8)) for d in DIMS]
    fusion = agm_fast.ConcatFusion([8, 8], C)
    params = [p for m in encoders + [fusion] for p in m.parameters()]
    return encoders, fusion, params


def _batches(steps: int):
    gen = torch.Generator().manual_seed(1)
    return [
        ([torch.randn(2 * B, d, generator=gen) for d in DIMS], torch.randint(0, C, (2 * B,), generator=gen))
        for _ in range(steps)
    ]


def _average_grads(params, group) -> None:
    if group is None:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _train_agm(batches, shard, group, reduce_group):
    encoders, fusion, params = _models()
    agm = agm_fast.AGM(encoders=encoders, fusion=fusion, alpha=1.5, process_group=group)
    opt = torch.optim.SGD(params, lr=0.5)
    coeffs = []
    for xs, y in batches:
        xs, y = shard(xs, y)
        res = agm(*xs, target=y)
        opt.zero_grad()
        nn.functional.cross_entropy(res.logits, y).backward()
        _average_grads(params, reduce_group)
        opt.step()
        coeffs.append(res.coeffs.clone())
    return coeffs, [p.detach().clone() for p in params], agm.state_dict()


def _train_ogm(batches, shard, group, reduce_group, mode):
    encoders, fusion, params = _models()
    ogm = agm_fast.OGMGE(encoders, alpha=0.8, mode=mode, seed=5, process_group=group)
    opt = torch.optim.SGD(params, lr=0.5)
    coeffs = []
    for xs, y in batches:
        xs, y = shard(xs, y)
        feats = [enc(x) for enc, x in zip(encoders, xs)]
        opt.zero_grad()
        nn.functional.cross_entropy(fusion(*feats), y).backward()
        _average_grads(params, reduce_group)
        coeffs.append(ogm.step_from_features(y, fusion, feats, epoch=0).clone())
        opt.step()
    return coeffs, [p.detach().clone() for p in params]


def _check_ddp(rank: int, world: int) -> None:
    own = [dist.new_group([r]) for r in range(world)][rank]
    everything = lambda xs, y: (xs, y)  # noqa: E731
    half = lambda xs, y: ([x[rank * B:(rank + 1) * B] for x in xs], y[rank * B:(rank + 1) * B])  # noqa: E731
    batches = _batches(STEPS_EQUAL)

    want = _train_agm(batches, everything, own, own)
    got = _train_agm(batches, half, None, None)
    for g, w in zip(got[0], want[0]):
        torch.testing.assert_close(g, w)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)
    for key in ("coefficients.running", "coefficients.count"):
        torch.testing.assert_close(got[2][key], want[2][key])

    want = _train_ogm(batches, everything, own, own, "OGM")
    got = _train_ogm(batches, half, None, None, "OGM")
    for g, w in zip(got[0], want[0]):
        torch.testing.assert_close(g, w)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)

    # OGM-GE: the seed is broadcast at construction and the noise drawn after the all-reduce is the same on every
    # rank, so the replicas stay bitwise identical.
    _, params = _train_ogm(_batches(STEPS_NOISE), half, None, None, "OGM_GE")
    flat = torch.cat([p.flatten() for p in params])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])

    # The process group is respected: with each rank in its own group, the two ranks' coefficients are their own.
    local = _train_agm(batches[:1], half, own, own)[0][0]
    alone = _train_agm([([x[rank * B:(rank + 1) * B] for x in batches[0][0]], batches[0][1][rank * B:(rank + 1) * B])],
                       everything, own, own)[0][0]
    torch.testing.assert_close(local, alone)


def test_agm_and_ogm_over_two_ranks_equal_one_process_on_the_global_batch():
    _spawn(_check_ddp, timeout=90.0)


# InfoReg: the scores of the global batch (sums reduced), so every rank picks the leader and beta of one process; the
# gradients are the averaged ones, so the pull and the traces need nothing more. Local batches of 5 and 7 rows, the
# loss of each weighted by its share of the global batch (what makes the average of the ranks' gradients the gradient
# of the global mean loss), and equal halves.
INFOREG = {"trace_window": 2, "trace_modality": "leader", "beta_bases": [0.95, 0.5]}
INFOREG_EPOCHS, INFOREG_STEPS = 3, 2


def _train_inforeg(batches, rows, rank, group, reduce_group, score):
    encoders, fusion, params = _models()
    method = agm_fast.methods.create("inforeg", encoders, fusion, score=score, process_group=group, **INFOREG)
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    start = sum(rows[:rank]) if rows is not None else 0
    decided, reduces = [], []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        reduces[-1] += 1
        return all_reduce(*args, **kwargs)

    for i, (xs, y) in enumerate(batches):
        N = len(y)
        if rows is not None:
            xs, y = [x[start:start + rows[rank]] for x in xs], y[start:start + rows[rank]]
        epoch = i // INFOREG_STEPS
        out = method.forward(xs, y, epoch)
        opt.zero_grad()
        (method.loss(out, y) * (len(y) * dist.get_world_size() / N if rows is not None else 1.0)).backward()
        _average_grads(params, reduce_group)
        reduces.append(0)
        dist.all_reduce = counted
        try:
            method.before_optimizer_step(out, y)
        finally:
            dist.all_reduce = all_reduce
        opt.step()
        decided.append(method.decisions())
        if (i + 1) % INFOREG_STEPS == 0:
            method.end_epoch(epoch, {})
    return decided, [p.detach().clone() for p in params], reduces


def _check_inforeg(rank: int, world: int) -> None:
    own = [dist.new_group([r]) for r in range(world)][rank]
    batches = _batches(INFOREG_EPOCHS * INFOREG_STEPS)
    for rows, score in [((B, B), "sum"), ((5, 7), "sum"), ((5, 7), "mean")]:
        want = _train_inforeg(batches, None, rank, own, own, score)
        got = _train_inforeg(batches, rows, rank, None, None, score)
        for step, (g, w) in enumerate(zip(got[0], want[0])):
            for key in w:
                torch.testing.assert_close(g[key], w[key], msg=lambda m: f"{rows} {score}, step {step}, {key}: {m}")
        assert any(bool(d["regulated"].any()) for d in got[0][1::INFOREG_STEPS]), "InfoReg never pulled"
        for i, (g, w) in enumerate(zip(got[1], want[1])):
            torch.testing.assert_close(g, w, msg=lambda m: f"{rows} {score}, parameter {i}: {m}")
        assert want[2] == [0] * len(batches), want[2]  # a group of one rank: nothing is communicated
        assert got[2] == [1] * len(batches), got[2]  # the scores' all-reduce, once per step


def test_inforeg_over_two_ranks_equals_one_process_on_the_global_batch():
    _spawn(_check_inforeg, timeout=120.0)


# MLB with gradient accumulation: two micro-batches per step, each rank holding half of each global micro-batch. Each
# micro-batch's k is that of the global micro-batch (its scores reduced), the model's summed gradients are averaged
# after the last micro-batch (as DDP under no_sync), the heads' by the method at the step.
def _train_mlb_accumulated(batches, rank, group, reduce_group, split):
    encoders, fusion, params = _models()
    method = agm_fast.methods.create("mlb", encoders, fusion, alpha=0.8, process_group=group)
    method.set_accumulation(2)
    everything = params + list(method.heads.parameters())
    opt = torch.optim.SGD(everything, lr=0.5)
    coeffs = []
    for xs, y in batches:
        opt.zero_grad()
        for i in range(2):
            lo, hi = i * B, (i + 1) * B
            if split:
                lo, hi = lo + rank * B // 2, lo + (rank + 1) * B // 2
            out = method.forward([x[lo:hi] for x in xs], y[lo:hi], 0)
            (method.loss(out, y[lo:hi]) / 2).backward()
        _average_grads(params, reduce_group)
        coeffs.append(method.before_optimizer_step())
        opt.step()
    return coeffs, [p.detach().clone() for p in everything]


def _check_mlb_accumulated(rank: int, world: int) -> None:
    own = [dist.new_group([r]) for r in range(world)][rank]
    batches = _batches(3)
    want = _train_mlb_accumulated(batches, rank, own, own, split=False)
    got = _train_mlb_accumulated(batches, rank, None, None, split=True)
    assert not torch.allclose(want[0][0], torch.ones(2))
    for step, (g, w) in enumerate(zip(got[0], want[0])):
        torch.testing.assert_close(g, w, msg=lambda m: f"step {step}, k: {m}")
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(g, w, msg=lambda m: f"parameter {i}: {m}")


def test_mlb_accumulation_over_two_ranks_equals_one_process_on_the_global_micro_batches():
    _spawn(_check_mlb_accumulated, timeout=90.0)
