"""Hyper-parameters are checked once, at construction, by the same rules and in the same words for every method:
``"<arg>: expected ..., got ..."``, TypeError for a wrong type and ValueError for a wrong value."""

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast import methods
from agm_fast.fusion import ConcatFusion

NAN, INF = float("nan"), float("inf")


def parts():
    encoders = [nn.Linear(3, 4), nn.Linear(3, 4)]
    return encoders, ConcatFusion([4, 4], 3)


def make(kind, **kwargs):
    enc, fus = parts()
    if kind == "AGM":
        return agm_fast.AGM(encoders=enc, fusion=fus, **kwargs)
    if kind == "AGMCoefficients":
        return agm_fast.AGMCoefficients(2, **{"alpha": 1.0, **kwargs})
    if kind == "OGMGE":
        return agm_fast.OGMGE(enc, **kwargs)
    if kind == "OPM":
        return agm_fast.OPM([4, 4], **kwargs)
    if kind == "CGGM":
        return agm_fast.CGGM(enc, fus.fc, [4, 4], 3, **{"head_lr": 0.1, **kwargs})
    if kind == "MSLR":
        return agm_fast.MSLR(enc, **kwargs)
    if kind == "MSES":
        return agm_fast.MSES(enc, **kwargs)
    raise AssertionError(kind)


BAD = [
    # AGM: a NaN or infinite alpha gives NaN gradients, a negative one inverts the modulation, a cap <= 0 (or -inf)
    # zeroes every gradient: all refused.
    ("AGM", "alpha", NAN, ValueError),
    ("AGM", "alpha", INF, ValueError),
    ("AGM", "alpha", -5.0, ValueError),
    ("AGM", "alpha", "1", TypeError),
    ("AGM", "cap", NAN, ValueError),
    ("AGM", "cap", -INF, ValueError),
    ("AGM", "cap", -5.0, ValueError),
    ("AGM", "cap", 0.0, ValueError),
    ("AGM", "hold_last", 1, TypeError),
    ("AGM", "num_permutations", 0, ValueError),
    ("AGM", "num_permutations", 2.0, TypeError),
    ("AGM", "max_batch", 0, ValueError),
    ("AGM", "seed", -1, ValueError),
    ("AGM", "strategy", "fast", ValueError),
    ("AGMCoefficients", "alpha", NAN, ValueError),
    ("AGMCoefficients", "cap", INF, ValueError),
    ("OGMGE", "alpha", NAN, ValueError),
    ("OGMGE", "alpha", -0.1, ValueError),
    ("OGMGE", "plus_factor", 0.0, ValueError),
    ("OGMGE", "plus_factor", INF, ValueError),
    ("OGMGE", "warmup_epochs", -1, ValueError),
    ("OGMGE", "warmup_epochs", 1.5, TypeError),
    ("OGMGE", "seed", 2**63, ValueError),
    ("OGMGE", "mode", "GE", ValueError),
    ("OGMGE", "journal", "yes", TypeError),
    ("OPM", "q_base", 1.5, ValueError),
    ("OPM", "q_base", NAN, ValueError),
    ("OPM", "p_exe", -0.1, ValueError),
    ("OPM", "lam", -1.0, ValueError),
    ("OPM", "lam", INF, ValueError),
    ("OPM", "theta_grad", "paper", ValueError),
    ("CGGM", "rho", NAN, ValueError),
    ("CGGM", "rho", 0.0, ValueError),
    ("CGGM", "rho", -1.3, ValueError),
    ("CGGM", "lam", -1.0, ValueError),
    ("CGGM", "lam", NAN, ValueError),
    ("CGGM", "bound", 0.0, ValueError),
    ("CGGM", "bound", NAN, ValueError),
    ("CGGM", "head_lr", -0.1, ValueError),
    ("CGGM", "direction", "cos", ValueError),
    ("MSLR", "init_lr_scales", [-1.0, 1.0], ValueError),
    ("MSLR", "init_lr_scales", [NAN, 1.0], ValueError),
    ("MSLR", "history", 0, ValueError),
    ("MSES", "patience", -1, ValueError),
    ("MSES", "patience", 1.5, TypeError),
    ("MSES", "smoothing", 1.5, ValueError),
    ("MSES", "skip_optimizer", "no", TypeError),
]


@pytest.mark.parametrize("kind, arg, value, exc", BAD, ids=[f"{k}-{a}-{v!r}" for k, a, v, _ in BAD])
def test_a_bad_hyperparameter_is_refused_at_construction(kind, arg, value, exc):
    with pytest.raises(exc) as info:
        make(kind, **{arg: value})
    message = str(info.value)
    # One style: the argument first, then what was expected, then what was given.
    assert message.startswith(arg) and ": expected " in message and "got" in message, message


@pytest.mark.parametrize("name", methods.available())
def test_the_method_interface_refuses_what_its_class_refuses(name):
    enc, fus = parts()
    cls, preset = methods.get(name)
    for opt in cls.HPARAMS:
        default = cls.defaults()[opt.name]
        if opt.parse is float and isinstance(default, float) and opt.name not in preset:
            with pytest.raises(ValueError, match=f"^{opt.name}(\\[0\\])?: expected"):
                methods.create(name, enc, fus, **{opt.name: NAN})


def test_good_values_construct():
    make("AGM", alpha=0.0, cap=None)
    make("AGM", alpha=2.5, cap=7)
    make("OGMGE", alpha=0.0, journal=True, ogm_plus=True, plus_factor=2)
    make("OPM", q_base=1.0, p_exe=0.0, lam=0.0, warmup_epochs=0)
    make("CGGM", rho=1.3, lam=0.0, bound=5.0)
    make("MSLR", init_lr_scales=[0.5, 2.0], history=3)
    make("MSES", patience=0, smoothing=0.0)


def test_empty_batches_are_refused_the_same_way_everywhere():
    enc, fus = parts()
    y = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="B = 0"):
        agm_fast.AGM(encoders=enc, fusion=fus)(torch.zeros(0, 3), torch.zeros(0, 3), target=y)
    with pytest.raises(ValueError, match="psis: expected a batch of at least one sample, got B = 0"):
        agm_fast.AGMCoefficients(2, alpha=1.0)(torch.zeros(2, 0, 3), y)
    for e in enc:
        e.weight.grad = torch.ones_like(e.weight)
    with pytest.raises(ValueError, match="per_modality_logits: expected a batch of at least one sample, got B = 0"):
        agm_fast.OGMGE(enc).step(y, torch.zeros(2, 0, 3), epoch=0)
    with pytest.raises(ValueError, match="logits: expected a batch of at least one sample"):
        agm_fast.functional.ogm_scores(torch.zeros(2, 0, 3), y, 0.5)


def test_encoders_that_return_a_tuple_get_a_clear_error():
    class TupleEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            h = self.fc(x)
            return h, h.mean()

    enc = [TupleEncoder(), TupleEncoder()]
    fus = ConcatFusion([4, 4], 3)
    xs, y = [torch.randn(5, 3), torch.randn(5, 3)], torch.zeros(5, dtype=torch.long)
    with pytest.raises(TypeError, match=r"encoders\[0\]: expected a module that returns one feature tensor"):
        agm_fast.AGM(encoders=enc, fusion=fus)(*xs, target=y)
    for name in methods.available():
        with pytest.raises(TypeError, match=r"encoders\[0\]: expected a module that returns one feature tensor"):
            methods.create(name, enc, fus, **({"warmup_epochs": 0} if name == "opm" else {})).forward(xs, y, 0)
