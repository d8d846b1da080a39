"""Gradient accumulation, resume and clipping through the trainers: every method through the HF Trainer and Lightning
with two micro-batches per step equals the plain loop that modulates each micro-batch alone and sums; HF on two gloo
ranks scales the loss once; CGGM's own heads train and resume exactly; a resume reads the method state beside the
checkpoint it resumes from (or stops); the stock Trainer warns when it clips before the modulation; a Lightning
checkpoint taken mid-epoch replays the same batches only with a resumable loader."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from agm_fast import methods
from agm_fast.data import load_mfeat, split_and_standardize
from agm_fast.models import MultiViewModel

HERE = Path(__file__).resolve().parent
MICRO, STEPS, LR, MOMENTUM = 8, 2, 0.05, 0.9

# Options that make each method act from the first step on this tiny problem (as tests/test_accumulation.py).
CASES = {
    "joint": {},
    "agm": {"alpha": 1.5},
    "ogm": {"alpha": 0.8},
    "ogm_ge": {"alpha": 0.8},
    "opm": {"warmup_epochs": 0, "p_exe": 1.0},
    "cggm": {"rho": 2.0, "lam": 0.2, "clip_grad_norm": None},
    "mslr": {"history": 1},
    "mses": {"patience": 0},
    "mlb": {"alpha": 0.8},
    "amss": {},
    "amss_plus": {},
    # GDL's clip acts once per step on the summed gradient (tests/test_accumulation.py), so the definition is without.
    "gdl": {"clip_grad_norm": None},
    # Methods that refuse accumulation: the trainers must raise their error.
    "inforeg": {},
    "mmpareto": {},
    # Methods that own their step (docs/owned-step.md) refuse it too.
    "mla": {},
    "reconboost": {},
    # Methods with epoch passes: PMR's prototypes from the first tenth of the training batches (the trainers run the
    # passes over their own loaders, the reference below over the same micro-batches); relearning acts from epoch 20.
    "pmr": {},
    "relearning": {},
}
# Fixed validation metrics for the methods that follow them (MSLR, MSES), given at every epoch end.
METRICS = {"modality_accuracy": [0.8, 0.3], "modality_loss": [0.5, 1.5]}


def _metrics(epoch):
    return METRICS


@pytest.fixture(scope="module")
def data():
    full = load_mfeat(["fac", "zer"])
    train, _, _ = split_and_standardize(full, 0)
    xs = [x[:128] for x in train.xs]
    return xs, train.y[:128], [x.shape[1] for x in xs], full.num_classes


def build(name, dims, num_classes, seed=0, batchnorm=True, **options):
    torch.manual_seed(seed)
    model = MultiViewModel(dims, num_classes, "concat", hidden=16, feature_dim=8)
    if not batchnorm:
        # Under DDP each rank normalises its own rows: without BatchNorm a rank's rows are one process's.
        for encoder in model.encoders:
            encoder[1] = torch.nn.Identity()
    options = {**CASES.get(name, {}), **options}
    method = methods.create(name, list(model.encoders), model.fusion, seed=seed, **options)
    return model, method


def _optimizer(model, method):
    groups = [{"params": list(model.parameters())}] + method.param_groups(LR)
    return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM)


def reference(name, data, rows, micro, k, epochs=2, batchnorm=True, **options):
    """The definition: each micro-batch (``micro`` rows, loss / k) modulated alone, the gradients summed over the k
    micro-batches of a step, then SGD; every epoch ends with the fixed metrics."""
    xs, y, dims, C = data
    assert rows <= len(y) and rows % (micro * k) == 0
    model, method = build(name, dims, C, batchnorm=batchnorm, **options)
    opt = _optimizer(model, method)
    params = [p for g in opt.param_groups for p in g["params"]]
    loader = [([x[s : s + micro] for x in xs], y[s : s + micro]) for s in range(0, rows, micro)]
    for epoch in range(epochs):
        methods.run_epoch_passes(method, epoch, "start", loader, None)
        for start in range(0, rows, micro * k):
            total = [None] * len(params)
            for s in range(start, start + micro * k, micro):
                bx, by = [x[s : s + micro] for x in xs], y[s : s + micro]
                for p in params:
                    p.grad = None
                out = method.forward(bx, by, epoch)
                (method.loss(out, by) / k).backward()
                method.before_optimizer_step(out, by)
                total = [t if p.grad is None else (p.grad.clone() if t is None else t + p.grad)
                         for t, p in zip(total, params)]
            for p, t in zip(params, total):
                p.grad = t
            opt.step()
        if method.needs_epoch_metrics:
            method.end_epoch(epoch, METRICS)
        methods.run_epoch_passes(method, epoch, "end", loader, None)
    return model, method


def assert_same_parameters(a, b, rtol=1.3e-6, atol=1e-5):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _refuses(name):
    return methods.get(name).cls.accumulation == "refused"


# Hugging Face Trainer


def _hf():
    pytest.importorskip("transformers", reason="transformers is not installed: pip install agm_fast[hf]")
    pytest.importorskip("accelerate", reason="accelerate is not installed: pip install agm_fast[hf]")


def _hf_args(out, micro, k, epochs=2, **kwargs):
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=micro, learning_rate=LR,
        gradient_accumulation_steps=k, max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=True,
        report_to=[], seed=0, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_drop_last=False,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def hf_train(name, data, out, rows, micro=MICRO, k=STEPS, resume=None, seed=0, options=None, val=False, **kwargs):
    from agm_fast.integrations.hf import BalancedTrainer, collate

    xs, y, dims, C = data
    model, method = build(name, dims, C, seed=seed, **(options or {}))
    opt = _optimizer(model, method)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    # val: the next rows as the eval dataset (for the epoch passes over validation data).
    held_out = TensorDataset(*[x[rows : 2 * rows] for x in xs], y[rows : 2 * rows]) if val else None
    trainer = BalancedTrainer(
        method=method, metrics=_metrics if method.needs_epoch_metrics else None, args=_hf_args(out, micro, k, **kwargs),
        train_dataset=TensorDataset(*[x[:rows] for x in xs], y[:rows]), eval_dataset=held_out, data_collator=collate,
        optimizers=(opt, sched),
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("name", list(CASES))
def test_hf_accumulation_equals_each_micro_batch_modulated_alone(name, data, tmp_path):
    _hf()
    assert set(CASES) == set(methods.available()), "a new method: add its options to CASES"
    rows = MICRO * STEPS * 2
    if _refuses(name):
        with pytest.raises(ValueError, match="^steps: "):
            hf_train(name, data, tmp_path, rows)
        return
    want, _ = reference(name, data, rows, MICRO, STEPS)
    got, trainer = hf_train(name, data, tmp_path, rows)
    assert trainer.state.global_step == 4 and len(trainer.balancing.coefficients) == 4
    assert_same_parameters(got, want)


# Epoch passes with accumulation: relearning's pass reads every row of the data and it changes no step's gradient, so
# k micro-batches of B rows are one batch of k B rows (docs/training-at-scale.md). PMR's prototype term is each
# micro-batch's own (the accumulation tests above); its pass reads the first tenth of the batches, which depends on B.
# Relearning re-initialises its encoders after epoch 1, from passes over the training and the validation data (the
# next rows), by the gap between their purities; no BatchNorm, which would normalise B rows, not k B.
RELEARN_NOW = {"reinit_epoch": 1, "kmeans_restarts": 2, "batchnorm": False}


@pytest.fixture(scope="module")
def mixed():
    """64 rows of every class (the split is sorted by class): 32 to train on, the next 32 to validate on."""
    full = load_mfeat(["fac", "zer"])
    train, _, _ = split_and_standardize(full, 0)
    xs = [x[::18][:64] for x in train.xs]
    return xs, train.y[::18][:64], [x.shape[1] for x in xs], full.num_classes


@pytest.mark.parametrize("trainer", ["hf", "lightning"])
def test_accumulated_micro_batches_with_an_epoch_pass_are_one_batch_of_k_times_the_rows(trainer, mixed, tmp_path):
    data, rows = mixed, MICRO * STEPS * 2
    if trainer == "hf":
        _hf()
        got, t = hf_train("relearning", data, tmp_path / "k", rows, options=RELEARN_NOW, val=True)
        assert t.balancing.method.reinits == 1 and t.state.global_step == 4
        want, _ = hf_train("relearning", data, tmp_path / "one", rows, micro=MICRO * STEPS, k=1, options=RELEARN_NOW,
                           val=True)
    else:
        _lightning()
        xs, y, dims, C = data
        dataset = TensorDataset(*[x[:rows] for x in xs], y[:rows])
        held_out = TensorDataset(*[x[rows : 2 * rows] for x in xs], y[rows : 2 * rows])
        got, method = build("relearning", dims, C, **RELEARN_NOW)
        fitted = _fit(_module(method), DataLoader(dataset, batch_size=MICRO), accumulate_grad_batches=STEPS,
                      val_dataloaders=DataLoader(held_out, batch_size=MICRO))
        assert method.reinits == 1 and fitted.global_step == 4
        want, once = build("relearning", dims, C, **RELEARN_NOW)
        _fit(_module(once), DataLoader(dataset, batch_size=MICRO * STEPS),
             val_dataloaders=DataLoader(held_out, batch_size=MICRO))
    assert_same_parameters(got, want)


# Lightning


def _lightning():
    reason = "lightning is not installed: pip install agm_fast[lightning]"
    return pytest.importorskip("lightning.pytorch", reason=reason)


def _module(method):
    from agm_fast.integrations.lightning import BalancedModule

    class Module(BalancedModule):
        def modality_metrics(self):
            return METRICS

    return Module(method, lr=LR, momentum=MOMENTUM)


def _fit(module, loader, epochs=2, ckpt_path=None, val_dataloaders=None, **kwargs):
    pl = _lightning()
    kwargs = {"enable_checkpointing": False, **kwargs}
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module, loader, val_dataloaders, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("name", list(CASES))
def test_lightning_accumulation_equals_each_micro_batch_modulated_alone(name, data):
    _lightning()
    xs, y, dims, C = data
    rows = MICRO * STEPS * 2
    loader = DataLoader(TensorDataset(*[x[:rows] for x in xs], y[:rows]), batch_size=MICRO, shuffle=False)
    model, method = build(name, dims, C)
    module = _module(method)
    if _refuses(name):
        # A method that owns its step trains under manual optimisation, where Lightning refuses accumulation itself,
        # before any callback runs.
        manual = "gradient accumulation is not supported for manual optimization"
        with pytest.raises(Exception, match=manual if method.owns_step else "^steps: "):
            _fit(module, loader, accumulate_grad_batches=STEPS)
        return
    want, _ = reference(name, data, rows, MICRO, STEPS)
    trainer = _fit(module, loader, accumulate_grad_batches=STEPS)
    assert trainer.global_step == 4 and len(module.callback.coefficients) == 4
    assert_same_parameters(model, want)


# HF under DDP: two gloo ranks through torchrun


# The options hf_ddp.py builds with where they differ from CASES.
HF_DDP_OPTIONS = {"gdl": {"clip_grad_norm": 0.5}}


@pytest.mark.parametrize("k, names", [(2, ["joint", "agm", "ogm"]), (1, ["mmpareto", "gdl"])])
def test_hf_ddp_accumulation_scales_the_loss_once(k, names, data, tmp_path):
    # k = 1: MMPareto's heads live in BalancedModel (inside DDP), which finds unused parameters; GDL's clip binds.
    _hf()
    script = HERE / "hf_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           str(tmp_path), str(k), *names]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = 2 * 16 * k * 2
    for name in names:
        a, b = (torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1))
        assert a["world_size"] == b["world_size"] == 2 and a["steps"] == 4
        want, _ = reference(name, data, rows, 32, k, batchnorm=False, **HF_DDP_OPTIONS.get(name, {}))
        for (n, p) in want.named_parameters():
            assert torch.equal(a["model"][n], b["model"][n]), f"{name}: {n} differs between the ranks"
            torch.testing.assert_close(a["model"][n], p.detach(), rtol=1.3e-6, atol=1e-5,
                                       msg=lambda m, n=n, name=name: f"{name}, {n}: {m}")


# Methods that own their step under DDP (two gloo ranks), in both trainers: the sub-steps run outside DDP's reducer and
# SubSteps averages their gradients over DDP's group. Options and epochs as hf_ddp.py and lightning_ddp.py build them:
# MLA's projection reads the global batch's mean features; ReconBoost boosts, rectifies and boosts again (from stage 1
# on with its gradient-assist term).
OWNED = {"mla": ({"projection": True}, 2), "reconboost": ({"epochs_per_stage": 1, "correct_epochs": 1}, 3)}


def owned_reference(name, data, rows=64, batch=32):
    """One process on the global batches: agm_fast.methods.training_step with SGD, progress = batch index / batches
    (what both trainers pass). Returns the model, the method and each step's coefficients."""
    xs, y, dims, C = data
    options, epochs = OWNED[name]
    model, method = build(name, dims, C, batchnorm=False, **options)
    opt = _optimizer(model, method)
    starts = range(0, rows, batch)
    coeffs = []
    for epoch in range(epochs):
        for i, s in enumerate(starts):
            coeffs.append(methods.training_step(method, [x[s : s + batch] for x in xs], y[s : s + batch], epoch, opt,
                                                progress=i / len(starts)).coeffs)
    return model, method, torch.stack(coeffs)


def _assert_same_state(got, want, where):
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _assert_same_state(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5, msg=lambda m: f"{where}: {m}")
    else:
        assert got == want, where


def _check_owned_ranks(data, out, names, steps):
    for name in names:
        a, b = (torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1))
        assert a["world_size"] == b["world_size"] == 2 and a["steps"] == steps[name], name
        want, method, coeffs = owned_reference(name, data)
        # The coefficients (MLA: the test-time weights of each global batch) agree between the ranks and with it.
        for r, got in enumerate((a, b)):
            torch.testing.assert_close(got["coeffs"], coeffs, rtol=1.3e-6, atol=1e-5,
                                       msg=lambda m, r=r, name=name: f"{name}, rank {r} coefficients: {m}")
        for n, p in want.named_parameters():
            assert torch.equal(a["model"][n], b["model"][n]), f"{name}: {n} differs between the ranks"
            torch.testing.assert_close(a["model"][n], p.detach(), rtol=1.3e-6, atol=1e-5,
                                       msg=lambda m, n=n, name=name: f"{name}, {n}: {m}")
        state = method.method_state()
        for r, got in enumerate((a, b)):
            _assert_same_state(got["method"], state, f"{name} rank {r} method state")


def test_hf_ddp_trains_methods_that_own_their_step_as_one_process(data, tmp_path):
    _hf()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(HERE / "hf_ddp.py"), str(tmp_path), "1", *OWNED]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The Trainer counts one step per batch: 2 batches of 2 * 16 rows per epoch.
    _check_owned_ranks(data, tmp_path, OWNED, {name: 2 * epochs for name, (_, epochs) in OWNED.items()})


def test_lightning_ddp_trains_methods_that_own_their_step_as_one_process(data, tmp_path):
    _lightning()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE / "lightning_ddp.py"), "owned", str(tmp_path), *OWNED]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # Lightning counts every optimizer step: MLA takes one per modality and batch, ReconBoost one per batch.
    _check_owned_ranks(data, tmp_path, OWNED, {"mla": 2 * 2 * 2, "reconboost": 2 * 3})


def test_hf_ddp_refuses_ogm_ge_accumulation(tmp_path):
    _hf()
    script = HERE / "hf_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           str(tmp_path), "2", "ogm_ge"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    assert "steps: OGM-GE's noise needs each micro-batch's gradient averaged over the ranks" in proc.stderr


# CGGM: the method's own heads


def test_hf_cggm_heads_train_with_the_model_and_resume_exactly(data, tmp_path):
    _hf()
    from agm_fast.integrations.hf import STATE_FILE

    rows, options = MICRO * 4, {"clip_grad_norm": 0.8}
    want, want_method = reference("cggm", data, rows, MICRO, 1, **options)
    straight, trainer = hf_train("cggm", data, tmp_path / "straight", rows, k=1, options=options)
    assert_same_parameters(straight, want)
    assert_same_parameters(trainer.balancing.method.cggm.heads, want_method.cggm.heads)

    hf_train("cggm", data, tmp_path / "parts", rows, k=1, options=options, save_strategy="steps", save_steps=4)
    checkpoint = tmp_path / "parts" / "checkpoint-4"
    assert (checkpoint / STATE_FILE).exists()
    resumed, again = hf_train("cggm", data, tmp_path / "parts", rows, k=1, options=options, resume=str(checkpoint),
                              seed=123)
    assert len(again.balancing.coefficients) == 4
    assert_same_parameters(resumed, straight, rtol=0, atol=0)
    assert_same_parameters(again.balancing.method.cggm.heads, trainer.balancing.method.cggm.heads, rtol=0, atol=0)


# Resume from a checkpoint somewhere else


def test_hf_resume_from_a_moved_checkpoint_continues_the_method_state(data, tmp_path):
    _hf()
    from agm_fast.integrations.hf import STATE_FILE

    rows = MICRO * STEPS * 4
    straight, trainer = hf_train("ogm_ge", data, tmp_path / "straight", rows, epochs=1)
    hf_train("ogm_ge", data, tmp_path / "parts", rows, epochs=1, save_strategy="steps", save_steps=2)
    moved = tmp_path / "elsewhere" / "kept"
    shutil.copytree(tmp_path / "parts" / "checkpoint-2", moved)
    # A new output folder, without the first run's checkpoints: only the copy holds the method state.
    resumed, again = hf_train("ogm_ge", data, tmp_path / "new", rows, epochs=1, resume=str(moved), seed=123)
    assert again.balancing.method.ogm.offset == trainer.balancing.method.ogm.offset
    assert torch.equal(torch.stack(again.balancing.coefficients), torch.stack(trainer.balancing.coefficients[2:]))
    assert_same_parameters(resumed, straight, rtol=0, atol=0)

    os.remove(moved / STATE_FILE)
    with pytest.raises(FileNotFoundError, match=f"^resume_from_checkpoint: no {STATE_FILE} in .*kept"):
        hf_train("ogm_ge", data, tmp_path / "new", rows, epochs=1, resume=str(moved))


# Clipping order


def test_the_stock_trainer_warns_when_it_clips_before_the_callback(data, tmp_path):
    _hf()
    from transformers import Trainer

    from agm_fast.integrations.hf import BalancedModel, BalancedTrainer, BalancingCallback, collate

    xs, y, dims, C = data
    dataset = TensorDataset(*[x[:MICRO] for x in xs], y[:MICRO])
    model, method = build("ogm", dims, C)
    args = _hf_args(tmp_path / "stock", MICRO, 1, epochs=1, max_grad_norm=1.0)
    stock = Trainer(model=BalancedModel(method), args=args, train_dataset=dataset, data_collator=collate,
                    callbacks=[BalancingCallback(method)])
    with pytest.warns(UserWarning, match="^max_grad_norm: the stock Trainer clips the gradients before"):
        stock.train()

    model, method = build("ogm", dims, C)
    args = _hf_args(tmp_path / "balanced", MICRO, 1, epochs=1, max_grad_norm=1.0)
    balanced = BalancedTrainer(method=method, args=args, train_dataset=dataset, data_collator=collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        balanced.train()
    assert not [w for w in caught if "max_grad_norm" in str(w.message)]


# Lightning: a checkpoint taken mid-epoch


class ResumableLoader:
    """A loader that Lightning can resume mid-epoch: its state is how many batches of the epoch were consumed."""

    def __init__(self, dataset, batch_size):
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        self.consumed = 0
        self._skip = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.consumed = skip
        for i, batch in enumerate(self.loader):
            if i < skip:
                continue
            self.consumed = i + 1
            yield batch

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self._skip = state["consumed"]


@pytest.mark.parametrize("resumable", [False, True])
def test_a_lightning_mid_epoch_checkpoint(resumable, data, tmp_path):
    pl = _lightning()
    xs, y, dims, C = data
    rows = MICRO * STEPS * 4          # 8 micro-batches, 4 optimizer steps per epoch
    dataset = TensorDataset(*[x[:rows] for x in xs], y[:rows])

    def loader():
        return ResumableLoader(dataset, MICRO) if resumable else DataLoader(dataset, batch_size=MICRO)

    straight_model, method = build("ogm_ge", dims, C)
    straight = _module(method)
    _fit(straight, loader(), epochs=1, accumulate_grad_batches=STEPS)

    first_model, method = build("ogm_ge", dims, C)
    first = _module(method)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _fit(first, loader(), epochs=1, accumulate_grad_batches=STEPS, enable_checkpointing=True, callbacks=[saver])
    mid = next(p for p in tmp_path.iterdir() if "step=2" in p.name)

    resumed_model, method = build("ogm_ge", dims, C, seed=123)
    resumed = _module(method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(resumed, loader(), epochs=1, accumulate_grad_batches=STEPS, ckpt_path=str(mid))
    warned = any("ended before the epoch ended" in str(w.message) for w in caught)
    # The method state is restored either way: the noise stream continues where the checkpoint left it.
    assert len(resumed.callback.coefficients) == 2
    assert resumed.method.ogm.offset == straight.method.ogm.offset
    if resumable:
        assert not warned
        assert torch.equal(torch.stack(resumed.callback.coefficients), torch.stack(straight.callback.coefficients[2:]))
        assert_same_parameters(resumed_model, straight_model, rtol=0, atol=0)
    else:
        # A plain DataLoader starts the epoch again: the two remaining steps see the epoch's first four batches, as in
        # one run over the first half of the rows twice.
        assert warned
        twice = TensorDataset(*[torch.cat([x[: rows // 2]] * 2) for x in xs], torch.cat([y[: rows // 2]] * 2))
        replay_model, method = build("ogm_ge", dims, C)
        replay = _module(method)
        _fit(replay, DataLoader(twice, batch_size=MICRO), epochs=1, accumulate_grad_batches=STEPS)
        assert torch.equal(torch.stack(resumed.callback.coefficients), torch.stack(replay.callback.coefficients[2:]))
        assert_same_parameters(resumed_model, replay_model, rtol=0, atol=0)
