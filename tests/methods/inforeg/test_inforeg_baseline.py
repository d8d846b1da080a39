"""The reference-style InfoReg step of the benchmarks gives the method's gradients, step after step over epochs."""

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast import methods

baselines = pytest.importorskip("agm_fast.benchmarks.baselines.inforeg_reference_style")


@pytest.mark.parametrize("M", [2, 3])
def test_reference_style_steps_give_the_methods_gradients(M):
    C, B, D, EPOCHS, STEPS = 4, 12, 6, 3, 2
    bases = [0.95] + [0.1] * (M - 1)

    def model():
        torch.manual_seed(M)
        encoders = [nn.Sequential(nn.Linear(5, D), nn.Tanh(), nn.Linear(D, D)) for _ in range(M)]
        return encoders, agm_fast.ConcatFusion([D] * M, C)

    g = torch.Generator().manual_seed(7)
    batches = [([torch.randn(B, 5, generator=g) for _ in range(M)], torch.randint(0, C, (B,), generator=g))
               for _ in range(EPOCHS * STEPS)]
    batches = [([x + 2.0 * (m == 0) * nn.functional.one_hot(y, 5) for m, x in enumerate(xs)], y) for xs, y in batches]

    encoders, fusion = model()
    method = methods.create("inforeg", encoders, fusion, threshold=0.05, trace_window=2)
    params = [p for mod in [*encoders, fusion] for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=0.5)
    want, betas = [], []
    for i, (xs, y) in enumerate(batches):
        out = method.forward(xs, y, i // STEPS)
        opt.zero_grad()
        method.loss(out, y).backward()
        method.before_optimizer_step(out, y)
        want.append([p.grad.clone() for p in params])
        betas.append(method.decisions()["beta"])
        opt.step()
        if (i + 1) % STEPS == 0:
            method.end_epoch(i // STEPS, {})

    encoders, fusion = model()
    reference = baselines.ReferenceStyleInfoReg(encoders, fusion, bases, threshold=0.05, trace_window=2)
    params = [p for mod in [*encoders, fusion] for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=0.5)
    pulled = 0
    for i, (xs, y) in enumerate(batches):
        if i % STEPS == 0:
            reference.begin_epoch()
        reference.backward(opt, xs, y)
        torch.testing.assert_close(torch.tensor(reference.beta), betas[i], msg=lambda m: f"step {i}: {m}")
        pulled += i % STEPS != 0 and any(b > 0 for b in reference.beta)
        for j, (p, w) in enumerate(zip(params, want[i])):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}, parameter {j}: {m}")
        opt.step()
        if (i + 1) % STEPS == 0:
            reference.end_epoch()
    assert pulled >= 2, "the pull acted on too few steps for the comparison to mean anything"
