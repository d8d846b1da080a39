"""The method-owned step: a toy method that trains one modality at a time runs the same sub-steps through the plain
loop, Lightning (manual optimisation) and the Hugging Face Trainer; its prediction rule is the one evaluation uses; what
an owned step cannot do is refused; methods that do not own their step are untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from agm_fast import methods
from agm_fast.cli.report import evaluate
from agm_fast.fusion import ConcatFusion
from agm_fast.methods.owned_step import SubSteps

M, B, C, D, LR = 2, 8, 3, 4, 0.1


class Alternate(methods.Method):
    """Per batch, one sub-step per modality on its own linear head's loss; prediction: the heads' mean logits."""

    owns_step = True
    windowed = False

    def __init__(self, encoders, fusion, *, window=None, seed=0, task="classification"):
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        self.heads = nn.ModuleList(nn.Linear(D, C) for _ in range(M))
        self.progress_seen = []

    def param_groups(self, lr):
        return [{"params": list(self.heads.parameters())}]

    def train_step(self, inputs, target, epoch, steps, *, progress=None):
        self.progress_seen.append(progress)
        feats = self.encode(inputs)
        losses = []
        # This rank's share of the global batch (None without data parallelism): unequal local batches stay exact.
        share = steps.share(target.shape[0], target.device)
        for m, h in enumerate(feats):
            loss = F.cross_entropy(self.heads[m](h), target)
            steps.run(loss if share is None else loss * share)
            losses.append(loss.detach())
        loss = torch.stack(losses)
        return methods.StepResult(loss.mean(), torch.zeros((), dtype=torch.long), torch.tensor(float(B)),
                                  (loss / loss.sum()).float())

    def predict(self, inputs):
        return sum(head(h) for head, h in zip(self.heads, self.encode(inputs))) / M

    def method_state(self):
        return {"heads": self.heads.state_dict()}

    def load_method_state(self, state):
        self.heads.load_state_dict(state["heads"])


class Parts(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(5, D), nn.Tanh()) for _ in range(M))
        self.fusion = ConcatFusion([D] * M, C)

    def forward(self, *xs):
        return self.fusion(*[enc(x) for enc, x in zip(self.encoders, xs)])


def data(steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randn(B, 5, generator=g) for _ in range(M)], torch.randint(0, C, (B,), generator=g))
            for _ in range(steps)]


def build(seed=0):
    torch.manual_seed(seed)
    parts = Parts()
    method = Alternate(list(parts.encoders), parts.fusion)
    return parts, method


def optimizer(parts, method):
    return torch.optim.SGD([{"params": list(parts.parameters())}] + method.param_groups(LR), lr=LR, momentum=0.9)


def by_hand(parts, method, batches, epochs=1):
    """The sub-steps written out: per modality, its own gradient alone and one SGD step (momentum buffers of
    parameters a sub-step does not reach are left alone)."""
    params = list(parts.parameters()) + list(method.heads.parameters())
    buf = {id(p): None for p in params}
    with torch.no_grad():
        for _ in range(epochs):
            for xs, y in batches:
                with torch.enable_grad():
                    feats = [enc(x) for enc, x in zip(parts.encoders, xs)]
                for m, h in enumerate(feats):
                    with torch.enable_grad():
                        reached = [p for p in params if p.requires_grad]
                        loss = F.cross_entropy(method.heads[m](h), y)
                        grads = torch.autograd.grad(loss, reached, allow_unused=True)
                    for p, g in zip(reached, grads):
                        if g is None:
                            continue
                        b = buf[id(p)]
                        buf[id(p)] = g.clone() if b is None else b.mul_(0.9).add_(g)
                        p.sub_(LR * buf[id(p)])


def assert_same(a, b, **tol):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=lambda m, n=n: f"{n}: {m}", **tol)


def test_training_step_runs_the_methods_own_sub_steps():
    batches = data()
    parts, method = build()
    want_parts, want_method = copy.deepcopy(parts), copy.deepcopy(method)
    want_method.encoders = tuple(want_parts.encoders)
    by_hand(want_parts, want_method, batches)
    opt = optimizer(parts, method)
    steps = SubSteps(opt)
    for i, (xs, y) in enumerate(batches):
        res = methods.training_step(method, xs, y, 0, steps, progress=i / len(batches))
        assert isinstance(res, methods.StepResult) and res.coeffs.shape == (M,)
    assert steps.steps == M * len(batches)
    assert method.progress_seen == [0.0, 0.25, 0.5, 0.75]
    assert_same(parts, want_parts, rtol=1e-6, atol=1e-7)
    assert_same(method.heads, want_method.heads, rtol=1e-6, atol=1e-7)
    # The fusion head, which no sub-step reaches, is never stepped.
    assert all(torch.equal(p, q) for p, q in zip(parts.fusion.parameters(), build()[0].fusion.parameters()))


def test_a_plain_optimizer_is_wrapped_and_errors_name_the_argument():
    parts, method = build()
    xs, y = data(1)[0]
    methods.training_step(method, xs, y, 0, optimizer(parts, method))
    with pytest.raises(ValueError, match=r"progress: expected the fraction of the epoch done, in \[0, 1\], got 1.5"):
        methods.training_step(method, xs, y, 0, optimizer(parts, method), progress=1.5)
    with pytest.raises(TypeError, match="optimizer: expected a torch optimizer"):
        SubSteps(object())
    with pytest.raises(TypeError, match="backward: expected a callable"):
        SubSteps(optimizer(parts, method), backward=3)
    with pytest.raises(TypeError, match="clip: expected a callable"):
        SubSteps(optimizer(parts, method), clip="no")
    # An owned step must return a StepResult.
    method.train_step = lambda *a, **k: 1.0
    with pytest.raises(TypeError, match="Alternate.train_step: expected a StepResult, got float"):
        methods.training_step(method, xs, y, 0, optimizer(parts, method))


def test_sub_steps_clip_and_act_before_each_step():
    parts, method = build()
    opt = optimizer(parts, method)
    seen = []
    steps = SubSteps(opt, clip=lambda params: seen.append(("clip", len(params))))
    xs, y = data(1)[0]
    loss = F.cross_entropy(method.heads[0](parts.encoders[0](xs[0])), y)
    steps.run(loss, before_step=lambda: seen.append(("before", parts.encoders[0][0].weight.grad is not None)))
    # Encoder 0 (weight, bias) and head 0 (weight, bias): the parameters this sub-step reached.
    assert seen == [("before", True), ("clip", 4)]


def test_a_method_that_does_not_own_its_step_is_unchanged():
    parts = Parts()
    method = methods.create("joint", list(parts.encoders), parts.fusion)
    assert not method.owns_step
    xs, y = data(1)[0]
    assert torch.equal(method.predict(xs), method.head(method.encode(xs)))
    with pytest.raises(NotImplementedError, match="joint does not own its step"):
        method.train_step(xs, y, 0, SubSteps(optimizer(parts, method)))
    a, b = copy.deepcopy(parts), copy.deepcopy(parts)
    for p, progress in ((a, None), (b, 0.5)):
        m = methods.create("joint", list(p.encoders), p.fusion)
        methods.training_step(m, xs, y, 0, optimizer(p, m), progress=progress)
    assert_same(a, b, rtol=0, atol=0)


def test_accumulation_is_refused_with_the_reason():
    _, method = build()
    with pytest.raises(ValueError, match="steps: Alternate cannot modulate micro-batches"):
        method.set_accumulation(2)


def test_evaluation_goes_through_the_prediction_rule():
    parts, method = build()
    xs, y = data(1)[0]
    with torch.no_grad():
        logits = method.predict(xs)
    got = evaluate(parts, xs, y, predict=method.predict)
    assert got["acc"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert got["loss"] != pytest.approx(evaluate(parts, xs, y)["loss"], rel=1e-6)


# Lightning: manual optimisation.


def _loader(batches):
    xs = [torch.cat([b[0][m] for b in batches]) for m in range(M)]
    return DataLoader(TensorDataset(*xs, torch.cat([b[1] for b in batches])), batch_size=B, shuffle=False)


def _fit(module, batches, epochs=2, **kwargs):
    pl = pytest.importorskip("lightning.pytorch")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module, _loader(batches))
    return trainer


def test_lightning_runs_the_owned_step_with_manual_optimisation():
    pytest.importorskip("lightning.pytorch")
    from agm_fast.integrations.lightning import BalancedModule

    batches = data()
    want_parts, want_method = build()
    by_hand(want_parts, want_method, batches, epochs=2)
    parts, method = build()
    module = BalancedModule(method, lr=LR, momentum=0.9)
    assert not module.automatic_optimization
    trainer = _fit(module, batches)
    assert trainer.global_step == 2 * len(batches) * M  # Lightning counts every sub-step's optimizer step
    assert len(module.callback.coefficients) == 2 * len(batches)
    assert method.progress_seen[:4] == [0.0, 0.25, 0.5, 0.75]
    assert_same(parts, want_parts, rtol=1e-5, atol=1e-6)
    assert_same(method.heads, want_method.heads, rtol=1e-5, atol=1e-6)
    xs, _ = batches[0]
    torch.testing.assert_close(module(*xs), method.predict(xs))


def test_lightning_refuses_accumulation_and_automatic_optimisation():
    pl = pytest.importorskip("lightning.pytorch")
    from agm_fast.integrations.lightning import BalancedModule, BalancingCallback

    parts, method = build()
    # Lightning refuses accumulation under manual optimisation before the callback would.
    with pytest.raises(Exception, match="gradient accumulation is not supported for manual optimization"):
        _fit(BalancedModule(method, lr=LR), data(), accumulate_grad_batches=2)

    class Automatic(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.parts = parts

        def training_step(self, batch, idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    with pytest.raises(TypeError, match="expected a LightningModule with automatic_optimization = False"):
        _fit(Automatic(), data(), callbacks=[BalancingCallback(method)])


# Hugging Face Trainer: its own training_step.


def _hf_train(method, parts, batches, tmp_path, epochs=2, trainer_cls=None, **kwargs):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from agm_fast.integrations.hf import BalancedTrainer, collate

    loader = _loader(batches)
    options = dict(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=B,
                   learning_rate=LR, max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=True,
                   report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
    options.update(kwargs)
    opt = optimizer(parts, method)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = (trainer_cls or BalancedTrainer)(method=method, args=TrainingArguments(**options),
                                               train_dataset=loader.dataset, data_collator=collate,
                                               optimizers=(opt, sched))
    trainer.train()
    return trainer


def test_hf_trainer_runs_the_owned_step(tmp_path):
    batches = data()
    want_parts, want_method = build()
    by_hand(want_parts, want_method, batches, epochs=2)
    parts, method = build()
    trainer = _hf_train(method, parts, batches, tmp_path)
    assert len(trainer.balancing.coefficients) == 2 * len(batches)
    assert method.progress_seen[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert_same(parts, want_parts, rtol=1e-5, atol=1e-6)
    assert_same(method.heads, want_method.heads, rtol=1e-5, atol=1e-6)
    xs, _ = batches[0]
    trainer.model.eval()
    torch.testing.assert_close(trainer.model(xs)["logits"], method.predict(xs))


def test_hf_trainer_clips_each_sub_step(tmp_path):
    # Each sub-step's gradient is clipped to max_grad_norm before its step: with a tiny norm nothing moves (momentum
    # SGD, one batch: each parameter moves by at most lr * max_grad_norm per sub-step).
    batches = data(1)
    parts, method = build()
    before = copy.deepcopy(parts)
    _hf_train(method, parts, batches, tmp_path, epochs=1, max_grad_norm=1e-6)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(parts.parameters(), before.parameters()))
    assert 0 < moved <= LR * 1e-6
    parts, method = build()
    _hf_train(method, parts, batches, tmp_path, epochs=1)
    assert max(float((p - q).detach().abs().max()) for p, q in zip(parts.parameters(), before.parameters())) > 1e-3


def test_hf_refuses_accumulation_and_the_stock_trainer(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from agm_fast.integrations.hf import BalancedModel, BalancingCallback

    parts, method = build()
    with pytest.raises(ValueError, match="steps: Alternate cannot modulate micro-batches one by one"):
        _hf_train(method, parts, data(), tmp_path, gradient_accumulation_steps=2)

    def stock(method, **kwargs):
        return Trainer(model=BalancedModel(method), callbacks=[BalancingCallback(method)], **kwargs)

    with pytest.raises(TypeError, match="expected agm_fast.integrations.hf.BalancedTrainer"):
        _hf_train(method, parts, data(), tmp_path, trainer_cls=stock)


# Data parallelism in the plain loop: each sub-step's gradients averaged over the ranks.


# MLA with its projection (the global batch's mean features) and each entropy (the global batch's weights).
MLA_CASES = [{"projection": True}, {"projection": True, "entropy": "sample"}]


def _mla(options):
    parts, _ = build()
    method = methods.create("mla", list(parts.encoders), parts.fusion, **options)
    return parts, method, torch.optim.SGD([{"params": list(parts.parameters())}] + method.param_groups(LR), lr=LR,
                                          momentum=0.9)


def _rank(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        part = slice(0, 3) if rank == 0 else slice(3, B)  # unequal local batches: 3 and 5 rows
        parts, method = build()
        steps = SubSteps(optimizer(parts, method))
        for xs, y in data(2):
            methods.training_step(method, [x[part] for x in xs], y[part], 0, steps)
        saved = {"parts": parts.state_dict(), "heads": method.heads.state_dict()}
        for i, options in enumerate(MLA_CASES):
            parts, method, opt = _mla(options)
            coeffs = [methods.training_step(method, [x[part] for x in xs], y[part], 0, opt, progress=j / 2).coeffs
                      for j, (xs, y) in enumerate(data(2))]
            saved[f"mla{i}"] = {"parts": parts.state_dict(), "head": method.shared.state_dict(),
                                "projection": method.method_state()["projection"], "coeffs": torch.stack(coeffs)}
        torch.save(saved, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sub_steps_average_gradients_over_the_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Two ranks on 3 and 5 rows of each batch step as one process on the whole batch: each sub-step's loss is scaled
    # by the rank's share of the batch (the plain mean of the two ranks' means would not be the whole batch's).
    parts, method = build()
    opt = optimizer(parts, method)
    for xs, y in data(2):
        methods.training_step(method, xs, y, 0, opt)
    for r in range(2):
        for key, value in parts.state_dict().items():
            torch.testing.assert_close(got[r]["parts"][key], value, rtol=1e-5, atol=1e-6)
        for key, value in method.heads.state_dict().items():
            torch.testing.assert_close(got[r]["heads"][key], value, rtol=1e-5, atol=1e-6)
    # MLA: its projection reads the whole batch's mean features and its weights are the whole batch's.
    for i, options in enumerate(MLA_CASES):
        parts, method, opt = _mla(options)
        coeffs = torch.stack([methods.training_step(method, xs, y, 0, opt, progress=j / 2).coeffs
                              for j, (xs, y) in enumerate(data(2))])
        want = {"parts": parts.state_dict(), "head": method.shared.state_dict(),
                "projection": {"P": method.method_state()["projection"]}, "coeffs": {"c": coeffs}}
        for r in range(2):
            mine = got[r][f"mla{i}"]
            mine = {**mine, "projection": {"P": mine["projection"]}, "coeffs": {"c": mine["coeffs"]}}
            for part, values in want.items():
                for key, value in values.items():
                    torch.testing.assert_close(mine[part][key], value, rtol=1e-5, atol=1e-6,
                                               msg=lambda m, r=r, i=i, part=part, key=key: f"{options}, rank {r}, "
                                               f"{part}.{key}: {m}")


def test_a_sharding_wrapper_in_a_trainer_is_refused_with_the_reason_and_ddp_is_not(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from agm_fast.methods.owned_step import check_trainer, data_parallel_group

    parts, method = build()
    # Anything but DDP over several processes (here a bare module standing for an FSDP or DeepSpeed wrapper).
    with pytest.raises(NotImplementedError, match="Trainer: Alternate runs its sub-steps on the encoders and its "
                       "shared head directly, outside the wrapper's forward.* got Parts over world size 2"):
        check_trainer(method, world_size=2, where="Trainer", model=parts)
    check_trainer(method, world_size=1, where="Trainer", model=parts)
    check_trainer(methods.create("joint", list(parts.encoders), parts.fusion), world_size=2, where="Trainer")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(parts)
        assert data_parallel_group(ddp) is ddp.process_group and data_parallel_group(parts) is None
        check_trainer(method, world_size=2, where="Trainer", model=ddp)
    finally:
        dist.destroy_process_group()


def test_a_lightning_checkpoint_of_an_owned_step_resumes_exactly(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from agm_fast.integrations.lightning import BalancedModule

    batches = data()

    def fit(module, epochs, ckpt=None):
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, _loader(batches), ckpt_path=ckpt)
        return trainer

    straight_parts, method = build()
    fit(BalancedModule(method, lr=LR, momentum=0.9), 2)
    first_parts, method = build()
    fit(BalancedModule(method, lr=LR, momentum=0.9), 1).save_checkpoint(tmp_path / "mid.ckpt")
    resumed_parts, method = build(seed=5)
    resumed = BalancedModule(method, lr=LR, momentum=0.9)
    trainer = fit(resumed, 2, str(tmp_path / "mid.ckpt"))
    assert trainer.global_step == 2 * len(batches) * M
    assert_same(resumed_parts, straight_parts, rtol=0, atol=0)


def test_the_methods_own_modules_follow_eval_mode_in_every_evaluation():
    # A shared head with dropout: evaluation must put it in eval mode (it is the method's, not the model's).
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")
    from agm_fast.integrations.hf import BalancedModel
    from agm_fast.integrations.lightning import BalancedModule

    parts = Parts()
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(D, C))
    method = methods.create("mla", list(parts.encoders), parts.fusion, head=head)
    xs, y = data(1)[0]
    first = evaluate(parts, xs, y, predict=method.predict, modules=method.modules())
    assert head.training  # restored
    assert evaluate(parts, xs, y, predict=method.predict, modules=method.modules()) == first
    for wrapper in (BalancedModule(method, lr=LR), BalancedModel(method)):
        wrapper.eval()
        assert not head.training
        wrapper.train()
        assert head.training
