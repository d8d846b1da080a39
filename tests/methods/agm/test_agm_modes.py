"""AGM's reuse of the full pass for encoders that compute the same in train and eval mode (docs/methods.md, section 5):
the structural scan, the first-step check, the override, exactness against the eval-mode passes, resume, and
activation checkpointing of the masked passes."""

import copy

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast.methods.agm.modes import mode_dependence

B, C, D_IN, D = 12, 5, 7, 8


def invariant():
    return nn.Sequential(nn.Linear(D_IN, 12), nn.LayerNorm(12), nn.GELU(), nn.Dropout(0.0), nn.Linear(12, D))


def dependent():
    return nn.Sequential(nn.Linear(D_IN, 12), nn.Dropout(0.1), nn.GELU(), nn.Linear(12, D))


class ReadsTraining(nn.Module):
    """Custom code that reads ``self.training``: no known module gives it away, the first-step check does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_IN, D)

    def forward(self, x):
        h = self.fc(x)
        return h * 1.5 if self.training else h


def _in_training(module):
    return module.training


class HiddenTraining(ReadsTraining):
    """Reads the mode through a helper, where the source scan of its forward cannot see it: the first-step check
    does."""

    def forward(self, x):
        h = self.fc(x)
        return h * 1.5 if _in_training(self) else h


class DropPath(nn.Module):
    """Stands in for timm's DropPath (found by name, without importing timm)."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "module, fragment",
    [
        (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2)), "Dropout(p=0.2)"),
        (nn.Sequential(nn.Linear(3, 3), nn.Dropout2d(0.5)), "Dropout2d(p=0.5)"),
        (nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), "BatchNorm1d with running statistics"),
        (nn.InstanceNorm1d(3, track_running_stats=True), "InstanceNorm1d with running statistics"),
        (nn.MultiheadAttention(4, 2, dropout=0.1), "MultiheadAttention(dropout=0.1)"),
        (nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1), "MultiheadAttention(dropout=0.1)"),
        (nn.Sequential(nn.Linear(3, 3), DropPath(0.1)), "DropPath(drop_prob=0.1)"),
        (ReadsTraining(), "(ReadsTraining) reads self.training in its forward"),
        (nn.Sequential(nn.Linear(3, 3), nn.RReLU()), "RReLU"),
    ],
)
def test_the_scan_finds_mode_dependent_modules(module, fragment):
    reason = mode_dependence(module)
    assert reason is not None and fragment in reason


@pytest.mark.parametrize(
    "module",
    [
        invariant(),
        nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0), nn.BatchNorm1d(3, track_running_stats=False)),
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0),
        nn.Sequential(nn.Linear(3, 3), DropPath(0.0), nn.GroupNorm(1, 3)),
        HiddenTraining(),
    ],
)
def test_the_scan_passes_modules_without_known_mode_dependence(module):
    assert mode_dependence(module) is None


class Whole(nn.Module):
    def __init__(self, encoders, fusion):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion

    def forward(self, *xs):
        return self.fusion(*[enc(x) for enc, x in zip(self.encoders, xs)])


def _fusion(head, M):
    if head == "concat":
        return agm_fast.ConcatFusion([D] * M, C)
    return agm_fast.MLPFusion([D] * M, C, hidden=16)


def _run(agm, params, batches):
    """A few steps of training; returns per step (logits, scores, coeffs) and the gradients of the last step."""
    opt = torch.optim.SGD(params, lr=0.1)
    outs = []
    for xs, y in batches:
        res = agm(*xs, target=y)
        loss = nn.functional.cross_entropy(res.logits, y)
        opt.zero_grad()
        loss.backward()
        outs.append((res.logits.detach(), res.scores, res.coeffs))
        grads = [p.grad.clone() for p in params]
        opt.step()
    return outs, grads


def _batches(M, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randn(B, D_IN, generator=g) for _ in range(M)], torch.randint(0, C, (B,), generator=g))
            for _ in range(steps)]


SETS = {
    "invariant": lambda M: [invariant() for _ in range(M)],
    "dependent": lambda M: [dependent() for _ in range(M)],
    "mixed": lambda M: [invariant() if m % 2 == 0 else dependent() for m in range(M)],
    "custom": lambda M: [ReadsTraining()] + [invariant() for _ in range(M - 1)],
}


@pytest.mark.parametrize("head", ["concat", "mlp"])
@pytest.mark.parametrize("kind", sorted(SETS))
@pytest.mark.parametrize("M", [2, 3])
def test_reuse_equals_the_eval_mode_passes_and_the_sequential_reference(M, kind, head):
    torch.manual_seed(0)
    encoders, fusion = SETS[kind](M), _fusion(head, M)
    batches = _batches(M)
    runs = {}
    for name, kwargs in {
        "default": {},
        "recompute": {"mode_invariant": False},
        "sequential": {"strategy": "sequential"},
    }.items():
        torch.manual_seed(1)
        whole = Whole(copy.deepcopy(encoders), copy.deepcopy(fusion))
        if name == "sequential":
            agm = agm_fast.AGM(whole, num_modalities=M, alpha=1.0, **kwargs)
        else:
            agm = agm_fast.AGM(encoders=list(whole.encoders), fusion=whole.fusion, alpha=1.0, **kwargs)
        runs[name] = (_run(agm, list(whole.parameters()), batches), agm)
    (default, grads), agm = runs["default"]
    (recompute, grads_recompute), _ = runs["recompute"]
    (sequential, grads_sequential), _ = runs["sequential"]
    decisions = [e["reuses_full_pass"] for e in agm.describe()["encoders"]]
    expected = [not isinstance(e, nn.Sequential) or not any(isinstance(s, nn.Dropout) and s.p > 0 for s in e)
                for e in encoders]
    expected = [False if isinstance(e, ReadsTraining) else x for e, x in zip(encoders, expected)]
    assert decisions == expected
    # Later steps: the values are the eval-mode passes' to float rounding (reusing sums the two passes' gradients
    # before the encoder's backward instead of after: the same value in another order).
    for step_a, step_b, step_s in zip(default, recompute, sequential):
        for a, b, s in zip(step_a, step_b, step_s):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a, s, rtol=1e-4, atol=1e-5)
    for a, b, s in zip(grads, grads_recompute, grads_sequential):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a, s, rtol=1e-4, atol=1e-6)


def test_reused_features_are_the_eval_pass_features():
    # At the same parameters, the subset outputs with reuse are those of the eval-mode passes: the first call runs
    # them (the check), the second reuses the full pass and computes the zero sample in the same call as the batch
    # (one more row in each matrix product: float rounding, not always bitwise).
    torch.manual_seed(0)
    encoders, fusion = SETS["invariant"](3), _fusion("mlp", 3)
    (xs, y), = _batches(3, steps=1)
    agm = agm_fast.AGM(encoders=encoders, fusion=fusion)
    masks = agm._plan(xs[0].device)[0]
    checked = agm._evaluate(xs, masks)
    assert all(e["reuses_full_pass"] for e in agm.describe()["encoders"])
    calls = []
    for enc in encoders:
        enc.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    reused = agm._evaluate(xs, masks)
    assert calls == [B + 1] * 3
    torch.testing.assert_close(reused, checked, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        for enc, x in zip(encoders, xs):
            torch.testing.assert_close(enc(torch.cat([x, torch.zeros(1, D_IN)]))[:B], enc(x), rtol=1e-6, atol=1e-7)


def test_an_encoder_that_drops_rows_is_named():
    class FirstRows(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D_IN, D)

        def forward(self, x):
            return self.fc(x[:B])

    (xs, y), = _batches(2, steps=1)
    agm = agm_fast.AGM(encoders=[invariant(), FirstRows()], fusion=_fusion("concat", 2))
    agm(*xs, target=y)  # the first step checks the modes with the batch alone
    with pytest.raises(ValueError, match=r"encoders\[1\]: expected features \[B, \.\.\.\] with one row per input row"):
        agm(*xs, target=y)


def test_a_custom_encoder_that_hides_its_mode_falls_back_after_the_first_step():
    torch.manual_seed(0)
    encoders = [HiddenTraining(), invariant()]
    agm = agm_fast.AGM(encoders=encoders, fusion=_fusion("concat", 2))
    assert agm.describe()["encoders"][0]["reuses_full_pass"] is None
    (xs, y), = _batches(2, steps=1)
    agm(*xs, target=y)
    report = agm.describe()["encoders"]
    assert report[0]["reuses_full_pass"] is False and "differ" in report[0]["why"]
    assert report[1]["reuses_full_pass"] is True and "equal" in report[1]["why"]


def test_override_and_its_errors():
    encoders = [dependent(), invariant()]
    fusion = _fusion("concat", 2)
    agm = agm_fast.AGM(encoders=encoders, fusion=fusion, mode_invariant=[False, True])
    assert [e["reuses_full_pass"] for e in agm.describe()["encoders"]] == [False, True]
    assert agm.describe()["encoders"][1]["why"] == "set by mode_invariant"
    with pytest.raises(ValueError, match="mode_invariant: expected 2 values"):
        agm_fast.AGM(encoders=encoders, fusion=fusion, mode_invariant=[True])
    with pytest.raises(TypeError, match=r"mode_invariant\[0\]: expected True, False or None"):
        agm_fast.AGM(encoders=encoders, fusion=fusion, mode_invariant=["yes", None])
    with pytest.raises(ValueError, match="mode_invariant: decides the eval-mode masked passes"):
        agm_fast.AGM(encoders=encoders, fusion=fusion, masked_mode="train", mode_invariant=True)
    with pytest.raises(TypeError, match="checkpoint_masked: expected True or False"):
        agm_fast.AGM(encoders=encoders, fusion=fusion, checkpoint_masked=1)


def test_the_decisions_resume_exactly():
    torch.manual_seed(0)
    encoders, fusion = SETS["mixed"](3), _fusion("mlp", 3)
    batches = _batches(3, steps=4)
    whole = Whole(copy.deepcopy(encoders), copy.deepcopy(fusion))
    torch.manual_seed(3)
    straight = agm_fast.AGM(encoders=list(whole.encoders), fusion=whole.fusion)
    params = list(whole.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    logits = []
    for i, (xs, y) in enumerate(batches):
        if i == 2:
            saved = copy.deepcopy((whole.state_dict(), opt.state_dict(), straight.state_dict(), torch.get_rng_state()))
        res = straight(*xs, target=y)
        logits.append(res.logits.detach())
        opt.zero_grad()
        nn.functional.cross_entropy(res.logits, y).backward()
        opt.step()
    resumed_whole = Whole(copy.deepcopy(encoders), copy.deepcopy(fusion))
    resumed = agm_fast.AGM(encoders=list(resumed_whole.encoders), fusion=resumed_whole.fusion)
    ropt = torch.optim.SGD(list(resumed_whole.parameters()), lr=0.1)
    resumed_whole.load_state_dict(saved[0])
    ropt.load_state_dict(saved[1])
    resumed.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    assert resumed.describe()["encoders"] == straight.describe()["encoders"]
    for i, (xs, y) in enumerate(batches[2:]):
        res = resumed(*xs, target=y)
        assert torch.equal(res.logits.detach(), logits[2 + i])
        ropt.zero_grad()
        nn.functional.cross_entropy(res.logits, y).backward()
        ropt.step()


@pytest.mark.parametrize("strategy", ["factorized", "batched", "sequential"])
def test_checkpointing_the_masked_passes_changes_no_number(strategy):
    torch.manual_seed(0)
    encoders, fusion = SETS["dependent"](3), _fusion("mlp", 3)
    batches = _batches(3, steps=2)
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        whole = Whole(copy.deepcopy(encoders), copy.deepcopy(fusion))
        if strategy == "factorized":
            agm = agm_fast.AGM(encoders=list(whole.encoders), fusion=whole.fusion, checkpoint_masked=ckpt)
        else:
            agm = agm_fast.AGM(whole, num_modalities=3, strategy=strategy, checkpoint_masked=ckpt)
        runs.append(_run(agm, list(whole.parameters()), batches))
    (a, ga), (b, gb) = runs
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b):
            assert torch.equal(x, y)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


class RecordsMode(nn.Module):
    """A fusion of the user's own: its mode is not judged by construction, so the masked passes switch it to eval."""

    def __init__(self, M):
        super().__init__()
        self.fc = nn.Linear(D * M, C)
        self.modes = []

    def forward(self, *features):
        self.modes.append(_in_training(self))
        return self.fc(torch.cat(features, dim=1))


def test_the_fusion_skips_the_eval_switch_only_when_it_is_mode_independent_by_construction():
    from agm_fast.methods.agm.modes import fixed_mode

    assert fixed_mode(agm_fast.MLPFusion([D, D], C, hidden=16)) == []
    assert fixed_mode(nn.Sequential(nn.Linear(2 * D, 4), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, C))) is not None
    assert fixed_mode(nn.Sequential(nn.Linear(2 * D, 4), nn.Dropout(0.3))) is None
    # Eval mode takes torch's native fast path here, even without dropout.
    assert fixed_mode(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)) is None
    assert fixed_mode(RecordsMode(2)) is None

    torch.manual_seed(0)
    (xs, y), = _batches(2, steps=1)
    user = RecordsMode(2)
    agm = agm_fast.AGM(encoders=[invariant(), invariant()], fusion=user, strategy="factorized")
    agm(*xs, target=y)
    assert user.modes == [True, False] and user.training

    # A dropout raised after construction makes the fusion mode-dependent from the next step on.
    head = nn.Sequential(nn.Linear(2 * D, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, C))
    agm = agm_fast.AGM(encoders=[invariant(), invariant()], fusion=head)
    assert agm._fusion_roots() == []
    head[2].p = 0.5
    assert agm._fusion_roots() == [head]
    seen = []
    head[2].register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    agm(*xs, target=y)
    assert seen == [True, False]


@pytest.mark.parametrize("head", ["concat", "mlp", "sequential"])
def test_mode_independent_parts_give_the_eval_mode_passes_numbers(head):
    # The zero sample of a reused encoder and the masked passes of a mode-independent fusion run without the switch
    # to eval mode (the split tail then in one call on every subset's rows): the numbers of the switched passes, to
    # float rounding (the matrix products run over other numbers of rows).
    torch.manual_seed(0)
    M = 3
    encoders = [invariant() for _ in range(M)]
    fusion = (nn.Sequential(nn.Linear(D * M, 16), nn.ReLU(), nn.Linear(16, C)) if head == "sequential"
              else _fusion(head, M))
    batches = _batches(M)
    runs = []
    for switched in (False, True):
        whole = Whole(copy.deepcopy(encoders), copy.deepcopy(fusion))
        agm = agm_fast.AGM(encoders=list(whole.encoders), fusion=whole.fusion, alpha=1.0, mode_invariant=True)
        if switched:
            agm._fusion_watch = None
            agm._eval_apply_orig = agm._eval_apply
            agm._eval_apply = lambda fn, mods, inputs, a=agm, w=whole: a._eval_apply_orig(
                fn, list(mods) or list(w.encoders), inputs)
        runs.append(_run(agm, list(whole.parameters()), batches))
    (outs_a, grads_a), (outs_b, grads_b) = runs
    for step_a, step_b in zip(outs_a, outs_b):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
