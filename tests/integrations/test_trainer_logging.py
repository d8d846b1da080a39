"""The per-modality picture through each trainer's own logger: coefficients and validation accuracies and losses
(agm_fast.validation's one definition) in Lightning's CSV log and in the HF Trainer's log history; MSLR / MSES get
their validation metrics by default."""

import csv

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from agm_fast import methods
from agm_fast.models import MultiViewModel
from agm_fast.validation import modality_metrics

ROWS, VAL, BATCH, C, DIMS = 96, 40, 32, 4, (6, 5)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (ROWS + VAL,), generator=g)
    xs = [torch.randn(ROWS + VAL, d, generator=g) for d in DIMS]
    xs[0][:, :C] += 2 * torch.nn.functional.one_hot(y, C)
    return [x[:ROWS] for x in xs], y[:ROWS], [x[ROWS:] for x in xs], y[ROWS:]


def build(name, **options):
    torch.manual_seed(0)
    model = MultiViewModel(list(DIMS), C, "concat", hidden=16, feature_dim=8)
    return model, methods.create(name, list(model.encoders), model.fusion, seed=0, **options)


def test_lightning_logs_coefficients_and_validation_metrics_per_modality(data, tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed: pip install agm_fast[lightning]")
    from lightning.pytorch.loggers import CSVLogger

    from agm_fast.integrations.lightning import BalancedModule

    xs, y, vx, vy = data
    model, method = build("mslr", history=1)
    module = BalancedModule(method, lr=0.1)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path), name="run"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(TensorDataset(*xs, y), batch_size=BATCH),
                DataLoader(TensorDataset(*vx, vy), batch_size=16))
    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    val = [r for r in rows if r.get("val_acc_0")]
    coeff = [r for r in rows if r.get("coeff_0")]
    assert len(val) == 3 and len(coeff) == 3
    # The last validation ran on the final weights: the logged figures are agm_fast.validation's.
    want = modality_metrics(method, (vx, vy))
    for m in range(2):
        assert float(val[-1][f"val_acc_{m}"]) == pytest.approx(want["modality_accuracy"][m], abs=1e-6)
        assert float(val[-1][f"val_loss_{m}"]) == pytest.approx(want["modality_loss"][m], rel=1e-5)
    assert float(val[-1]["val_acc"]) == pytest.approx(want["accuracy"], abs=1e-6)
    assert module.modality_metrics()["modality_accuracy"] == pytest.approx(want["modality_accuracy"])
    # coeff_m: the mean of the epoch's steps (MSLR with history 1 acts from epoch 2, so they differ from 1 there).
    steps = ROWS // BATCH
    for epoch, row in enumerate(coeff):
        mean = torch.stack(module.callback.coefficients[epoch * steps:(epoch + 1) * steps]).mean(0)
        for m in range(2):
            assert float(row[f"coeff_{m}"]) == pytest.approx(mean[m].item(), rel=1e-6)
    assert float(coeff[2]["coeff_0"]) != 1.0 or float(coeff[2]["coeff_1"]) != 1.0


def _hf_args(out, **kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=BATCH, per_device_eval_batch_size=16,
        learning_rate=0.1, max_grad_norm=0.0, use_cpu=True, report_to=[], seed=0, save_strategy="no",
        logging_strategy="steps", logging_steps=1, disable_tqdm=True, **kwargs,
    )


def test_hf_trainer_logs_per_modality_entries_and_feeds_mslr_from_its_eval_dataset(data, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install agm_fast[hf]")
    pytest.importorskip("accelerate", reason="accelerate is not installed: pip install agm_fast[hf]")
    from agm_fast.integrations.hf import BalancedTrainer, collate

    xs, y, vx, vy = data
    model, method = build("mslr", history=1)
    with pytest.raises(TypeError, match="metrics: mslr follows per-modality validation metrics; pass eval_dataset="):
        BalancedTrainer(method=method, args=_hf_args(tmp_path / "a"), train_dataset=TensorDataset(*xs, y),
                        data_collator=collate)
    trainer = BalancedTrainer(method=method, args=_hf_args(tmp_path / "b"), train_dataset=TensorDataset(*xs, y),
                              eval_dataset=TensorDataset(*vx, vy), data_collator=collate)
    trainer.train()
    history = trainer.state.log_history
    coeffs = [h for h in history if "coeff_0" in h]
    vals = [h for h in history if "val_acc_0" in h]
    assert len(coeffs) >= 3 * (ROWS // BATCH) - 1 and len(vals) == 3
    want = modality_metrics(method, (vx, vy))
    for m in range(2):
        assert vals[-1][f"val_acc_{m}"] == pytest.approx(want["modality_accuracy"][m], abs=1e-6)
        assert vals[-1][f"val_loss_{m}"] == pytest.approx(want["modality_loss"][m], rel=1e-5)
    # Every step's coefficients were logged once (logging_steps=1): their entries are the callback's record.
    logged = torch.tensor([[h["coeff_0"], h["coeff_1"]] for h in coeffs[: len(trainer.balancing.coefficients)]])
    torch.testing.assert_close(logged, torch.stack(trainer.balancing.coefficients)[: len(logged)].float())
    # MSLR followed them: from epoch 2 its ratios moved away from 1.
    assert any((c != 1).any() for c in trainer.balancing.coefficients[2 * (ROWS // BATCH):])
