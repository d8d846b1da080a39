"""The method interface: one contract that every registered method passes, driven by one loop written once."""

import copy

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast import methods
from agm_fast.fusion import ConcatFusion

M, B, C, D = 2, 16, 4, 6
# Settings that make every method act within a few steps (MSES stops at once, OPM drops from epoch 0).
ACTIVE = {"opm": {"warmup_epochs": 0, "p_exe": 1.0}, "mses": {"patience": 0}, "mslr": {"history": 1},
          "relearning": {"reinit_epoch": 1, "kmeans_restarts": 2}}


class Parts(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(5, D), nn.BatchNorm1d(D), nn.ReLU(), nn.Linear(D, D)) for _ in range(M)
        )
        self.fusion = ConcatFusion([D] * M, C)


def data(steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        xs = [torch.randn(B, 5, generator=g) for _ in range(M)]
        # Modality 0 carries the label, so the methods see an imbalance.
        y = torch.randint(0, C, (B,), generator=g)
        xs[0][:, :C] += 3 * nn.functional.one_hot(y, C)
        out.append((xs, y))
    return out


VAL = data(2, seed=5)


def metrics_of(epoch):
    # Validation metrics that drift, so MSLR's ratios and MSES's stops change the state.
    return {"modality_accuracy": [0.5 + 0.1 * epoch, 0.4 - 0.05 * epoch], "modality_loss": [1.0 + epoch, 2.0 + epoch]}


def build(name, parts, **kwargs):
    # Methods may draw initial weights (CGGM's heads): every build starts from the same generator state.
    torch.manual_seed(1)
    method = methods.create(name, list(parts.encoders), parts.fusion, seed=7, **{**ACTIVE.get(name, {}), **kwargs})
    groups = [{"params": list(parts.parameters())}] + method.param_groups(0.05)
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    return method, opt


def run_epochs(method, opt, epochs, batches):
    """The one loop: no method is named in it."""
    coeffs = []
    for epoch in epochs:
        # Epoch passes (PMR, relearning) over these batches and validation batches of their own.
        methods.run_epoch_passes(method, epoch, "start", batches, VAL)
        for xs, y in batches:
            coeffs.append(methods.training_step(method, xs, y, epoch, opt).coeffs)
        method.end_epoch(epoch, metrics_of(epoch))
        methods.run_epoch_passes(method, epoch, "end", batches, VAL)
    return coeffs


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b or (a != a and b != b)


NAMES = methods.available()


def test_every_builtin_method_is_registered():
    assert set(NAMES) >= {"joint", "agm", "ogm", "ogm_ge", "opm", "cggm", "mslr", "mses"}


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_are_float32_m_on_the_input_device(name):
    torch.manual_seed(0)
    parts = Parts()
    method, opt = build(name, parts)
    methods.run_epoch_passes(method, 0, "start", data(), data())  # PMR's prototypes; the others ask for nothing
    for xs, y in data():
        res = methods.training_step(method, xs, y, 0, opt)
        assert res.coeffs.dtype == torch.float32 and res.coeffs.shape == (M,) and res.coeffs.device == y.device
        assert torch.isfinite(res.coeffs).all()
        assert res.loss.dim() == 0 and not res.loss.requires_grad
    # The hook alone returns the same kind of tensor, from the last forward's output and targets.
    xs, y = data(1, seed=1)[0]
    method.forward(xs, y, 0)
    coeffs = method.before_optimizer_step()
    assert coeffs.dtype == torch.float32 and coeffs.shape == (M,)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_state_dict(name):
    torch.manual_seed(0)
    parts = Parts()
    method, opt = build(name, parts)
    run_epochs(method, opt, range(2), data())
    state = method.state_dict()
    fresh, _ = build(name, copy.deepcopy(parts))
    fresh.load_state_dict(copy.deepcopy(state))
    assert_same_state(fresh.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_a_resumed_run_is_exact(name):
    torch.manual_seed(0)
    parts = Parts()
    batches = data()
    straight_parts = copy.deepcopy(parts)
    method, opt = build(name, straight_parts)
    straight = run_epochs(method, opt, range(3), batches)

    first_parts = copy.deepcopy(parts)
    method, opt = build(name, first_parts)
    before = run_epochs(method, opt, range(1), batches)
    saved = copy.deepcopy({"model": first_parts.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()})
    del method, opt

    resumed_parts = copy.deepcopy(parts)
    method, opt = build(name, resumed_parts)
    resumed_parts.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    method.load_state_dict(saved["method"])
    after = run_epochs(method, opt, range(1, 3), batches)

    for a, b in zip(straight, before + after):
        assert torch.equal(a, b)
    for (na, pa), (nb, pb) in zip(straight_parts.state_dict().items(), resumed_parts.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


@pytest.mark.parametrize("name", [n for n in NAMES if methods.get(n)[0].windowed])
def test_outside_the_window_every_method_is_joint_training(name):
    torch.manual_seed(0)
    parts = Parts()
    xs, y = data(1)[0]
    joint_parts = copy.deepcopy(parts)
    joint, joint_opt = build("joint", joint_parts)
    out = joint.forward(xs, y, 0)
    joint.loss(out, y).backward()

    method, _ = build(name, parts, window=(1, 2))
    assert method.window == agm_fast.Window(1, 2)
    assert [method.in_window(e) for e in range(4)] == [False, True, True, False]
    out = method.forward(xs, y, 0)
    loss = method.loss(out, y)
    loss.backward()
    coeffs = method.before_optimizer_step(out, y)
    assert torch.equal(coeffs, torch.ones(M))
    for (n, p), q in zip(parts.named_parameters(), joint_parts.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=n: f"{name}: {n}: {m}")
    # The same window is accepted as a tuple or as a Window, and None means every epoch.
    assert build(name, Parts(), window=agm_fast.Window(1, 2))[0].window == method.window
    assert build(name, Parts(), window=None)[0].in_window(0)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "joint"])
def test_inside_the_window_the_method_acts(name):
    torch.manual_seed(0)
    parts = Parts()
    method, opt = build(name, parts)
    coeffs = run_epochs(method, opt, range(3), data())
    assert any(not torch.equal(c, torch.ones(M)) for c in coeffs), name


def test_window_flags_and_defaults_come_from_the_methods():
    assert methods.get("agm")[0].defaults()["alpha"] == 1.0
    assert methods.get("ogm_ge")[0].defaults()["alpha"] == 0.8
    assert methods.get("cggm")[0].defaults()["lam"] == 0.1
    assert methods.get("opm")[0].defaults()["lam"] == 0.5
    assert methods.get("opm")[0].defaults()["warmup_epochs"] == 6
    assert not methods.get("joint")[0].windowed


def test_create_errors():
    parts = Parts()
    enc, fus = list(parts.encoders), parts.fusion
    with pytest.raises(ValueError, match="method: expected one of"):
        methods.create("nope", enc, fus)
    with pytest.raises(TypeError, match="alpha_typo: not an argument of AGMMethod"):
        methods.create("agm", enc, fus, alpha_typo=1.0)
    with pytest.raises(ValueError, match="mode: fixed to 'OGM' by method 'ogm'"):
        methods.create("ogm", enc, fus, mode="OGM_GE")
    with pytest.raises(ValueError, match="encoders: expected at least two modalities"):
        methods.create("joint", enc[:1], fus)
    with pytest.raises(TypeError, match="encoders: expected a list"):
        methods.create("joint", enc[0], fus)
    with pytest.raises(ValueError, match="num_permutations: applies to shapley='sampled'"):
        methods.create("agm", enc, fus, num_permutations=4)
    with pytest.raises(ValueError, match="fusion: expected a head with one output layer"):
        methods.create("cggm", enc, agm_fast.SumFusion([D] * M, C))
    with pytest.raises(RuntimeError, match="call forward"):
        methods.create("ogm", enc, fus).before_optimizer_step()
    with pytest.raises(KeyError, match="modality_accuracy"):
        methods.create("mslr", enc, fus).end_epoch(0, {"modality_loss": [1.0, 1.0]})
    with pytest.raises(ValueError, match="window: expected start <= end"):
        methods.create("ogm", enc, fus, window=(3, 1))


def test_a_new_method_is_one_class_and_one_registry_entry():
    @methods.declare(methods.HParams(methods.HParam("factor", 0.5, "gradient factor", parse=float)))
    class Halve(methods.Method):
        """Halves every encoder's gradients inside the window."""

        def __init__(self, encoders, fusion, *, window=None, seed=0, task="classification"):
            super().__init__(encoders, fusion, window=window, seed=seed, task=task)

        def before_optimizer_step(self, out=None, target=None):
            out, target = self._resolve(out, target)
            if not self.in_window(out.epoch):
                return self.ones(target.device)
            for enc in self.encoders:
                for p in enc.parameters():
                    p.grad.mul_(self.factor)
            return self.ones(target.device) * self.factor

    methods.register("halve", Halve)
    try:
        parts = Parts()
        method, opt = build("halve", parts)
        coeffs = run_epochs(method, opt, range(1), data(1))
        assert torch.equal(coeffs[0], torch.full((M,), 0.5))
        assert method.describe() == {"method": "halve", "window": [0, None], "factor": 0.5}
    finally:
        methods.unregister("halve")


# A method that owns its step (docs/owned-step.md) runs its own sub-steps instead of the hooks above, so the hook-level
# checks (the window's joint equivalence, before_optimizer_step's coefficients) say nothing about it; what it must do
# instead: its step through the one loop, its prediction rule, and accumulation refused.
OWNED = [n for n in NAMES if methods.get(n)[0].owns_step]


@pytest.mark.parametrize("name", OWNED)
def test_a_method_that_owns_its_step_predicts_and_refuses_accumulation(name):
    torch.manual_seed(0)
    parts = Parts()
    method, opt = build(name, parts)
    before = copy.deepcopy(parts.state_dict())
    xs, y = data(1)[0]
    res = methods.training_step(method, xs, y, 0, opt, progress=0.0)
    assert isinstance(res, methods.StepResult) and not res.loss.requires_grad
    assert any(not torch.equal(before[k], v) for k, v in parts.state_dict().items())
    logits = method.predict(xs)
    assert logits.shape == (B, C) and torch.isfinite(logits).all()
    assert method.accumulation == "refused"
    with pytest.raises(ValueError, match="steps: .* cannot modulate micro-batches"):
        method.set_accumulation(2)
