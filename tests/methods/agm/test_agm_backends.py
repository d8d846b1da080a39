"""A whole AGM training step with the Triton kernels forced (the interpreter on CPU) equals the reference backend."""

from __future__ import annotations

import pytest
import torch
from agm_models import clone, grads, make_batch, make_model
from torch import nn

from agm_fast import AGM


def _step(model, strategy, shapley, xs, y):
    torch.manual_seed(7)
    if strategy == "factorized":
        agm = AGM(encoders=list(model.encoders), fusion=model.fusion, strategy="factorized", alpha=1.5, shapley=shapley)
    else:
        agm = AGM(model, num_modalities=len(model.encoders), strategy=strategy, alpha=1.5, shapley=shapley)
    res = agm(*xs, target=y)
    nn.functional.cross_entropy(res.logits, y).backward()
    return res, grads(model), agm.state_dict()


@pytest.mark.parametrize(
    "M,head,strategy,shapley",
    [(2, "mlp", "batched", "reference"), (3, "linear", "factorized", "exact"), (3, "mlp", "factorized", "reference")],
)
def test_triton_step_equals_torch_step(M, head, strategy, shapley, monkeypatch):
    model = make_model(M, head, bn=True, dropout=0.2)
    xs, y = make_batch(M, B=7)
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("AGM_FAST_BACKEND", backend)
        out[backend] = _step(clone(model), strategy, shapley, xs, y)
    (r_t, g_t, s_t), (r_k, g_k, s_k) = out["torch"], out["triton"]
    for a, b in zip(r_k, r_t):
        torch.testing.assert_close(a, b)
    for a, b in zip(g_k, g_t):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(s_k["coefficients.running"], s_t["coefficients.running"])
