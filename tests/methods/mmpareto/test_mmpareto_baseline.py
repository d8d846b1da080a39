"""The reference-style MMPareto step of the benchmarks gives the method's gradients (so its timing compares equals)."""

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast import methods

baselines = pytest.importorskip("agm_fast.benchmarks.baselines.mmpareto_reference_style")


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reference_style_step_gives_the_methods_gradients(M, seed):
    C, B, D = 4, 12, 6

    def model():
        torch.manual_seed(seed)
        encoders = [nn.Sequential(nn.Linear(5, D), nn.Tanh(), nn.Linear(D, D)) for _ in range(M)]
        fusion = agm_fast.ConcatFusion([D] * M, C)
        heads = [nn.Linear(D, C) for _ in range(M)]
        return encoders, fusion, heads

    g = torch.Generator().manual_seed(100 + seed)
    xs = [torch.randn(B, 5, generator=g) for _ in range(M)]
    y = torch.randint(0, C, (B,), generator=g)

    encoders, fusion, heads = model()
    method = methods.create("mmpareto", encoders, fusion, heads=heads)
    params = [p for mod in [*encoders, fusion, *heads] for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    out = method.forward(xs, y, 0)
    opt.zero_grad()
    method.loss(out, y).backward()
    weight = method.before_optimizer_step(out, y)
    want = [p.grad.clone() for p in params]
    if (M, seed) in {(2, 2), (2, 3), (3, 1)}:
        assert method.decisions()["pareto"].any()  # the min-norm branch and the rescale are compared too

    encoders, fusion, heads = model()
    reference = baselines.ReferenceStyleMMPareto(encoders, fusion, heads)
    params = [p for mod in [*encoders, fusion, *heads] for p in mod.parameters()]
    reference.backward(torch.optim.SGD(params, lr=0.1), xs, y)
    torch.testing.assert_close(weight, torch.tensor(reference.weights, dtype=torch.float32))
    for i, (p, w) in enumerate(zip(params, want)):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"parameter {i}: {m}")
