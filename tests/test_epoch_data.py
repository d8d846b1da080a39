"""Epoch passes with data: what a method that asks for them receives (features without gradients, in eval mode,
the requested fraction, sums over every batch), what it may change, and that a method asking for nothing is left
alone. The plain loop, the CLI, Lightning and the HF Trainer all drive it (the two gloo ranks: tests/scale)."""

import copy

import pytest
import torch
from epoch_recorder import TRAIN_START, VAL_END, C, Recorder, models

from agm_fast import methods
from agm_fast.methods import EpochPass, run_epoch_passes
from agm_fast.methods.epoch_data import split_pass_batch


def loader(n_batches, rows=4, seed=0, dims=(5, 2)):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randn(rows, d, generator=g) for d in dims], torch.randint(0, C, (rows,), generator=g))
            for _ in range(n_batches)]


def features_of(encoders, xs):
    modes = [e.training for e in encoders]
    with torch.no_grad():
        for e in encoders:
            e.eval()
        out = [e(x) for e, x in zip(encoders, xs)]
    for e, m in zip(encoders, modes):
        e.train(m)
    return out


def test_a_pass_gets_eval_features_without_gradients_and_their_sums():
    encoders, fusion = models()
    method = Recorder(encoders, fusion, requests={0: (TRAIN_START, VAL_END)}, shift=0.5)
    train, val = loader(4), loader(2, seed=1)
    bias = fusion.bias.detach().clone()
    report = run_epoch_passes(method, 0, "start", train, val)
    assert report.passes == 1 and report.batches == 4 and report.rows == 16 and report.seconds >= 0
    assert len(method.batches) == 4 and len(method.finished) == 1
    for i, rec in enumerate(method.batches):
        assert rec["index"] == i and not rec["grad"] and rec["training"] == [False, False]
        assert rec["logits"] is None and not any(h.requires_grad for h in rec["features"])
        for h, want in zip(rec["features"], features_of(encoders, train[i][0])):
            torch.testing.assert_close(h, want)
    # The encoders are back in train mode, and the bias moved once (the finish step, without a graph).
    assert all(e.training for e in encoders)
    torch.testing.assert_close(fusion.bias.detach(), bias + 0.5)
    assert fusion.bias.grad_fn is None and not method.finished[0]["grad"]
    sums = method.finished[0]["sums"]
    assert method.finished[0]["epoch"] == 0 and method.finished[0]["request"] == TRAIN_START
    torch.testing.assert_close(sums["rows"], torch.tensor(16.0))
    torch.testing.assert_close(sums["classes"], torch.bincount(torch.cat([y for _, y in train]), minlength=C).float())
    want = torch.cat([features_of(encoders, xs)[1] for xs, _ in train]).sum(0)
    torch.testing.assert_close(sums["feat1"], want)

    run_epoch_passes(method, 0, "end", train, val)
    ends = method.batches[4:]
    assert len(ends) == 2 and method.finished[1]["request"] == VAL_END
    for rec, (xs, y) in zip(ends, val):
        assert torch.equal(rec["target"], y)
        feats = features_of(encoders, xs)
        with torch.no_grad():
            # The logits were taken before this pass's finish step moved the bias again.
            torch.testing.assert_close(rec["logits"], fusion(torch.cat(feats, 1)) - 0.5)


@pytest.mark.parametrize("fraction,n,want", [(0.1, 25, 2), (0.5, 5, 2), (0.1, 5, 1), (1.0, 3, 3), (0.34, 3, 1)])
def test_a_fraction_passes_over_the_first_batches(fraction, n, want):
    encoders, fusion = models()
    method = Recorder(encoders, fusion, default=(EpochPass("train", "start", fraction=fraction),))
    report = run_epoch_passes(method, 3, "start", loader(n, rows=2))
    assert report.batches == want and [r["index"] for r in method.batches] == list(range(want))


def test_train_mode_keeps_batchnorm_in_train_mode():
    encoders, fusion = models()
    method = Recorder(encoders, fusion, default=(EpochPass("train", "start", train_mode=True),))
    for e in encoders:
        e.eval()
    run_epoch_passes(method, 0, "start", loader(1))
    assert method.batches[0]["training"] == [True, True] and not any(e.training for e in encoders)


def test_a_method_that_asks_for_nothing_reads_no_data():
    encoders, fusion = models()

    def never():
        raise AssertionError("the loader was asked for")

    for name in ("joint", "ogm_ge"):
        method = methods.create(name, encoders, fusion)
        assert method.epoch_passes(0) == ()
        state = torch.get_rng_state()
        assert run_epoch_passes(method, 0, "start", never, never) is None
        assert run_epoch_passes(method, 0, "end", never, never) is None
        assert torch.equal(torch.get_rng_state(), state)


def test_errors_name_what_is_wrong():
    encoders, fusion = models()
    method = Recorder(encoders, fusion, default=(VAL_END,))
    with pytest.raises(ValueError, match="val: Recorder asks for a pass over the val data at the end of epoch 2; "
                                         "expected a loader"):
        run_epoch_passes(method, 2, "end", loader(1), None)
    with pytest.raises(ValueError, match="when: expected one of"):
        run_epoch_passes(method, 0, "middle", loader(1))
    bad = [EpochPass("test", "end"), EpochPass("train", "later"), EpochPass("train", "end", fraction=0.0),
           EpochPass("train", "end", fraction=1.5)]
    for request, field in zip(bad, ["split", "when", "fraction", "fraction"]):
        method.default = (request,)
        with pytest.raises(ValueError, match=rf"epoch_passes\(0\)\[0\]\.{field}: expected"):
            run_epoch_passes(method, 0, "end", loader(1), loader(1))
    method.default = (("train", "end"),)
    with pytest.raises(TypeError, match="expected an agm_fast.methods.epoch_data.EpochPass"):
        run_epoch_passes(method, 0, "end", loader(1))
    method.default = (EpochPass("train", "start", fraction=0.5),)
    with pytest.raises(TypeError, match="train: a pass over a fraction 0.5 of the batches needs a loader with len"):
        run_epoch_passes(method, 0, "start", iter(loader(2)))


def test_batch_layouts():
    xs, y = [torch.zeros(2, 1), torch.ones(2, 1)], torch.tensor([0, 1])
    for batch in ((*xs, y), (xs, y), {"inputs": xs, "labels": y}):
        got_xs, got_y = split_pass_batch(batch)
        assert len(got_xs) == 2 and torch.equal(got_y, y) and torch.equal(got_xs[1], xs[1])
    with pytest.raises(KeyError, match="expected the keys 'inputs' and 'labels'"):
        split_pass_batch({"x": xs})
    with pytest.raises(TypeError, match="batch: expected"):
        split_pass_batch(torch.zeros(3))


def test_the_plain_loop_with_passes_trains_as_without_them_when_nothing_changes():
    # Passes that change nothing (eval mode, no_grad, no shift) leave training bitwise as it was.
    torch.manual_seed(0)
    base_enc, base_fus = models()
    batches = loader(3)
    runs = []
    for requests in ({}, {0: (TRAIN_START, VAL_END), 1: (TRAIN_START,)}):
        encoders, fusion = copy.deepcopy(base_enc), copy.deepcopy(base_fus)
        method = Recorder(encoders, fusion, requests=requests)
        params = [p for m in encoders + [fusion] for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        for epoch in range(2):
            run_epoch_passes(method, epoch, "start", batches, batches)
            for xs, y in batches:
                methods.training_step(method, xs, y, epoch, opt)
            run_epoch_passes(method, epoch, "end", batches, batches)
        runs.append((len(method.finished), [p.detach().clone() for p in params],
                     [b.clone() for e in encoders for b in e.buffers()]))
    assert runs[0][0] == 0 and runs[1][0] == 3
    for a, b in zip(runs[0][1] + runs[0][2], runs[1][1] + runs[1][2]):
        assert torch.equal(a, b)


def _lightning_run(tmp_path, requests):
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from torch.utils.data import DataLoader, TensorDataset

    from agm_fast.integrations.lightning import BalancedModule

    encoders, fusion = models()
    method = Recorder(encoders, fusion, requests=requests)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(24, 5, generator=g), torch.randn(24, 2, generator=g)]
    y = torch.randint(0, C, (24,), generator=g)
    train = DataLoader(TensorDataset(*xs, y), batch_size=8)
    val = DataLoader(TensorDataset(*[x[:10] for x in xs], y[:10]), batch_size=4)
    module = BalancedModule(method, lr=0.05)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, train, val)
    return method, module


def test_lightning_passes_over_its_own_dataloaders(tmp_path):
    requests = {0: (TRAIN_START, EpochPass("val", "start")), 1: (VAL_END, EpochPass("train", "end"))}
    method, module = _lightning_run(tmp_path, requests)
    got = [(f["epoch"], f["request"].split, f["request"].when, float(f["sums"]["rows"])) for f in method.finished]
    assert got == [(0, "train", "start", 24.0), (0, "val", "start", 10.0), (1, "val", "end", 10.0),
                   (1, "train", "end", 24.0)]
    assert [e for e, _, _ in module.callback.pass_times] == [0, 1]
    assert all(0 < p <= t for _, p, t in module.callback.pass_times)


def test_hf_trainer_passes_over_its_own_dataloaders(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from torch.utils.data import TensorDataset
    from transformers import TrainingArguments

    from agm_fast.integrations.hf import BalancedTrainer, collate

    encoders, fusion = models()
    method = Recorder(encoders, fusion, requests={0: (TRAIN_START, EpochPass("val", "start")), 1: (VAL_END,)})
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(24, 5, generator=g), torch.randn(24, 2, generator=g)]
    y = torch.randint(0, C, (24,), generator=g)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8,
                             per_device_eval_batch_size=4, learning_rate=0.05, max_grad_norm=0.0, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = BalancedTrainer(method=method, args=args, train_dataset=TensorDataset(*xs, y),
                              eval_dataset=TensorDataset(*[x[:10] for x in xs], y[:10]), data_collator=collate)
    trainer.train()
    got = [(f["epoch"], f["request"].split, f["request"].when, float(f["sums"]["rows"])) for f in method.finished]
    assert got == [(0, "train", "start", 24.0), (0, "val", "start", 10.0), (1, "val", "end", 10.0)]
    assert [e for e, _, _ in trainer.balancing.pass_times] == [0, 1]
