"""The subset-evaluation strategies of AGM give one result (docs/methods.md, section 5)."""

import pytest
import torch
from agm_models import Composite, Encoder, clone, grads, make_batch, make_model
from torch import nn

import agm_fast
from agm_fast.coalitions import shapley_weights
from agm_fast.methods.agm import AGM

ce = nn.functional.cross_entropy


def _agm(model: Composite, strategy: str, **kw) -> AGM:
    if strategy == "factorized":
        return AGM(encoders=list(model.encoders), fusion=model.fusion, strategy="factorized", **kw)
    return AGM(model, num_modalities=len(model.encoders), strategy=strategy, **kw)


def _run(model: Composite, strategy: str, steps: int = 2, seed: int = 3, **kw):
    """A few training steps (SGD); returns per-step results, gradients and the final buffers and parameters."""
    agm = _agm(model, strategy, alpha=2.0, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    M = len(model.encoders)
    for step in range(steps):
        xs, y = make_batch(M, seed=step + 10)
        torch.manual_seed(seed + step)
        res = agm(*xs, target=y)
        opt.zero_grad()
        ce(res.logits, y).backward()
        out.append((res, grads(model)))
        opt.step()
    return out, [b.clone() for b in model.buffers()], [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b):
    steps_a, bufs_a, params_a = a
    steps_b, bufs_b, params_b = b
    for (ra, ga), (rb, gb) in zip(steps_a, steps_b):
        for x, y in zip(ra, rb):
            torch.testing.assert_close(x, y)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y)
    for x, y in zip(bufs_a, bufs_b):
        torch.testing.assert_close(x, y)
    for x, y in zip(params_a, params_b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("head", ["mlp", "linear", "contrib"])
def test_strategies_agree_with_batchnorm_and_dropout(M, head):
    model = make_model(M, head, bn=True, dropout=0.3)
    seq = _run(clone(model), "sequential")
    _assert_same(seq, _run(clone(model), "batched"))
    _assert_same(seq, _run(clone(model), "factorized"))
    # The coefficients are not all 1: the modulation is actually exercised.
    assert not torch.allclose(seq[0][1][0].coeffs, torch.ones(M))


@pytest.mark.parametrize("shapley", ["exact", "sampled"])
def test_strategies_agree_for_other_shapley_variants(shapley):
    model = make_model(3, "mlp", bn=True, dropout=0.2)
    kw = dict(shapley=shapley, num_permutations=3, seed=5)
    seq = _run(clone(model), "sequential", **kw)
    _assert_same(seq, _run(clone(model), "batched", **kw))
    _assert_same(seq, _run(clone(model), "factorized", **kw))


@pytest.mark.parametrize("strategy", ["batched", "factorized"])
def test_max_batch_chunks_the_stacked_batch(strategy):
    model = make_model(3, "mlp", bn=True)
    whole = _run(clone(model), strategy)
    chunked = _run(clone(model), strategy, max_batch=11)  # B = 5: two subsets per call
    _assert_same(whole, chunked)


@pytest.mark.parametrize("strategy", ["sequential", "batched", "factorized"])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_batchnorm_running_stats_updated_once_per_step(strategy, head):
    model = make_model(3, head, bn=True)
    joint = clone(model)
    xs, y = make_batch(3)
    _agm(model, strategy)(*xs, target=y)
    joint(*xs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert bns
    for bn in bns:
        assert int(bn.num_batches_tracked) == 1
    # The same statistics as one plain train-mode forward of the model.
    for a, b in zip(model.buffers(), joint.buffers()):
        torch.testing.assert_close(a, b)
    assert all(m.training for m in model.modules())


def _count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("M", [2, 3, 4])
def test_call_counts(M):
    B = 5
    xs, y = make_batch(M, B=B)
    model = make_model(M, "mlp")
    calls = _count_calls(model)
    _agm(model, "sequential")(*xs, target=y)
    assert len(calls) == 2**M - 1
    assert calls == [B] * (2**M - 1)

    model = make_model(M, "mlp")
    calls = _count_calls(model)
    _agm(model, "batched")(*xs, target=y)
    assert calls == [B, (2**M - 2) * B]  # the full pass, then every masked pass in one call

    model = make_model(M, "mlp")
    calls = _count_calls(model)
    _agm(model, "batched", max_batch=2 * B)(*xs, target=y)
    assert calls == [B] + [2 * B] * ((2**M - 2) // 2)

    model = make_model(M, "mlp")
    enc_calls = [_count_calls(e) for e in model.encoders]
    fus_calls = _count_calls(model.fusion)
    _agm(model, "factorized")(*xs, target=y)
    # Each (mode-dependent) encoder: the train-mode full pass and one eval-mode call over the batch plus its zero
    # sample.
    assert enc_calls == [[B, B + 1]] * M
    assert fus_calls == [B, (2**M - 2) * B]


@pytest.mark.parametrize("head", ["linear", "contrib"])
def test_linear_head_closed_form_runs_no_subset_head_pass(head):
    M, B = 3, 5
    xs, y = make_batch(M, B=B)
    model = make_model(M, head)
    fus_calls = _count_calls(model.fusion)
    enc_calls = [_count_calls(e) for e in model.encoders]
    res = _agm(model, "factorized")(*xs, target=y)
    assert fus_calls == [B]
    assert enc_calls == [[B, B + 1]] * M
    assert torch.isfinite(res.logits).all()


def test_mode_invariant_encoders_run_once_on_the_batch_in_eval_masked_mode():
    # Without BatchNorm or dropout the eval-mode pass equals the full pass: after the first step's check, each encoder
    # runs once, on its batch with the zero sample appended.
    M, B = 3, 5
    xs, y = make_batch(M, B=B)
    model = make_model(M, "mlp", bn=False, dropout=0.0)
    agm = _agm(model, "factorized")
    agm(*xs, target=y)
    enc_calls = [_count_calls(e) for e in model.encoders]
    agm(*xs, target=y)
    assert enc_calls == [[B + 1]] * M


def test_masked_mode_train_equals_eval_without_mode_dependent_layers():
    # Without BatchNorm or dropout the train-mode features are the eval-mode ones: the deviation vanishes.
    model = make_model(3, "mlp", bn=False, dropout=0.0)
    ev = _run(clone(model), "factorized")
    tr = _run(clone(model), "factorized", masked_mode="train")
    _assert_same(ev, tr)


def test_masked_mode_train_with_batchnorm_runs_each_encoder_once_on_the_batch():
    M, B = 3, 5
    xs, y = make_batch(M, B=B)
    model = make_model(M, "mlp", bn=True, dropout=0.2)
    enc_calls = [_count_calls(e) for e in model.encoders]
    res = _agm(model, "factorized", masked_mode="train")(*xs, target=y)
    assert enc_calls == [[B, 1]] * M  # the full pass and one zero sample in eval mode
    ce(res.logits, y).backward()
    assert torch.isfinite(res.coeffs).all()
    assert all(torch.isfinite(g).all() for g in grads(model))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
        assert int(bn.num_batches_tracked) == 1


def _feature_muted_reference(model: Composite, xs, baselines):
    """f(S) built by hand: eval-mode encoder features, muted ones replaced by the baseline, head in eval mode."""
    M = len(xs)
    full = model(*xs)
    model.eval()
    feats = [e(x) for e, x in zip(model.encoders, xs)]
    rows = []
    for mask in range(1, 2**M - 1):
        f = [feats[m] if (mask >> m) & 1 else baselines[m].expand_as(feats[m]) for m in range(M)]
        rows.append(model.fusion(*f))
    model.train()
    return torch.stack(rows + [full])


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("head", ["mlp", "contrib"])
def test_feature_muting_with_baselines(learned, head):
    M = 3
    model = make_model(M, head, bn=True)
    xs, y = make_batch(M)
    if learned:
        base = [nn.Parameter(torch.randn(6)) for _ in range(M)]
    else:
        base = None
    agm = AGM(encoders=list(model.encoders), fusion=model.fusion, mute="feature", baselines=base)
    ref_model = clone(model)
    res = agm(*xs, target=y)
    want_base = [b.detach() for b in base] if learned else [torch.zeros(6)] * M
    F = _feature_muted_reference(ref_model, xs, want_base)
    W = shapley_weights(M, list(range(1, 2**M)), torch.float32)
    torch.testing.assert_close(res.mono, agm_fast.functional.shapley_outputs(F, W))
    if learned:
        ce(res.logits, y).backward()
        assert all(b.grad is not None and torch.isfinite(b.grad).all() for b in base)
        assert any(b.grad.abs().sum() > 0 for b in base)
        # Learned baselines are modulator state: registered on AGM and saved in its state_dict.
        assert {f"baseline_{m}" for m in range(M)} <= set(agm.state_dict())
        assert len(list(agm.parameters())) == M


def test_auto_strategy_choice():
    model = make_model(2, "mlp")
    assert AGM(model, num_modalities=2).strategy == "batched"
    assert AGM(encoders=list(model.encoders), fusion=model.fusion).strategy == "factorized"


def test_agm_state_dict_excludes_model_weights_but_gradmod_registers_them():
    model = make_model(2, "mlp")
    agm = AGM(model, num_modalities=2)
    keys = set(agm.state_dict())
    assert keys == {"coefficients.running", "coefficients.count", "coefficients.last_coeffs", "_extra_state"}
    assert len(list(agm.parameters())) == 0
    gm = agm_fast.GradMod(model, 2)
    assert len(list(gm.parameters())) == len(list(model.parameters()))


def test_inputs_of_other_dtypes_are_muted_with_zeros():
    # Token ids: the muted input is a zero id, in every strategy.
    torch.manual_seed(0)

    class TokenEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)

        def forward(self, x):
            return self.emb(x).mean(1)

    encoders = [TokenEncoder(), Encoder(3, 4)]
    model = Composite(encoders, nn.Linear(8, 3))
    xs = [torch.randint(0, 11, (5, 7)), torch.randn(5, 3)]
    y = torch.randint(0, 3, (5,))
    outs = []
    for strategy in ("sequential", "batched", "factorized"):
        m = clone(model)
        res = _agm(m, strategy)(*xs, target=y)
        ce(res.logits, y).backward()
        outs.append((res, grads(m)))
    for res, g in outs[1:]:
        for a, b in zip(outs[0][0], res):
            torch.testing.assert_close(a, b)
        for a, b in zip(outs[0][1], g):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["ConcatFusion", "SumFusion", "MLPFusion", "GatedFusion", "FiLMFusion"])
def test_library_fusion_heads(name):
    # The closed form (concat, sum: they expose contributions) and the stacked head (the others) both agree with
    # one model call per subset.
    M = 3
    torch.manual_seed(0)
    kwargs = {"hidden": 8} if name == "MLPFusion" else {}
    fusion = getattr(agm_fast.fusion, name)([6] * M, 4, **kwargs)
    model = Composite([Encoder(3 + m, 6, bn=True, dropout=0.2) for m in range(M)], fusion)
    seq = _run(clone(model), "sequential")
    _assert_same(seq, _run(clone(model), "factorized"))
