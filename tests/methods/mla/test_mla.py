"""MLA (docs/methods.md, section 16): the fusion weights and the sub-steps derived by hand, at M = 2 and M = 3, the
switches (entropy per sample, the projection, zero-filled gradients), state and errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agm_fast import cli, methods
from agm_fast.fusion import ConcatFusion
from agm_fast.methods.mla import fusion_weights
from agm_fast.methods.owned_step import SubSteps

B, C, D, DIN, LR = 6, 3, 4, 5, 0.1


def model(M, seed=0):
    torch.manual_seed(seed)
    encoders = [nn.Sequential(nn.Linear(DIN, D), nn.Tanh()) for _ in range(M)]
    return encoders, ConcatFusion([D] * M, C)


def batch(M, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, DIN, generator=g) for _ in range(M)], torch.randint(0, C, (B,), generator=g)


def hand_weights(logits, entropy):
    """Plain loops over floats: the entropy of each modality's softmax, then exp(max e - e_m) normalised."""
    M = len(logits)
    z = [t.tolist() for t in logits]
    if entropy == "batch":
        # softmax over the batch axis: each class column is a distribution over the samples; sum every p log p
        ents = []
        for m in range(M):
            e = 0.0
            for c in range(C):
                col = [z[m][b][c] for b in range(B)]
                s = sum(math.exp(v) for v in col)
                e -= sum(math.exp(v) / s * math.log(math.exp(v) / s) for v in col)
            ents.append(e)
        top = max(ents)
        w = [math.exp(top - e) for e in ents]
        return torch.tensor([x / sum(w) for x in w], dtype=torch.float64)
    out = torch.zeros(M, B, dtype=torch.float64)
    for b in range(B):
        ents = []
        for m in range(M):
            s = sum(math.exp(v) for v in z[m][b])
            ents.append(-sum(math.exp(v) / s * math.log(math.exp(v) / s) for v in z[m][b]))
        top = max(ents)
        w = [math.exp(top - e) for e in ents]
        for m in range(M):
            out[m, b] = w[m] / sum(w)
    return out


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("entropy", ["batch", "sample"])
def test_fusion_weights_and_prediction_match_hand_computation(M, entropy):
    encoders, fusion = model(M)
    method = methods.create("mla", encoders, fusion, entropy=entropy)
    xs, _ = batch(M)
    with torch.no_grad():
        logits = [method.shared(enc(x)) for enc, x in zip(encoders, xs)]
        want = hand_weights(logits, entropy)
        torch.testing.assert_close(fusion_weights(logits, entropy).double(), want, rtol=1e-5, atol=1e-7)
        fused = sum((want[m] if entropy == "batch" else want[m][:, None]) * logits[m].double() for m in range(M))
        torch.testing.assert_close(method.predict(xs).double(), fused, rtol=1e-5, atol=1e-6)


def hand_step(encoders, head, xs, y, lr=LR):
    """Plain SGD, written out: one forward of the encoders, then per modality the shared head (as updated so far) on
    its features, autograd of its cross-entropy, and p -= lr * grad for the encoder and the head."""
    feats = [enc(x) for enc, x in zip(encoders, xs)]
    for m, h in enumerate(feats):
        loss = F.cross_entropy(F.linear(h, head.weight, head.bias), y)
        params = list(encoders[m].parameters()) + [head.weight, head.bias]
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)


@pytest.mark.parametrize("M", [2, 3])
def test_one_step_is_one_sub_step_per_modality_through_the_shared_head(M):
    encoders, fusion = model(M)
    method = methods.create("mla", encoders, fusion)
    want_encoders, want_head = copy.deepcopy(encoders), copy.deepcopy(method.shared)
    fusion_before = copy.deepcopy(fusion)
    xs, y = batch(M)
    opt = torch.optim.SGD([{"params": [p for e in encoders for p in e.parameters()] + list(fusion.parameters())}]
                          + method.param_groups(LR), lr=LR)
    steps = SubSteps(opt)
    with torch.no_grad():
        logits = [method.shared(e(x)) for e, x in zip(encoders, xs)]
    res = methods.training_step(method, xs, y, 0, steps)
    hand_step(want_encoders, want_head, xs, y)
    assert steps.steps == M
    for mine, want in zip(encoders, want_encoders):
        for p, q in zip(mine.parameters(), want.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    for p, q in zip(method.shared.parameters(), want_head.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # The model's fusion head is not used.
    assert all(torch.equal(p, q) for p, q in zip(fusion.parameters(), fusion_before.parameters()))
    # The result: the mean unimodal loss, and the prediction rule's weights (the first sub-step's logits are the
    # head's before any step; the later ones see the head as updated).
    assert res.coeffs.dtype == torch.float32 and res.coeffs.shape == (M,)
    assert float(res.coeffs.sum()) == pytest.approx(1.0, abs=1e-6)
    first = F.cross_entropy(logits[0], y)
    assert float(method.decisions()["losses"][0]) == pytest.approx(float(first), rel=1e-6)
    assert float(res.loss) == pytest.approx(float(method.decisions()["losses"].mean()), rel=1e-6)
    assert set(method.decisions()) == {"weights", "losses"}


def owm(P, h, alpha):
    """The projection's update with explicit sums: k = P r, P - k k^T / (alpha + sum_i r_i k_i), then P / |P|_F."""
    r = h.detach().double().mean(0)
    k = P @ r
    denom = alpha + float((r * k).sum())
    P = P - torch.outer(k, k) / denom
    return P / math.sqrt(float((P * P).sum()))


def test_projection_projects_the_head_weight_gradient_from_the_second_sub_step_on():
    M = 2
    encoders, fusion = model(M)
    method = methods.create("mla", encoders, fusion, projection=True)
    head0 = copy.deepcopy(method.shared)
    xs, y = batch(M)
    opt = torch.optim.SGD(method.param_groups(LR), lr=LR)  # the head alone: its update is its gradient
    grads = []

    class Spy(SubSteps):
        def step(self):
            grads.append(method.shared.weight.grad.clone())
            super().step()

    with pytest.raises(ValueError, match="progress: MLA's projection strength reads the fraction of the epoch"):
        methods.training_step(method, xs, y, 0, Spy(opt))
    methods.training_step(method, xs, y, 0, Spy(opt), progress=0.5)
    # By hand: the first sub-step of the run keeps its gradient; the second updates P with modality 1's features at
    # alpha = 0.1 ** 1.5 and multiplies the gradient by P^T.
    with torch.no_grad():
        h = [e(x) for e, x in zip(encoders, xs)]
    w = head0.weight.detach().clone().requires_grad_(True)
    b = head0.bias.detach().clone().requires_grad_(True)
    g0, g0b = torch.autograd.grad(F.cross_entropy(F.linear(h[0], w, b), y), [w, b])
    torch.testing.assert_close(grads[0], g0, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        w1, b1 = w - LR * g0, b - LR * g0b
    w1.requires_grad_(True)
    g1 = torch.autograd.grad(F.cross_entropy(F.linear(h[1], w1, b1), y), w1)[0]
    P = owm(torch.eye(D, dtype=torch.float64), h[1], 0.1 ** 1.5)
    torch.testing.assert_close(grads[1].double(), g1.double() @ P.T, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads[1], g1)
    torch.testing.assert_close(method.method_state()["projection"].double(), P, rtol=1e-5, atol=1e-7)
    assert method.method_state()["substeps"] == 2


def test_without_the_projection_the_head_gradient_is_untouched_and_no_state_is_kept():
    encoders, fusion = model(2)
    method = methods.create("mla", encoders, fusion)
    xs, y = batch(2)
    methods.training_step(method, xs, y, 0, torch.optim.SGD(method.param_groups(LR), lr=LR), progress=0.5)
    assert method.method_state()["projection"] is None


@pytest.mark.parametrize("zero_fill", [False, True])
def test_zero_fill_steps_the_earlier_encoders_again_with_momentum_only(zero_fill):
    encoders, fusion = model(2)
    method = methods.create("mla", encoders, fusion, zero_fill=zero_fill)
    before = copy.deepcopy(encoders[0])
    xs, y = batch(2)
    opt = torch.optim.SGD([{"params": [p for e in encoders for p in e.parameters()]}] + method.param_groups(LR),
                          lr=LR, momentum=0.9)
    with torch.no_grad():
        want = copy.deepcopy(encoders[0])
    g = torch.autograd.grad(F.cross_entropy(method.shared(want(xs[0])), y), list(want.parameters()))
    methods.training_step(method, xs, y, 0, opt)
    # Sub-step 1: p - lr g (the momentum buffer is g); with zero_fill, sub-step 2 steps it again by lr * 0.9 g.
    factor = 1.0 + (0.9 if zero_fill else 0.0)
    for p, q, gi in zip(encoders[0].parameters(), before.parameters(), g):
        torch.testing.assert_close(p, q - LR * factor * gi, rtol=1e-5, atol=1e-7)
    # Every gradient is None after a zero-filled step, as the released loop leaves them; otherwise the last
    # sub-step's gradients stay, as after any training_step.
    assert zero_fill == all(p.grad is None for p in encoders[1].parameters())


def test_state_with_the_projection_round_trips_and_resumes():
    encoders, fusion = model(2)
    method = methods.create("mla", encoders, fusion, projection=True)
    xs, y = batch(2)
    methods.training_step(method, xs, y, 0, torch.optim.SGD(method.param_groups(LR), lr=LR), progress=0.0)
    state = copy.deepcopy(method.state_dict())
    fresh = methods.create("mla", *model(2, seed=3), projection=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.method_state()["projection"], method.method_state()["projection"])
    assert fresh.method_state()["substeps"] == 2
    assert all(torch.equal(p, q) for p, q in zip(fresh.shared.parameters(), method.shared.parameters()))


def test_a_user_head_is_the_shared_head():
    encoders, fusion = model(2)
    head = nn.Sequential(nn.Linear(D, 7), nn.ReLU(), nn.Linear(7, C))
    method = methods.create("mla", encoders, fusion, head=head)
    assert method.shared is head
    assert {id(p) for p in method.param_groups(LR)[0]["params"]} == {id(p) for p in head.parameters()}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"window": (0, 3)}, ValueError, "window: MLA replaces joint training at every epoch"),
    ({"task": "regression"}, ValueError, "task: MLA's test-time fusion weighs classifier entropies"),
    ({"entropy": "class"}, ValueError, "entropy: expected one of"),
    ({"projection": 1}, TypeError, "projection: expected True or False"),
    ({"zero_fill": "yes"}, TypeError, "zero_fill: expected True or False"),
    ({"head": 3}, TypeError, "head: expected an nn.Module"),
    ({"head": nn.Sequential(nn.Linear(D, C)), "projection": True}, ValueError, "projection: projects the gradient"),
])
def test_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        methods.create("mla", *model(2), **kwargs)


def test_unequal_feature_sizes_need_a_head_of_ones_own():
    encoders = [nn.Linear(DIN, 4), nn.Linear(DIN, 6)]
    with pytest.raises(ValueError, match=r"feature_dims: MLA's shared head reads every modality's features, expected "
                                         r"M equal sizes \(or a head= of your own\), got \[4, 6\]"):
        methods.create("mla", encoders, ConcatFusion([4, 6], C))
    methods.create("mla", encoders, ConcatFusion([4, 6], C), head=nn.Linear(4, C))


def test_accumulation_is_refused():
    method = methods.create("mla", *model(2))
    with pytest.raises(ValueError, match="each sub-step steps the optimizer on its own modality's gradient"):
        method.set_accumulation(2)


def test_the_command_line_trains_and_evaluates_through_the_prediction_rule(tmp_path, capsys):
    rc = cli.main(["train", "--method", "mla", "--entropy", "sample", "--projection", "--epochs", "1", "--out",
                   str(tmp_path), "--no-plot", "--hidden", "16", "--feature-dim", "8"])
    assert rc == 0
    assert "test acc" in capsys.readouterr().out


def _plain(M, data, epochs, **kwargs):
    encoders, fusion = model(M)
    method = methods.create("mla", encoders, fusion, **kwargs)
    params = [p for e in encoders for p in e.parameters()] + list(fusion.parameters())
    opt = torch.optim.SGD([{"params": params}] + method.param_groups(LR), lr=LR, momentum=0.9)
    for epoch in range(epochs):
        for i, (xs, y) in enumerate(data):
            methods.training_step(method, xs, y, epoch, opt, progress=i / len(data))
    return encoders, method


def _dataset(M, n=3):
    data = [batch(M, seed=s) for s in range(n)]
    xs = [torch.cat([d[0][m] for d in data]) for m in range(M)]
    return data, torch.utils.data.TensorDataset(*xs, torch.cat([d[1] for d in data]))


def test_lightning_and_the_hf_trainer_train_it_as_the_plain_loop(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from agm_fast.integrations.hf import BalancedTrainer, collate
    from agm_fast.integrations.lightning import BalancedModule

    data, dataset = _dataset(2)
    want_encoders, want = _plain(2, data, 2, projection=True)

    encoders, fusion = model(2)
    method = methods.create("mla", encoders, fusion, projection=True)
    module = BalancedModule(method, lr=LR, momentum=0.9)
    loader = torch.utils.data.DataLoader(dataset, batch_size=B, shuffle=False)
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(
        module, loader, loader)
    assert module.trainer.callback_metrics["val_acc"] >= 0
    encoders_hf, fusion_hf = model(2)
    method_hf = methods.create("mla", encoders_hf, fusion_hf, projection=True)
    params = [p for e in encoders_hf for p in e.parameters()] + list(fusion_hf.parameters())
    opt = torch.optim.SGD([{"params": params}] + method_hf.param_groups(LR), lr=LR, momentum=0.9)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=B,
                             learning_rate=LR, max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
    BalancedTrainer(method=method_hf, args=args, train_dataset=dataset, data_collator=collate,
                    optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))).train()
    for got_encoders, got in ((encoders, method), (encoders_hf, method_hf)):
        for e, w in zip(got_encoders, want_encoders):
            for p, q in zip(e.parameters(), w.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.method_state()["projection"], want.method_state()["projection"], rtol=1e-5,
                                   atol=1e-7)
