"""FSDP2 (``fully_shard``) for the methods with epoch passes (PMR, Re-learning) and those that own their step (MLA,
ReconBoost), over 2 gloo ranks on CPU spawned by the test.

As in test_scale_fsdp.py, each rank trains on its half of a batch of 2B with every encoder and the fusion head
sharded, and the parameters after every step (epoch passes included: PMR's prototypes, Re-learning's diagnosis and
soft re-initialisation of the sharded encoders) must equal those of one process training the unsharded model on the
whole batch, with the passes over all the data, and so must the method state and the global decisions. Then unequal
local batches (5 / 7 rows), the refused combinations, and a sharded DCP checkpoint taken mid-epoch that resumes
exactly (parameters and method state). One spawn runs every check: starting the two ranks costs more than training.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import _spawn
from test_scale_fsdp import B, C, _holder, _models, _whole

from agm_fast import methods, sharding
from agm_fast.methods.owned_step import SubSteps

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

EPOCHS, STEPS_PER_EPOCH = 3, 2
# Options that make each method act within three epochs of two steps on this tiny problem.
CASES = {
    "joint": {},
    # prototype passes over all the pass data: one at the start of epoch 0, one at the end of each epoch
    "pmr": {"alpha": 1.5, "proto_fraction": 1.0, "proto_momentum": 0.3},
    "pmr:paper": {"alpha": 1.5, "proto_fraction": 1.0, "ratio_strength": True, "first_epoch_ema": True},
    # a diagnosis and soft re-initialisation at the end of epochs 1 and 2
    "relearning": {"reinit_epoch": 1, "move_lambda": 5.0, "kmeans_restarts": 2, "kmeans_iters": 20},
    "mla": {},
    "mla:options": {"projection": True, "zero_fill": True, "entropy": "sample"},
    "mla:sharded_head": {"projection": True},
    # epoch 0 boosts modality 0, epoch 1 rectifies it, epoch 2 boosts modality 1 (with the gradient-assist term)
    "reconboost": {"epochs_per_stage": 1, "correct_epochs": 1},
    "reconboost:ga_gradient": {"epochs_per_stage": 1, "correct_epochs": 1, "ga_gradient": True},
    "reconboost:sharded_head": {"epochs_per_stage": 1, "correct_epochs": 1},
}
# Cases whose shared head is sharded too (fully_shard on the method's head, after the method is built).
SHARDED_HEAD = ("mla:sharded_head", "reconboost:sharded_head")
# The cases of the unequal-batch and checkpoint checks (fewer, to keep the file fast): MLA's projection reads the
# global feature mean, which unequal batches test best.
UNEQUAL_CASES = ("pmr", "relearning", "mla:options", "mla:sharded_head", "reconboost", "reconboost:sharded_head")
CHECKPOINT_CASES = ("pmr", "relearning", "mla:options", "mla:sharded_head", "reconboost")
GROUPED = ("pmr", "relearning")
# The decisions compared step by step: those that are global-batch statistics (PMR's proto_loss and ReconBoost's
# ga_loss are each rank's batch's).
DECIDED = {"pmr": ("scores", "ratios", "strength"), "relearning": ("train_purity", "val_purity", "weight"),
           "mla": ("weights", "losses"), "reconboost": ("boost_rate",)}
UNEQUAL = (5, 7)


def _method_name(case: str) -> str:
    return case.split(":")[0]


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [
        ([torch.randn(2 * B, d, generator=gen) for d in (7, 4)], torch.randint(0, C, (2 * B,), generator=gen))
        for _ in range(EPOCHS * STEPS_PER_EPOCH)
    ]


def _pass_data():
    # The data of the epoch passes: 4 training and 2 validation batches of 6 rows (rank r passes over the r-th half
    # of each, in order, so that the features it gathers come in one process's order).
    gen = torch.Generator().manual_seed(5)

    def batch():
        return [torch.randn(6, d, generator=gen) for d in (7, 4)], torch.randint(0, C, (6,), generator=gen)

    return [batch() for _ in range(4)], [batch() for _ in range(2)]


def _shard_passes(rank, world, sharded):
    train, val = _pass_data()
    if not sharded:
        return train, val
    return train[rank * 2 : rank * 2 + 2], val[rank : rank + 1]


def _build(case, mesh, group, shift=0.0):
    encoders, fusion = _models()
    if mesh is not None:
        for enc in encoders:
            fully_shard(enc, mesh=mesh)
        fully_shard(fusion, mesh=mesh)
    with torch.no_grad():
        for p in [p for m in [*encoders, fusion] for p in m.parameters()]:
            p.add_(shift)  # a fresh process's model before its checkpoint is loaded (Re-learning's theta_0 too)
    name = _method_name(case)
    kwargs = dict(CASES[case])
    if name in GROUPED:
        kwargs["process_group"] = group
    method = methods.create(name, encoders, fusion, seed=3, **kwargs)
    if mesh is not None and case in SHARDED_HEAD:
        fully_shard(method.shared, mesh=mesh)
    params = [p for m in [*encoders, fusion] for p in m.parameters()]
    extra = [p for g in method.param_groups(0.1) for p in g["params"]]
    optimizer = torch.optim.SGD(params + extra, lr=0.1, momentum=0.9)
    # One process in a rank: the sub-steps average over its own one-rank group (nothing); sharded: FSDP's mesh.
    steps = SubSteps(optimizer, process_group=group) if method.owns_step else optimizer
    return method, encoders, fusion, params + extra, steps


def _rows(rank, sharded, n, sizes):
    if not sharded:
        return slice(0, n)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _train(case, mesh, group, rank, batches, start=0, built=None, sizes=(B, B), weighted=False, decided=None):
    """Steps ``start..`` with the epoch passes at each epoch's start and end; the parameters after each step (and in
    ``decided`` the decisions of :data:`DECIDED`)."""
    method, encoders, fusion, params, steps = built or _build(case, mesh, group)
    sharded = mesh is not None
    train, val = _shard_passes(rank, len(sizes), sharded)
    history = []
    for i, (xs, y) in enumerate(batches[start:], start):
        epoch, within = divmod(i, STEPS_PER_EPOCH)
        if within == 0:
            methods.run_epoch_passes(method, epoch, "start", train, val, process_group=group)
        rows = _rows(rank, sharded, len(y), sizes)
        xs, y = [x[rows] for x in xs], y[rows]
        if weighted and not method.owns_step:
            # Each rank's loss weighted by its share of the global batch: FSDP's mean is the global batch's.
            weight = len(y) * (len(sizes) if sharded else 1) / len(batches[i][1])
            out = method.forward(xs, y, epoch)
            steps.zero_grad(set_to_none=True)
            (method.loss(out, y) * weight).backward()
            method.before_optimizer_step(out, y)
            steps.step()
        else:
            # An owned step weighs its sub-steps' losses by the rank's share itself.
            methods.training_step(method, xs, y, epoch, steps, progress=within / STEPS_PER_EPOCH)
        if within == STEPS_PER_EPOCH - 1:
            methods.run_epoch_passes(method, epoch, "end", train, val, process_group=group)
        history.append(_whole(params))
        if decided is not None:
            now = method.decisions()
            decided.append({k: now[k].clone() for k in DECIDED.get(_method_name(case), ()) if k in now})
    return history


def _state(method):
    """The method state's tensors, whole (DTensors gathered), in a flat list; and its other values."""
    tensors, other = [], []

    def walk(v):
        if isinstance(v, torch.Tensor):
            tensors.append(v.full_tensor() if sharding.is_sharded(v) else v)
        elif isinstance(v, dict):
            for k in sorted(v):
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        else:
            other.append(v)

    walk(method.state_dict()["state"])
    return tensors, other


def _compare(case, got, want, exact=False):
    for step, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            if exact:
                assert torch.equal(a, b), f"{case}: step {step}, parameter {i} differs"
            else:
                torch.testing.assert_close(a, b, msg=lambda m: f"{case}, step {step}, parameter {i}: {m}")


def _compare_decisions(case, got, want):
    assert len(got) == len(want) and (any(want) or _method_name(case) not in DECIDED), case
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), f"{case}, step {step}: decisions {sorted(g)} vs {sorted(w)}"
        for key in g:
            torch.testing.assert_close(g[key], w[key], msg=lambda m: f"{case}, step {step}, decision {key}: {m}")


def _acted(case, method):
    # What shows that the epoch pass acted (the test would mean nothing otherwise).
    name = _method_name(case)
    if name == "relearning":
        assert method.reinits == 2 and float(method.decisions()["weight"].max()) > 0.1, method.decisions()
    if name == "pmr":
        assert method.prototypes is not None and float(method.decisions()["strength"].max()) > 0


def _check_equal(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    own = [dist.new_group([r]) for r in range(world)][rank]
    batches = _batches()
    joint = _train("joint", None, own, rank, batches)
    for case in CASES:
        built, decided, single = _build(case, None, own), [], []
        want = _train(case, None, own, rank, batches, built=built, decided=single)
        _acted(case, built[0])
        solo = _state(built[0])
        built = _build(case, mesh, None)
        got = _train(case, mesh, None, rank, batches, built=built, decided=decided)
        _compare(case, got, want)
        _compare_decisions(case, decided, single)
        tensors, other = _state(built[0])
        assert other == solo[1], case
        for a, b in zip(tensors, solo[0]):
            torch.testing.assert_close(a, b, msg=lambda m: f"{case}, method state: {m}")
        if case != "joint":
            moved = max((a - b).abs().max().item() for a, b in zip(want[-1], joint[-1]))
            assert moved > 1e-4, f"{case}: the parameters equal joint training's; the method did nothing"


def _check_unequal(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    own = [dist.new_group([r]) for r in range(world)][rank]
    batches = _batches()
    for case in UNEQUAL_CASES:
        decided, single = [], []
        want = _train(case, None, own, rank, batches, sizes=UNEQUAL, weighted=True, decided=single)
        got = _train(case, mesh, None, rank, batches, sizes=UNEQUAL, weighted=True, decided=decided)
        _compare(f"{case} (local batches {UNEQUAL})", got, want)
        _compare_decisions(f"{case} (local batches {UNEQUAL})", decided, single)


def _check_refusal(rank: int, world: int) -> None:
    # MLA's projection mixes the columns of each row of the head's weight gradient: a head sharded by columns is
    # refused at the first step, before any sub-step changes a parameter.
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    method, encoders, fusion, params, steps = _build("mla:options", mesh, None)
    fully_shard(method.shared, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    steps = SubSteps(torch.optim.SGD([*params[:-2], *method.shared.parameters()], lr=0.1))
    before = _whole(steps.parameters())
    xs, y = _batches()[0]
    with pytest.raises(ValueError, match=r"^projection: expected the shared head's weight whole or sharded by rows .*"
                                         r"got placements \(Shard\(dim=1\),\)"):
        methods.training_step(method, [x[:B] for x in xs], y[:B], 0, steps, progress=0.0)
    _compare("mla:options (refused)", [_whole(steps.parameters())], [before], exact=True)

    # Sub-steps told to average over another group than the mesh's: refused (FSDP2 reduces over its mesh).
    own = [dist.new_group([r]) for r in range(world)][rank]
    method, encoders, fusion, params, steps = _build("reconboost", mesh, None)
    steps = SubSteps(steps.optimizer, process_group=own)
    with pytest.raises(ValueError, match=r"^process_group: expected None or the group the parameters are sharded "
                                         rf"over .*got a group of ranks \[{rank}\] for a mesh of ranks \[0, 1\]"):
        methods.training_step(method, [x[:B] for x in xs], y[:B], 0, steps)


def _check_checkpoint(rank: int, world: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = init_device_mesh("cpu", (world,))
    batches = _batches()
    path = os.environ["AGM_FAST_TEST_CKPT"]
    half = 3  # mid-epoch 1: the resumed run re-initialises (Re-learning) and changes phase (ReconBoost) after it

    def state_of(built):
        method, encoders, fusion, params, steps = built
        optimizer = steps.optimizer if isinstance(steps, SubSteps) else steps
        model = _holder(encoders, fusion, method)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return model, optimizer, {"model": model_sd, "optim": optim_sd, "method": method.state_dict()}

    for case in CHECKPOINT_CASES:
        built = _build(case, mesh, None)
        _train(case, mesh, None, rank, batches[:half], built=built)
        dcp.save(state_of(built)[2], checkpoint_id=os.path.join(path, case.replace(":", "-")))
        want = _train(case, mesh, None, rank, batches, start=half, built=built)
        want_state = _state(built[0])

        built = _build(case, mesh, None, shift=1.0)
        with torch.no_grad():
            for p in built[0].param_groups(0.1)[0]["params"] if built[0].param_groups(0.1) else []:
                p.add_(1.0)  # the method's own parameters moved too
        model, optimizer, state = state_of(built)
        # A fresh optimizer's state dict has momentum for every parameter; the saved one lacks those no sub-step has
        # reached yet (MLA's unused fusion head, ReconBoost's modality 1 before its stage): they stay zero, which SGD
        # steps as it steps a missing buffer.
        dcp.load(state, checkpoint_id=os.path.join(path, case.replace(":", "-")),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        built[0].load_state_dict(state["method"])
        got = _train(case, mesh, None, rank, batches, start=half, built=built)
        _compare(f"{case} (resumed)", got, want, exact=True)
        tensors, other = _state(built[0])
        assert other == want_state[1], f"{case} (resumed)"
        for a, b in zip(tensors, want_state[0]):
            assert torch.equal(a, b), f"{case}: the resumed method state differs"


def _check_all(rank: int, world: int) -> None:
    _check_equal(rank, world)
    _check_unequal(rank, world)
    _check_refusal(rank, world)
    _check_checkpoint(rank, world)


def test_under_fsdp2_equal_one_process_on_the_global_batch_and_resume_exactly(tmp_path, monkeypatch):
    # One spawn for every check (starting the two ranks costs more than their training): equal halves of 2B, then 5 / 7
    # rows, the refused layout, and the resumed checkpoint; a failure names the check and the case.
    monkeypatch.setenv("AGM_FAST_TEST_CKPT", str(tmp_path))
    _spawn(_check_all, timeout=300.0)
