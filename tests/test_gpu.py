"""GPU-only checks: whole training steps run without a single host synchronisation.

Under ``torch.cuda.set_sync_debug_mode("error")`` any operation that makes the host wait for the device (``.item()``,
a device-to-host copy, ``nonzero``, a pageable host-to-device copy) raises. The first step of each loop runs before
the mode is switched on: it builds the cached weight matrices and keep-bit tables once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import agm_fast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, C = 32, 6
DIMS = (12, 9, 7)


def _encoders(m: int):
    return [nn.Sequential(nn.Linear(DIMS[i], 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1)) for i in range(m)]


class _BlackBox(nn.Module):
    def __init__(self, encoders, fusion):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion

    def forward(self, *xs):
        return self.fusion(*[enc(x) for enc, x in zip(self.encoders, xs)])


def _data(m: int):
    xs = [torch.randn(B, DIMS[i], device="cuda") for i in range(m)]
    y = torch.randint(0, C, (B,), device="cuda")
    return xs, y


def _run_steps(step, n: int = 3) -> None:
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(n):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize(
    "strategy,masked_mode,shapley",
    [
        ("sequential", "eval", "reference"),
        ("batched", "eval", "reference"),
        ("factorized", "eval", "reference"),
        ("factorized", "train", "reference"),
        ("factorized", "eval", "exact"),
        ("factorized", "eval", "sampled"),
    ],
)
@pytest.mark.parametrize("head", ["concat", "mlp"])
def test_agm_step_has_no_host_sync(m, strategy, masked_mode, shapley, head):
    encoders = _encoders(m)
    fusion = agm_fast.ConcatFusion([16] * m, C) if head == "concat" else agm_fast.MLPFusion([16] * m, C, hidden=32)
    if strategy == "factorized":
        agm = agm_fast.AGM(
            encoders=encoders,
            fusion=fusion,
            alpha=1.5,
            window=(0, 10),
            strategy=strategy,
            masked_mode=masked_mode,
            shapley=shapley,
        )
        params = [p for mod in encoders + [fusion] for p in mod.parameters()]
        for mod in encoders + [fusion]:
            mod.cuda()
    else:
        model = _BlackBox(encoders, fusion).cuda()
        agm = agm_fast.AGM(model, num_modalities=m, alpha=1.5, window=(0, 10), strategy=strategy, shapley=shapley)
        params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    xs, y = _data(m)

    def step():
        res = agm(*xs, target=y, epoch=1)
        loss = nn.functional.cross_entropy(res.logits, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    _run_steps(step)
    assert torch.isfinite(agm.state_dict()["coefficients.running"]).all()


@pytest.mark.parametrize("mode", ["OGM", "OGM_GE"])
def test_ogm_ge_step_has_no_host_sync(mode):
    encoders = [e.cuda() for e in _encoders(2)]
    fusion = agm_fast.ConcatFusion([16, 16], C).cuda()
    ogm = agm_fast.OGMGE(encoders, alpha=0.8, mode=mode, window=(0, 10), seed=3)
    params = [p for mod in encoders + [fusion] for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    xs, y = _data(2)

    def step():
        feats = [enc(x) for enc, x in zip(encoders, xs)]
        loss = nn.functional.cross_entropy(fusion(*feats), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        ogm.step_from_features(y, fusion, feats, epoch=1)
        opt.step()

    _run_steps(step)


def test_ogm_ge_cuda_noise_matches_cpu():
    grads = [torch.randn(n) for n in (1, 7, 1000, 65537)]
    coeffs = torch.tensor([0.5, 1.0])
    group = [0, 1, 0, 1]
    cpu = [g.clone() for g in grads]
    cuda = [g.cuda() for g in grads]
    agm_fast.functional.ogm_ge_(cpu, group, coeffs, noise=True, seed=11, offset=4)
    agm_fast.functional.ogm_ge_(cuda, group, coeffs.cuda(), noise=True, seed=11, offset=4)
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
