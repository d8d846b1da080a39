"""ReconBoost (docs/methods.md, section 17): the schedule, the boosting and rectification steps and the
gradient-assist switch derived by hand, the momentum restart per phase, the ensemble's prediction, M = 3, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agm_fast import cli, methods
from agm_fast.fusion import ConcatFusion

B, C, D, DIN, LR = 6, 3, 4, 5, 0.1


def model(M, seed=0):
    torch.manual_seed(seed)
    encoders = [nn.Sequential(nn.Linear(DIN, D), nn.Tanh()) for _ in range(M)]
    head = nn.Sequential(nn.Linear(D, 5), nn.ReLU(), nn.Linear(5, C))
    return encoders, ConcatFusion([D] * M, C), head


def batch(M, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, DIN, generator=g) for _ in range(M)], torch.randint(0, C, (B,), generator=g)


def build(M, **kwargs):
    encoders, fusion, head = model(M)
    method = methods.create("reconboost", encoders, fusion, head=head, **{"epochs_per_stage": 1,
                                                                          "correct_epochs": 1, **kwargs})
    params = [p for e in encoders for p in e.parameters()] + list(fusion.parameters())
    opt = torch.optim.SGD([{"params": params}] + method.param_groups(LR), lr=LR)
    return encoders, head, method, opt


def params_of(encoders, head, method):
    return [p.detach().clone() for e in encoders for p in e.parameters()] + [
        p.detach().clone() for p in head.parameters()] + [method.rate.detach().clone()]


def sgd_by_hand(encoders, head, rate, loss_fn):
    """One plain SGD step on a copy: p - lr * d loss / d p for every parameter that the loss reaches."""
    params = [p for e in encoders for p in e.parameters()] + list(head.parameters()) + [rate]
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    return [(p - LR * g if g is not None else p).detach() for p, g in zip(params, grads)]


def assert_params(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m, i=i: f"parameter {i}: {m}")


def test_the_schedule_by_hand():
    _, _, method, _ = build(3, epochs_per_stage=2, correct_epochs=1)
    # Stage s spans epochs 3s .. 3s+2: two boosting epochs of modality s % 3, then one of rectification.
    want = [(0, 0, True), (0, 0, True), (0, 0, False), (1, 1, True), (1, 1, True), (1, 1, False), (2, 2, True),
            (2, 2, True), (2, 2, False), (3, 0, True)]
    assert [method.schedule(e) for e in range(10)] == want


def copies(encoders, head, method):
    e, h = copy.deepcopy(encoders), copy.deepcopy(head)
    r = method.rate.detach().clone().requires_grad_(True)
    return e, h, r


def out(enc, head, x):
    return head(enc(x))


@pytest.mark.parametrize("ga_gradient", [False, True])
def test_boosting_and_rectification_steps_by_hand(ga_gradient):
    M = 2
    encoders, head, method, opt = build(M, ga_gradient=ga_gradient)
    xs, y = batch(M)
    t = F.one_hot(y, C).float()
    w1, w2, gw = 5.0, 1.0, 0.5

    # Stage 0, boosting modality 0: nobody else is in the ensemble, so the others' probability is 1.
    e, h, r = copies(encoders, head, method)
    want = sgd_by_hand(e, h, r, lambda: (-(w1 - w2) * (t * out(e[0], h, xs[0]).log_softmax(1)).mean(-1)).mean())
    res = methods.training_step(method, xs, y, 0, opt)
    assert_params(params_of(encoders, head, method), want)
    assert torch.equal(res.coeffs, torch.tensor([1.0, 0.0]))

    # Stage 0, rectification: cross-entropy of rate * head(enc_0(x_0)) (modality 1 is not trained yet).
    e, h, r = copies(encoders, head, method)
    want = sgd_by_hand(e, h, r, lambda: F.cross_entropy(r * out(e[0], h, xs[0]), y))
    res = methods.training_step(method, xs, y, 1, opt)
    assert_params(params_of(encoders, head, method), want)
    assert torch.equal(res.coeffs, torch.tensor([1.0, 0.0]))

    # Stage 1, boosting modality 1 against the ensemble of modality 0, plus the gradient-assist term (a constant
    # unless ga_gradient).
    e, h, r = copies(encoders, head, method)

    def boost():
        o = out(e[1], h, xs[1])
        q = (r * out(e[0], h, xs[0])).detach().softmax(1)
        logp = o.log_softmax(1)
        loss = (-w1 * (t * logp).mean(-1) + w2 * (t * q * logp).mean(-1)).mean()
        pre = out(e[0], h, xs[0]).detach().softmax(1)
        mine = o.softmax(1) if ga_gradient else o.detach().softmax(1)
        return loss + gw * ((mine - pre) ** 2).mean()

    want = sgd_by_hand(e, h, r, boost)
    res = methods.training_step(method, xs, y, 2, opt)
    assert_params(params_of(encoders, head, method), want)
    assert torch.equal(res.coeffs, torch.tensor([0.0, 1.0]))
    assert set(method.decisions()) == {"boost_rate", "ga_loss"}

    # Stage 1, rectification: both modalities, and the boost rate learns.
    e, h, r = copies(encoders, head, method)
    want = sgd_by_hand(e, h, r, lambda: F.cross_entropy(r * (out(e[0], h, xs[0]) + out(e[1], h, xs[1])), y))
    rate = method.rate.detach().clone()
    res = methods.training_step(method, xs, y, 3, opt)
    assert_params(params_of(encoders, head, method), want)
    assert not torch.equal(method.rate.detach(), rate)
    torch.testing.assert_close(res.coeffs, rate.expand(2))  # the weights in this step's loss
    with torch.no_grad():
        torch.testing.assert_close(method.predict(xs), method.rate * (out(encoders[0], head, xs[0])
                                                                       + out(encoders[1], head, xs[1])))


def test_ga_gradient_changes_the_boosting_step():
    got = []
    for ga_gradient in (False, True):
        encoders, head, method, opt = build(2, ga_gradient=ga_gradient)
        xs, y = batch(2)
        for epoch in range(3):
            methods.training_step(method, xs, y, epoch, opt)
        got.append(params_of(encoders, head, method))
    assert any(not torch.allclose(a, b) for a, b in zip(*got))


def test_each_phase_restarts_the_momentum_of_its_parameters():
    encoders, fusion, head = model(2)
    method = methods.create("reconboost", encoders, fusion, head=head, epochs_per_stage=2, correct_epochs=1)
    params = [p for e in encoders for p in e.parameters()] + list(fusion.parameters())
    opt = torch.optim.SGD([{"params": params}] + method.param_groups(LR), lr=LR, momentum=0.9)
    xs, y = batch(2)
    methods.training_step(method, xs, y, 0, opt)
    methods.training_step(method, xs, y, 1, opt)  # same phase: the momentum buffer grows
    buf = opt.state[encoders[0][0].weight]["momentum_buffer"].clone()
    # The first step of the next phase (rectification) is a plain SGD step: its buffer is this step's gradient.
    e, h, r = copies(encoders, head, method)
    grad = torch.autograd.grad(F.cross_entropy(r * out(e[0], h, xs[0]), y), e[0][0].weight)[0]
    methods.training_step(method, xs, y, 2, opt)
    new = opt.state[encoders[0][0].weight]["momentum_buffer"]
    torch.testing.assert_close(new, grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(new, 0.9 * buf + grad)


def test_three_modalities_boost_against_every_trained_other():
    M = 3
    encoders, head, method, opt = build(M)
    xs, y = batch(M)
    for epoch in range(4):  # stages 0 and 1
        methods.training_step(method, xs, y, epoch, opt)
    t = F.one_hot(y, C).float()
    e, h, r = copies(encoders, head, method)

    def boost():  # stage 2 boosts modality 2 against 0 and 1; its gradient-assist partner is modality 1
        o = out(e[2], h, xs[2])
        q = (r * (out(e[0], h, xs[0]) + out(e[1], h, xs[1]))).detach().softmax(1)
        logp = o.log_softmax(1)
        return (-5.0 * (t * logp).mean(-1) + (t * q * logp).mean(-1)).mean()

    want = sgd_by_hand(e, h, r, boost)
    methods.training_step(method, xs, y, 4, opt)
    assert_params(params_of(encoders, head, method), want)


def test_before_any_step_the_prediction_is_every_modality():
    encoders, head, method, _ = build(2)
    xs, _ = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(method.predict(xs), out(encoders[0], head, xs[0]) + out(encoders[1], head, xs[1]))


def test_state_round_trips():
    encoders, head, method, opt = build(2)
    xs, y = batch(2)
    for epoch in range(4):
        methods.training_step(method, xs, y, epoch, opt)
    state = copy.deepcopy(method.state_dict())
    fresh = build(2)[2]
    fresh.load_state_dict(state)
    assert fresh.method_state()["phase"] == [1, False]
    assert torch.equal(fresh.rate.detach(), method.rate.detach())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"window": (0, 3)}, ValueError, "window: ReconBoost's stages are its schedule"),
    ({"task": "regression"}, ValueError, "task: ReconBoost's boosting loss reads class probabilities"),
    ({"epochs_per_stage": 0}, ValueError, "epochs_per_stage: expected"),
    ({"correct_epochs": -1}, ValueError, "correct_epochs: expected"),
    ({"weight1": -1.0}, ValueError, "weight1: expected"),
    ({"ga_gradient": 1}, TypeError, "ga_gradient: expected True or False"),
    ({"head": 3}, TypeError, "head: expected an nn.Module"),
])
def test_errors_name_the_argument(kwargs, error, match):
    encoders, fusion, _ = model(2)
    with pytest.raises(error, match=match):
        methods.create("reconboost", encoders, fusion, **kwargs)


def test_unequal_feature_sizes_need_a_head_of_ones_own_and_accumulation_is_refused():
    encoders = [nn.Linear(DIN, 4), nn.Linear(DIN, 6)]
    with pytest.raises(ValueError, match=r"feature_dims: ReconBoost's shared head .* got \[4, 6\]"):
        methods.create("reconboost", encoders, ConcatFusion([4, 6], C))
    method = methods.create("reconboost", *model(2)[:2])
    with pytest.raises(ValueError, match="steps: reconboost cannot modulate micro-batches"):
        method.set_accumulation(2)


def test_the_command_line_trains_it(tmp_path, capsys):
    rc = cli.main(["train", "--method", "reconboost", "--epochs-per-stage", "1", "--correct-epochs", "1", "--epochs",
                   "2", "--out", str(tmp_path), "--no-plot", "--hidden", "16", "--feature-dim", "8"])
    assert rc == 0
    assert "test acc" in capsys.readouterr().out


def test_lightning_and_the_hf_trainer_train_it_as_the_plain_loop(tmp_path):
    # Momentum restarts per phase through each trainer's optimizer wrapper too.
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from agm_fast.integrations.hf import BalancedTrainer, collate
    from agm_fast.integrations.lightning import BalancedModule

    data = [batch(2, seed=s) for s in range(2)]
    dataset = torch.utils.data.TensorDataset(*[torch.cat([d[0][m] for d in data]) for m in range(2)],
                                             torch.cat([d[1] for d in data]))

    def fresh():
        encoders, fusion, head = model(2)
        method = methods.create("reconboost", encoders, fusion, head=head, epochs_per_stage=1, correct_epochs=1)
        params = [p for e in encoders for p in e.parameters()] + list(fusion.parameters())
        opt = torch.optim.SGD([{"params": params}] + method.param_groups(LR), lr=LR, momentum=0.9)
        return encoders, method, opt

    want_encoders, want, opt = fresh()
    for epoch in range(4):
        for xs, y in data:
            methods.training_step(want, xs, y, epoch, opt)

    encoders, method, _ = fresh()
    module = BalancedModule(method, lr=LR, momentum=0.9)
    pl.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(
        module, torch.utils.data.DataLoader(dataset, batch_size=B, shuffle=False))
    encoders_hf, method_hf, opt_hf = fresh()
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=4, per_device_train_batch_size=B,
                             learning_rate=LR, max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
    BalancedTrainer(method=method_hf, args=args, train_dataset=dataset, data_collator=collate,
                    optimizers=(opt_hf, torch.optim.lr_scheduler.LambdaLR(opt_hf, lambda s: 1.0))).train()
    for got_encoders, got in ((encoders, method), (encoders_hf, method_hf)):
        for e, w in zip(got_encoders, want_encoders):
            for p, q in zip(e.parameters(), w.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.rate, want.rate, rtol=1e-5, atol=1e-6)
