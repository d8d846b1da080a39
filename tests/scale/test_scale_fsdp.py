"""FSDP2 (``fully_shard``) correctness over 2 gloo ranks on CPU, spawned by the test.

Each rank trains on its half of a batch of 2B with every encoder and the fusion head sharded by ``fully_shard``; the
parameters after every step must equal, to float32 rounding, those of a single process that trains the same
unsharded model on the whole batch (computed inside each rank with a one-rank process group). Every method of the
registry is checked (PMR, Re-learning, MLA and ReconBoost, with their epoch passes and owned steps, in
test_scale_fsdp_epoch_methods.py), each against joint training too, so that a method that modulated nothing would fail.
The shapes cut shards inside a Philox counter's four elements, so OGM-GE's noise offsets are exercised.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import _spawn
from torch import nn

import agm_fast
from agm_fast import methods, sharding

fsdp = pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

B, C, DIMS, EPOCHS, STEPS_PER_EPOCH = 6, 5, (7, 4), 3, 2
ROOT = Path(__file__).resolve().parents[2]

# Options that make each method act from the first step on this tiny problem (and the single process's group).
CASES = {
    "joint": {},
    "agm": {"alpha": 1.5},
    "ogm": {"alpha": 0.8},
    "ogm_ge": {"alpha": 0.8},
    "opm": {"warmup_epochs": 0, "p_exe": 1.0},
    "cggm": {"rho": 2.0, "lam": 0.2},
    "mslr": {"history": 1},
    "mses": {"patience": 0},
    "mlb": {"alpha": 0.8},
    # Every Linear weight of the encoders masked; the 9 hidden channels split 5 / 4 over the two ranks.
    "amss": {},
    "amss_plus": {},
    "inforeg": {"trace_window": 2, "trace_modality": "leader", "beta_bases": [0.95, 0.5]},
    "gdl": {"clip_grad_norm": 0.5},  # a clip that binds at every step
    "mmpareto": {},
}
# Methods whose decisions() are compared step by step too, and what they must show on some step for the test to mean
# anything (InfoReg: it regulated; its trace ratio k, from the traces summed over the shards, is compared as well).
ACTED = {"inforeg": lambda d: bool(d["regulated"].any())}
# methods that take a process_group
GROUPED = ("agm", "ogm", "ogm_ge", "opm", "cggm", "mlb", "amss", "amss_plus", "inforeg", "gdl", "mmpareto")
# Output channels of the masked weights per modality (AMSS must keep fewer under FSDP2 too).
MASKED_CHANNELS = 9 + 8


def _models():
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(d, 9), nn.ReLU(), nn.Linear(9, 8)) for d in DIMS]
    fusion = agm_fast.ConcatFusion([8, 8], C)
    return encoders, fusion


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [
        ([torch.randn(2 * B, d, generator=gen) for d in DIMS], torch.randint(0, C, (2 * B,), generator=gen))
        for _ in range(EPOCHS * STEPS_PER_EPOCH)
    ]


def _metrics(epoch: int):
    # Epoch metrics that make MSLR's ratios differ from 1 and MSES stop modality 1 after epoch 0.
    return {"modality_accuracy": [0.3 + 0.2 * epoch, 0.5], "modality_loss": [1.0 - 0.3 * epoch, 0.7 + 0.5 * epoch]}


def _build(name, mesh, group):
    encoders, fusion = _models()
    if mesh is not None:
        for enc in encoders:
            fully_shard(enc, mesh=mesh)
        fully_shard(fusion, mesh=mesh)
    kwargs = dict(CASES[name])
    if name in GROUPED:
        kwargs["process_group"] = group
    method = methods.create(name, encoders, fusion, seed=3, **kwargs)
    params = [p for m in [*encoders, fusion] for p in m.parameters()]
    extra = [p for g in method.param_groups(0.1) for p in g["params"]]
    optimizer = torch.optim.SGD(params + extra, lr=0.1, momentum=0.9)
    return method, encoders, fusion, params, optimizer


def _whole(params):
    return [(p.full_tensor() if sharding.is_sharded(p) else p).detach().clone() for p in params]


def _check_masked(name, method):
    # AMSS's decisions on the sharded model: fewer channels kept than there are (the gathered energies were drawn from).
    if name.startswith("amss"):
        kept = method.decisions()["kept"].tolist()
        assert all(0 < k < MASKED_CHANNELS for k in kept), f"{name}: kept {kept} of {MASKED_CHANNELS} channels"


def _acted(name, method, decided: list) -> None:
    if name in ACTED:
        decided.append(method.decisions())


def _check_decisions(name, got: list, want: list) -> None:
    if name not in ACTED:
        return
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), f"{name}, step {step}: decisions {sorted(g)} vs {sorted(w)}"
        for key in g:
            torch.testing.assert_close(g[key], w[key], msg=lambda m: f"{name}, step {step}, {key}: {m}")
    assert any(ACTED[name](d) for d in got if d), f"{name}: its decisions say it never acted: {got}"


def _train(name, mesh, group, rank, batches, start=0, built=None, acted=None):
    method, encoders, fusion, params, optimizer = built or _build(name, mesh, group)
    history = []
    for i, (xs, y) in enumerate(batches[start:], start):
        if mesh is not None:
            xs, y = [x[rank * B : (rank + 1) * B] for x in xs], y[rank * B : (rank + 1) * B]
        epoch = i // STEPS_PER_EPOCH
        methods.training_step(method, xs, y, epoch, optimizer)
        _check_masked(name, method)
        _acted(name, method, [] if acted is None else acted)
        if (i + 1) % STEPS_PER_EPOCH == 0:
            method.end_epoch(epoch, _metrics(epoch))
        history.append(_whole(params))
    return history


def _check_methods(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    own = [dist.new_group([r]) for r in range(world)][rank]
    batches = _batches()
    joint = _train("joint", None, own, rank, batches)
    for name in CASES:
        decided, single = [], []
        want = _train(name, None, own, rank, batches, acted=single)
        got = _train(name, mesh, None, rank, batches, acted=decided)
        _check_decisions(name, decided, single)
        for step, (g, w) in enumerate(zip(got, want)):
            for i, (a, b) in enumerate(zip(g, w)):
                torch.testing.assert_close(a, b, msg=lambda m: f"{name}, step {step}, parameter {i}: {m}")
        if name != "joint":
            moved = max((a - b).abs().max().item() for a, b in zip(want[-1], joint[-1]))
            assert moved > 1e-4, f"{name}: the parameters equal joint training's; the method did nothing"


# Unequal local batches: rank 0 holds 5 rows of 12, rank 1 the other 7. The loss of each rank is weighted by its share
# of the global batch, so that FSDP's average of the ranks' gradients is the gradient of the global mean loss. OPM's
# loss averages over the kept rows of each rank (its decisions are checked in test_scale_opm.py), and CGGM's heads
# average their ranks' gradients: both are exact only with equal local batches.
UNEQUAL = (5, 7)
UNEQUAL_CASES = [n for n in CASES if n not in ("opm", "cggm")]


def _train_weighted(name, mesh, group, rank, batches, acted=None, reshard_head=False):
    method, encoders, fusion, params, optimizer = _build(name, mesh, group)
    start = sum(UNEQUAL[:rank]) if mesh is not None else 0
    history = []
    for i, (xs, y) in enumerate(batches):
        N = len(y)
        if mesh is not None:
            xs, y = [x[start : start + UNEQUAL[rank]] for x in xs], y[start : start + UNEQUAL[rank]]
        weight = len(y) * (len(UNEQUAL) if mesh is not None else 1) / N
        epoch = i // STEPS_PER_EPOCH
        out = method.forward(xs, y, epoch)
        if reshard_head and mesh is not None:
            fusion.reshard()  # the head sharded again before the loss (as a non-root unit is after its forward)
        optimizer.zero_grad(set_to_none=True)
        (method.loss(out, y) * weight).backward()
        method.before_optimizer_step(out, y)
        _check_masked(name, method)
        _acted(name, method, [] if acted is None else acted)
        optimizer.step()
        if (i + 1) % STEPS_PER_EPOCH == 0:
            method.end_epoch(epoch, _metrics(epoch))
        history.append(_whole(params))
    return history


def _check_unequal_local_batches(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    own = [dist.new_group([r]) for r in range(world)][rank]
    batches = _batches()
    # InfoReg's unimodal losses read the head whole: as FSDP left it after its forward (the root keeps it
    # unsharded), and from a sharded head (through a whole copy whose gradient is averaged over the ranks).
    for name, reshard in [(n, False) for n in UNEQUAL_CASES] + [("inforeg", True)]:
        if name not in UNEQUAL_CASES:
            continue
        decided, single = [], []
        want = _train_weighted(name, None, own, rank, batches, acted=single)
        got = _train_weighted(name, mesh, None, rank, batches, acted=decided, reshard_head=reshard)
        _check_decisions(name, decided, single)
        for step, (g, w) in enumerate(zip(got, want)):
            for i, (a, b) in enumerate(zip(g, w)):
                torch.testing.assert_close(a, b, msg=lambda m: f"{name}, step {step}, parameter {i}: {m}")


def _check_layout_and_collectives(rank: int, world: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = init_device_mesh("cpu", (world,))
    # Shard offsets from the metadata equal DTensor's own layout, for shapes that leave a rank short or empty.
    for shape in [(9, 7), (7,), (1, 3), (3, 2, 5), (2,), (5, 1)]:
        t = distribute_tensor(torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape), mesh, [Shard(0)])
        local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
        row_numel = math.prod(shape[1:])
        assert sharding.shard_start(t) == offset[0] * row_numel
        shards, starts, _ = sharding.local_shards([t], "t")
        assert tuple(shards[0].shape) == tuple(local_shape)
        if shards[0].numel():
            assert shards[0].reshape(-1)[0].item() == starts[0]
        shards[0].add_(1)  # the local shard is the DTensor's storage
        assert torch.equal(t.to_local(), shards[0])
    with pytest.raises(ValueError, match="sharded on dim 0"):
        sharding.shard_start(distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)]))
    with pytest.raises(ValueError, match="every tensor sharded"):
        sharding.local_shards([distribute_tensor(torch.zeros(4), mesh, [Shard(0)]), torch.zeros(3)])

    # Gradient hooks are never called on FSDP2-sharded parameters: the methods that accumulate by hooks refuse.
    for name in [n for n in CASES if methods.get(n).cls.accumulation == "hooks"]:
        with pytest.raises(ValueError, match=f"^steps: {name} modulates micro-batches by gradient hooks"):
            _build(name, mesh, None)[0].set_accumulation(2)
        _build(name, mesh, None)[0].set_accumulation(1)

    # OGM-GE under FSDP2: one all-reduce of the scores and one all-gather of the moments per step, nothing else.
    method, encoders, fusion, params, optimizer = _build("ogm_ge", mesh, None)
    xs, y = [x[rank * B : (rank + 1) * B] for x in _batches()[0][0]], _batches()[0][1][rank * B : (rank + 1) * B]
    out = method.forward(xs, y, 0)
    optimizer.zero_grad()
    method.task_loss(out, y).backward()
    from agm_fast import distributed as agm_dist

    calls = []
    all_reduce, all_gather = dist.all_reduce, agm_dist._all_gather

    def count_reduce(*args, **kwargs):
        calls.append("all_reduce")
        return all_reduce(*args, **kwargs)

    def count_gather(*args, **kwargs):
        calls.append("moments all_gather")
        return all_gather(*args, **kwargs)

    dist.all_reduce, agm_dist._all_gather = count_reduce, count_gather
    try:
        method.before_optimizer_step(out, y)
    finally:
        dist.all_reduce, agm_dist._all_gather = all_reduce, all_gather
    # The scores' all-reduce and the moments' all-gather (the fusion head's own all-gather for the per-modality
    # logits is FSDP's, not counted here).
    assert sorted(calls) == ["all_reduce", "moments all_gather"], calls

    # MMPareto and GDL: one reduction of their own per step (FSDP's collectives aside), in the modulation.
    for name in ("mmpareto", "gdl"):
        method, encoders, fusion, params, optimizer = _build(name, mesh, None)
        out = method.forward(xs, y, 0)
        optimizer.zero_grad()
        calls = []
        reduce = agm_dist._reduce

        def count(*args, **kwargs):
            calls.append("step" if stepping else "loss")
            return reduce(*args, **kwargs)

        agm_dist._reduce, stepping = count, False
        try:
            method.loss(out, y).backward()
            stepping = True
            method.before_optimizer_step(out, y)
        finally:
            agm_dist._reduce = reduce
        assert calls == ["step"], (name, calls)
    encoders, fusion = _models()
    for module in [*encoders, fusion]:
        fully_shard(module, mesh=mesh)
    method = methods.create("gdl", encoders, fusion, head_unimodal_grad="keep")
    with pytest.raises(ValueError, match="^head_unimodal_grad: expected 'drop' for a fusion head sharded"):
        method.unimodal_logits([torch.zeros(B, 8), torch.zeros(B, 8)])


def _check_inforeg_shards_and_collectives(rank: int, world: int) -> None:
    # InfoReg's anchors and Fisher accumulators are shards of the parameters' layout; per step one all-reduce (the
    # scores), per epoch one more (the traces' shard parts), nothing else of its own.
    mesh = init_device_mesh("cpu", (world,))
    method, encoders, fusion, params, optimizer = _build("inforeg", mesh, None)
    batches = _batches()
    calls = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append("all_reduce")
        return all_reduce(*args, **kwargs)

    for i, (xs, y) in enumerate(batches[:STEPS_PER_EPOCH]):
        xs, y = [x[rank * B : (rank + 1) * B] for x in xs], y[rank * B : (rank + 1) * B]
        out = method.forward(xs, y, 0)
        optimizer.zero_grad()
        method.loss(out, y).backward()
        dist.all_reduce = counted
        try:
            method.before_optimizer_step(out, y)
            assert calls == ["all_reduce"], calls
            if i == STEPS_PER_EPOCH - 1:
                method.end_epoch(0, _metrics(0))
                assert calls == ["all_reduce"] * 2, calls
        finally:
            dist.all_reduce = all_reduce
        calls.clear()
        optimizer.step()
    for m, enc in enumerate(encoders):
        weights = [mod.weight for mod in enc.modules() if isinstance(mod, nn.Linear)]
        for t, p in [*zip(method._anchor[m], enc.parameters()), *zip(method._fisher[m], weights)]:
            assert sharding.is_sharded(t) and t.placements == p.placements and t.shape == p.shape
            assert t.to_local().shape == p.to_local().shape


def test_inforeg_state_is_sharded_and_its_collectives_counted():
    _spawn(_check_inforeg_shards_and_collectives, timeout=120.0)


def _holder(encoders, fusion, method) -> nn.Module:
    """One module over everything the optimizer steps: the model and the method's own modules (CGGM's heads)."""
    holder = nn.ModuleDict({"encoders": nn.ModuleList(encoders), "fusion": fusion})
    own = [m for m in method.modules() if not any(p is q for p in m.parameters() for q in holder.parameters())]
    holder["method"] = nn.ModuleList(own)
    return holder


def _check_checkpoint(rank: int, world: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = init_device_mesh("cpu", (world,))
    batches = _batches()
    path = os.environ["AGM_FAST_TEST_CKPT"]
    half = len(batches) // 2
    for name in CASES:
        if name == "joint":
            continue
        built = _build(name, mesh, None)
        method, encoders, fusion, params, optimizer = built
        model = _holder(encoders, fusion, method)
        _train(name, mesh, None, rank, batches[:half], built=built)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "method": method.state_dict()}
        dcp.save(state, checkpoint_id=os.path.join(path, name))
        want = _train(name, mesh, None, rank, batches, start=half, built=built)

        # A fresh process state: new model (moved away from the saved values), optimizer and method, everything read
        # from the sharded checkpoint.
        built = _build(name, mesh, None)
        method, encoders, fusion, params, optimizer = built
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        model = _holder(encoders, fusion, method)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "method": method.state_dict()}
        dcp.load(state, checkpoint_id=os.path.join(path, name))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        method.load_state_dict(state["method"])
        got = _train(name, mesh, None, rank, batches, start=half, built=built)
        for step, (g, w) in enumerate(zip(got, want)):
            for i, (a, b) in enumerate(zip(g, w)):
                assert torch.equal(a, b), f"{name}: resumed step {step}, parameter {i} differs"


def test_every_method_under_fsdp2_equals_one_process_on_the_global_batch():
    _spawn(_check_methods, timeout=240.0)


def test_unequal_local_batches_under_fsdp2_equal_one_process_on_the_global_batch():
    _spawn(_check_unequal_local_batches, timeout=240.0)


def test_shard_layout_and_ogm_ge_collectives():
    _spawn(_check_layout_and_collectives, timeout=120.0)


def test_sharded_checkpoint_resumes_every_method_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("AGM_FAST_TEST_CKPT", str(tmp_path))
    _spawn(_check_checkpoint, timeout=240.0)


def _torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "fsdp_train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_fsdp_example_runs_with_torchrun_and_resumes_exactly(tmp_path):
    # Two epochs straight, and one epoch then a resumed second: the same last line (loss, accuracies, coefficients).
    straight = _torchrun("--method", "ogm_ge", "--epochs", "2", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    ck = str(tmp_path / "ck")
    first = _torchrun("--method", "ogm_ge", "--epochs", "1", "--checkpoint", ck, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _torchrun("--method", "ogm_ge", "--epochs", "1", "--checkpoint", ck, cwd=tmp_path)
    assert again.returncode != 0 and "pass --resume" in again.stdout + again.stderr
    resumed = _torchrun("--method", "ogm_ge", "--epochs", "2", "--checkpoint", ck, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    last = [line for line in straight.stdout.splitlines() if line.startswith("epoch 2/2")]
    assert last and last == [line for line in resumed.stdout.splitlines() if line.startswith("epoch 2/2")]
