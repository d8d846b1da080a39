"""Property-based fuzzing of the public surface: method constructors and steps, the functional ops and the
``--data`` loader.

Every outcome must be a correct result or an exception of the documented kind (TypeError for a wrong type,
ValueError for a wrong value; FileNotFoundError for a missing file) whose message names the argument. Never a NaN
from finite inputs, never an exception from inside torch or numpy.
"""

import math
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import agm_fast
from agm_fast import data as data_mod
from agm_fast import functional, methods
from agm_fast.fusion import ConcatFusion

# Deterministic example streams: a failure in CI reproduces on any machine.
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
)


def names_the_argument(exc: BaseException, *names: str) -> bool:
    text = str(exc)
    return any(text.startswith(f"{n}:") or text.startswith(f"{n}[") for n in names)


def finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor))


class Parts(nn.Module):
    def __init__(self, M: int, d: int = 4, C: int = 3):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(3, d), nn.Tanh()) for _ in range(M))
        self.fusion = ConcatFusion([d] * M, C)


SANE = {
    # Values that a user can set and that keep float32 arithmetic in range (published settings and around them).
    "alpha": st.floats(0.0, 4.0),
    "cap": st.one_of(st.none(), st.floats(0.01, 10.0)),
    "hold_last": st.booleans(),
    "strategy": st.sampled_from(["auto", "sequential", "batched", "factorized"]),
    "masked_mode": st.sampled_from(["eval"]),
    "shapley": st.sampled_from(["reference", "exact", "sampled"]),
    "continuous": st.booleans(),
    "conv_only": st.just(False),
    "journal": st.booleans(),
    "ogm_plus": st.booleans(),
    "q_base": st.floats(0.0, 1.0),
    "lam": st.floats(0.0, 2.0),
    "p_exe": st.floats(0.0, 1.0),
    "warmup_epochs": st.integers(0, 2),
    "theta_grad": st.sampled_from(["reference", "none"]),
    "rho": st.floats(0.1, 3.0),
    "direction": st.sampled_from(["weights", "gradient"]),
    "bound": st.one_of(st.none(), st.floats(0.5, 5.0)),
    "init_lr_scales": st.lists(st.floats(0.1, 3.0), min_size=2, max_size=2),
    "history": st.integers(1, 6),
    "patience": st.integers(0, 3),
    "smoothing": st.floats(0.0, 1.0),
}


@FUZZ
@given(name=st.sampled_from(methods.available()), data=st.data())
def test_method_constructors_accept_or_name_the_argument(name, data):
    cls, preset = methods.get(name)
    options = [o.name for o in cls.HPARAMS if o.cli and o.name not in preset]
    parts = Parts(2)
    kwargs = {}
    for opt in options:
        if data.draw(st.booleans(), label=f"set {opt}"):
            kwargs[opt] = data.draw(ANY_VALUE, label=opt)
    try:
        method = methods.create(name, list(parts.encoders), parts.fusion, **kwargs)
    except (TypeError, ValueError) as exc:
        assert names_the_argument(exc, *kwargs), f"{name} {kwargs}: {exc}"
        return
    # What was accepted is what a user could mean: finite numbers in range, the right types.
    for key, value in method.hyperparameters().items():
        if isinstance(value, float):
            assert math.isfinite(value), (name, key, value)


@FUZZ
@given(
    name=st.sampled_from(methods.available()),
    M=st.integers(2, 3),
    B=st.integers(2, 6),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_method_steps_on_finite_inputs_give_finite_results(name, M, B, steps, seed, data):
    cls, preset = methods.get(name)
    kwargs = {
        o.name: data.draw(SANE[o.name], label=o.name) for o in cls.HPARAMS if o.name in SANE and o.name not in preset
    }
    if name == "mslr":
        kwargs["init_lr_scales"] = kwargs["init_lr_scales"][:1] * M
    if kwargs.get("shapley") != "sampled":
        kwargs.pop("num_permutations", None)
    torch.manual_seed(seed % 1000)
    parts = Parts(M)
    try:
        method = methods.create(name, list(parts.encoders), parts.fusion, seed=seed, **kwargs)
    except ValueError as exc:
        # Combinations that a class refuses by design (e.g. strategy and masked mode) name their argument.
        assert names_the_argument(exc, *kwargs), exc
        return
    opt = torch.optim.SGD([{"params": list(parts.parameters())}] + method.param_groups(0.01), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(steps):
        xs = [torch.randn(B, 3, generator=g) for _ in range(M)]
        y = torch.randint(0, 3, (B,), generator=g)
        methods.run_epoch_passes(method, epoch, "start", [(xs, y)], [(xs, y)])  # PMR's prototypes
        res = methods.training_step(method, xs, y, epoch, opt)
        assert res.coeffs.shape == (M,) and res.coeffs.dtype == torch.float32
        assert finite(res.loss, res.coeffs), (name, kwargs, res)
        method.end_epoch(epoch, {"modality_accuracy": [0.5] * M, "modality_loss": [1.0 + epoch] * M})
    assert all(finite(p) for p in parts.parameters())


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool])


@st.composite
def logits_and_labels(draw):
    M = draw(st.integers(0, 4))
    B = draw(st.integers(0, 5))
    C = draw(st.integers(0, 5))
    dtype = draw(DTYPES)
    x = torch.randn(M, B, C) * draw(st.floats(0.0, 30.0))
    if x.numel() and draw(st.booleans()):
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    x = x.to(dtype)
    label_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32]))
    labels = torch.randint(-1 if draw(st.booleans()) else 0, max(C, 1) + draw(st.integers(0, 1)), (B,))
    if draw(st.booleans()) and B > 0:
        labels = labels[: draw(st.integers(0, B - 1))]
    return x, labels.to(label_dtype), draw(st.floats(0.0, 4.0))


@FUZZ
@given(case=logits_and_labels(), continuous=st.booleans())
def test_ogm_scores_results_or_named_errors(case, continuous):
    logits, labels, alpha = case
    try:
        scores, coeffs = functional.ogm_scores(logits, labels, alpha, continuous)
    except (TypeError, ValueError) as exc:
        assert names_the_argument(exc, "logits", "labels", "alpha"), exc
        return
    assert scores.shape == coeffs.shape == (logits.shape[0],)
    if finite(logits.float()):
        assert finite(scores, coeffs), (logits, labels, scores, coeffs)
    # OGM's coefficients lie in (0, 1] (damped) or are 1, or NaN for non-finite input.
    ok = torch.isnan(coeffs) | ((coeffs > 0) & (coeffs <= 1))
    assert bool(ok.all())


@FUZZ
@given(case=logits_and_labels(), data=st.data())
def test_agm_coefficients_results_or_named_errors(case, data):
    logits, labels, alpha = case
    cap = data.draw(st.one_of(st.none(), st.floats(0.01, 10.0)))
    coef = agm_fast.AGMCoefficients(max(logits.shape[0], 2), alpha=alpha, cap=cap)
    try:
        coeffs = coef(logits, labels)
    except (TypeError, ValueError) as exc:
        assert names_the_argument(exc, "psis", "labels"), exc
        return
    assert coeffs.dtype == torch.float32
    if finite(logits.float()):
        assert finite(coeffs), (logits, labels, coeffs)
        assert float(coef.count) == 1.0


@FUZZ
@given(case=logits_and_labels(), mode=st.sampled_from(["OGM", "OGM_GE"]), journal=st.booleans())
def test_ogmge_step_results_or_named_errors(case, mode, journal):
    logits, labels, alpha = case
    encs = [nn.Linear(2, 2) for _ in range(max(logits.shape[0], 2))]
    for e in encs:
        e.weight.grad = torch.randn(2, 2)
        e.bias.grad = torch.randn(2)
    ogm = agm_fast.OGMGE(encs, alpha=alpha, mode=mode, journal=journal, warmup_epochs=0)
    try:
        coeffs = ogm.step(labels, logits, epoch=0)
    except (TypeError, ValueError) as exc:
        assert names_the_argument(exc, "per_modality_logits", "labels"), exc
        return
    if finite(logits.float()):
        assert finite(coeffs) and all(finite(e.weight.grad, e.bias.grad) for e in encs)


@FUZZ
@given(
    B=st.integers(0, 6),
    dims=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    q=st.lists(st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)), min_size=1, max_size=4),
    dtype=DTYPES,
)
def test_opm_forward_results_or_named_errors(B, dims, q, dtype):
    opm = agm_fast.OPM(dims, p_exe=1.0, warmup_epochs=0)
    feats = [torch.randn(B, d).to(dtype) for d in dims]
    try:
        out, weight = opm(*feats, drop_probs=torch.tensor(q), epoch=0)
    except (TypeError, ValueError) as exc:
        assert names_the_argument(exc, "features", "drop_probs"), exc
        return
    assert [tuple(o.shape) for o in out] == [(B, d) for d in dims] and weight.shape == (B,)
    assert finite(*out, weight)


@st.composite
def npz_contents(draw):
    N = draw(st.integers(0, 12))
    arrays = {}
    for name in draw(st.lists(st.sampled_from(["a", "b", "c", ""]), max_size=3, unique=True)):
        shape = draw(st.sampled_from([(N, 2), (N,), (N, 0), (max(N - 1, 0), 2), (N, 2, 1)]))
        kind = draw(st.sampled_from(["float", "int", "nan", "str", "bool", "complex"]))
        if kind == "str":
            arr = np.full(shape, "x")
        elif kind == "complex":
            arr = np.zeros(shape, dtype=complex)
        elif kind == "bool":
            arr = np.zeros(shape, dtype=bool)
        else:
            arr = np.random.default_rng(N).normal(size=shape)
            if kind == "int":
                arr = arr.astype(np.int64)
            if kind == "nan" and arr.size:
                arr.reshape(-1)[0] = np.nan
        arrays[f"x_{name}"] = arr
    if draw(st.booleans()):
        y_kind = draw(st.sampled_from(["ok", "float", "negative", "ids", "2d", "short", "single"]))
        y = np.arange(N) % 3
        y = {
            "ok": y,
            "float": y.astype(float),
            "negative": y - 1,
            "ids": y * 1000003,
            "2d": y.reshape(-1, 1),
            "short": y[:-1],
            "single": np.zeros(N, dtype=int),
        }[y_kind]
        arrays["y"] = y
    return arrays


@FUZZ
@given(arrays=npz_contents(), views=st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "z"]), max_size=3)))
def test_data_loader_results_or_named_errors(tmp_path_factory, arrays, views):
    path = str(tmp_path_factory.mktemp("npz") / "d.npz")
    np.savez(path, **arrays)
    try:
        data = data_mod.load_npz(path, views)
    except ValueError as exc:
        assert str(exc).startswith(f"data file {path!r}") or names_the_argument(exc, "views"), exc
        return
    assert len(data.names) == len(data.xs) >= 1
    for x in data.xs:
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[0] == data.y.shape[0] and np.isfinite(x).all()
    assert data.y.dtype == np.int64 and data.y.min() >= 0 and data.y.max() < data.num_classes


@FUZZ
@given(blob=st.binary(max_size=200), zipped=st.booleans())
def test_data_loader_on_arbitrary_bytes(tmp_path_factory, blob, zipped):
    path = tmp_path_factory.mktemp("raw") / "d.npz"
    if zipped:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x_a.npy", blob)
            z.writestr("y.npy", blob)
    else:
        path.write_bytes(blob)
    with pytest.raises(ValueError, match=r"^data file "):
        data_mod.load_npz(str(path))
