"""The Lightning and Hugging Face Trainer integrations: two epochs on the embedded data through each equal the plain
method loop to float32 rounding, a checkpoint saved mid-run resumes exactly, Lightning's DDP on two CPU processes
keeps identical replicas, bf16-mixed runs, and the extras stay optional."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from agm_fast import methods
from agm_fast.data import load_mfeat, split_and_standardize
from agm_fast.models import MultiViewModel

HERE = Path(__file__).resolve().parent
ROWS, BATCH, LR, MOMENTUM = 320, 64, 0.05, 0.9
METHODS = ["agm", "ogm_ge"]


@pytest.fixture(scope="module")
def data():
    full = load_mfeat(["fac", "zer"])
    train, _, _ = split_and_standardize(full, 0)
    xs = [x[:ROWS] for x in train.xs]
    return xs, train.y[:ROWS], [x.shape[1] for x in xs], full.num_classes


def build(name, dims, num_classes, seed=0):
    torch.manual_seed(seed)
    model = MultiViewModel(dims, num_classes, "concat", hidden=32, feature_dim=16)
    method = methods.create(name, list(model.encoders), model.fusion, seed=seed)
    return model, method


def batches(xs, y):
    return [([x[i : i + BATCH] for x in xs], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]


def plain_loop(name, data, epochs=2):
    """The reference: agm_fast.methods.training_step over the same batches in order, with SGD."""
    xs, y, dims, C = data
    model, method = build(name, dims, C)
    groups = [{"params": list(model.parameters())}] + method.param_groups(LR)
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM)
    coeffs = []
    for epoch in range(epochs):
        for bx, by in batches(xs, y):
            coeffs.append(methods.training_step(method, bx, by, epoch, opt).coeffs)
    return model, torch.stack(coeffs)


def assert_same_model(a, b, rtol=1e-5, atol=1e-6):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
        else:
            assert torch.equal(p, q), n


# Lightning


def _lightning():
    reason = "lightning is not installed: pip install agm_fast[lightning]"
    return pytest.importorskip("lightning.pytorch", reason=reason)


def _fit(module, loader, epochs, ckpt_path=None, **kwargs):
    pl = _lightning()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def _loader(data):
    xs, y, _, _ = data
    return DataLoader(TensorDataset(*xs, y), batch_size=BATCH, shuffle=False)


@pytest.mark.parametrize("name", METHODS)
def test_lightning_equals_the_plain_loop(name, data):
    from agm_fast.integrations.lightning import BalancedModule

    want_model, want_coeffs = plain_loop(name, data)
    model, method = build(name, *data[2:])
    module = BalancedModule(method, lr=LR, momentum=MOMENTUM)
    _fit(module, _loader(data), 2)
    torch.testing.assert_close(torch.stack(module.callback.coefficients), want_coeffs, rtol=1e-5, atol=1e-6)
    assert_same_model(model, want_model)


@pytest.mark.parametrize("name", METHODS)
def test_a_lightning_checkpoint_resumes_exactly(name, data, tmp_path):
    from agm_fast.integrations.lightning import BalancedModule

    straight_model, method = build(name, *data[2:])
    straight = BalancedModule(method, lr=LR, momentum=MOMENTUM)
    _fit(straight, _loader(data), 2)

    first_model, method = build(name, *data[2:])
    first = BalancedModule(method, lr=LR, momentum=MOMENTUM)
    trainer = _fit(first, _loader(data), 1)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    # A fresh process's view: new weights, a new method; everything comes from the checkpoint.
    resumed_model, method = build(name, *data[2:], seed=123)
    resumed = BalancedModule(method, lr=LR, momentum=MOMENTUM)
    _fit(resumed, _loader(data), 2, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert_same_model(resumed_model, straight_model, rtol=0, atol=0)
    assert torch.equal(torch.stack(resumed.callback.coefficients), torch.stack(straight.callback.coefficients[5:]))


@pytest.mark.parametrize("name", METHODS)
def test_lightning_bf16_mixed(name, data):
    from agm_fast.integrations.lightning import BalancedModule

    model, method = build(name, *data[2:])
    module = BalancedModule(method, lr=LR, momentum=MOMENTUM)
    _fit(module, _loader(data), 2, precision="bf16-mixed")
    coeffs = torch.stack(module.callback.coefficients)
    assert coeffs.shape == (10, 2) and torch.isfinite(coeffs).all()
    assert not torch.equal(coeffs, torch.ones_like(coeffs))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_lightning_ddp_on_two_cpu_processes_keeps_identical_replicas(name, tmp_path):
    _lightning()
    script = HERE / "lightning_ddp.py"
    proc = subprocess.run([sys.executable, str(script), name, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["world_size"] == b["world_size"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["coeffs"], b["coeffs"]) and not torch.equal(a["coeffs"], torch.ones_like(a["coeffs"]))


def test_a_lightning_module_without_modality_metrics_is_refused_for_mslr(data):
    pl = _lightning()
    from agm_fast.integrations.lightning import BalancingCallback

    model, method = build("mslr", *data[2:])

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, idx):
            out = method.forward(list(batch[:-1]), batch[-1], self.current_epoch)
            return method.loss(out, batch[-1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    with pytest.raises(TypeError, match="pl_module: expected a modality_metrics"):
        _fit(Plain(), _loader(data), 1, callbacks=[BalancingCallback(method)])


# Hugging Face Trainer


def _hf():
    pytest.importorskip("transformers", reason="transformers is not installed: pip install agm_fast[hf]")
    pytest.importorskip("accelerate", reason="accelerate is not installed: pip install agm_fast[hf]")


def _hf_train(name, data, out, epochs=2, resume=None, save_steps=None, seed=0):
    from transformers import TrainingArguments

    from agm_fast.integrations.hf import BalancedTrainer, collate

    xs, y, dims, C = data
    model, method = build(name, dims, C, seed=seed)
    args = TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=BATCH, learning_rate=LR,
        max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=True, report_to=[], seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_strategy="no",
        disable_tqdm=True, dataloader_drop_last=False,
    )
    groups = [{"params": list(model.parameters())}] + method.param_groups(LR)
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = BalancedTrainer(method=method, args=args, train_dataset=TensorDataset(*xs, y), data_collator=collate,
                              optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("name", METHODS)
def test_hf_trainer_equals_the_plain_loop(name, data, tmp_path):
    _hf()
    want_model, want_coeffs = plain_loop(name, data)
    model, trainer = _hf_train(name, data, tmp_path)
    torch.testing.assert_close(torch.stack(trainer.balancing.coefficients), want_coeffs, rtol=1e-5, atol=1e-6)
    assert_same_model(model, want_model)


@pytest.mark.parametrize("name", METHODS)
def test_a_hf_checkpoint_resumes_exactly(name, data, tmp_path):
    _hf()
    from agm_fast.integrations.hf import STATE_FILE

    straight, _ = _hf_train(name, data, tmp_path / "straight")
    _hf_train(name, data, tmp_path / "parts", save_steps=5)
    checkpoint = tmp_path / "parts" / "checkpoint-5"
    assert (checkpoint / STATE_FILE).exists()
    resumed, trainer = _hf_train(name, data, tmp_path / "parts", resume=str(checkpoint), seed=123)
    assert len(trainer.balancing.coefficients) == 5
    assert_same_model(resumed, straight, rtol=0, atol=0)


def test_hf_trainer_puts_cggm_heads_in_its_optimizer(data, tmp_path):
    _hf()
    from transformers import TrainingArguments

    from agm_fast.integrations.hf import BalancedTrainer, collate

    xs, y, dims, C = data
    model, method = build("cggm", dims, C)
    heads_before = [p.detach().clone() for p in method.cggm.heads.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=BATCH,
                             learning_rate=LR, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = BalancedTrainer(method=method, args=args, train_dataset=TensorDataset(*xs, y), data_collator=collate)
    trainer.train()
    lrs = sorted(g["initial_lr"] for g in trainer.optimizer.param_groups)
    assert lrs == [LR * 0.5, LR]
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, method.cggm.heads.parameters()))


# Optional extras


@pytest.mark.parametrize("module, blocked", [
    ("agm_fast.integrations.lightning", ("lightning", "lightning.pytorch", "pytorch_lightning")),
    ("agm_fast.integrations.hf", ("transformers",)),
])
def test_an_integration_without_its_trainer_says_what_to_install(module, blocked, monkeypatch):
    import agm_fast

    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=r"pip install \"agm_fast\[(lightning|hf)\]\""):
        importlib.import_module(module)
    assert agm_fast.methods.available()


def test_import_agm_fast_does_not_import_the_trainers():
    code = "import sys, agm_fast; print(any(m.split('.')[0] in ('lightning', 'transformers') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
