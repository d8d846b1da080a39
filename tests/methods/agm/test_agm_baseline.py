"""The reference-style AGM baseline of the benchmarks matches agm_fast.AGM (coefficients and parameter gradients)."""

import pytest
import torch
from agm_fast.benchmarks.baselines.agm_reference_style import ReferenceAGMState, ReferenceGradMod, reference_agm_step
from agm_models import clone, grads, make_batch, make_model
from torch import nn

import agm_fast


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("strategy", ["batched", "factorized"])
@pytest.mark.parametrize("hold_last", [False, True])
def test_baseline_matches_agm_over_steps(M, strategy, hold_last):
    init = make_model(M, "mlp", bn=True, dropout=0.2)
    window = (1, 2)
    ref_model, our_model = clone(init), clone(init)
    wrapper = ReferenceGradMod(ref_model, M)
    state = ReferenceAGMState(M, alpha=2.5, cap=0.5, window=window, hold_last=hold_last)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    if strategy == "factorized":
        agm = agm_fast.AGM(encoders=list(our_model.encoders), fusion=our_model.fusion, alpha=2.5, cap=0.5,
                           window=window, hold_last=hold_last)
    else:
        agm = agm_fast.AGM(our_model, num_modalities=M, strategy=strategy, alpha=2.5, cap=0.5, window=window,
                           hold_last=hold_last)
    our_opt = torch.optim.SGD(our_model.parameters(), lr=0.1)
    for step, epoch in enumerate([0, 1, 2, 3, 1]):
        xs, y = make_batch(M, seed=50 + step)
        torch.manual_seed(step)
        coeffs, scores, _ = reference_agm_step(wrapper, state, xs, y, None, epoch=epoch)
        torch.manual_seed(step)
        res = agm(*xs, target=y, epoch=epoch)
        nn.functional.cross_entropy(res.logits, y).backward()
        torch.testing.assert_close(res.coeffs, torch.tensor(coeffs, dtype=torch.float32))
        torch.testing.assert_close(res.scores, torch.tensor(scores, dtype=torch.float32))
        for a, b in zip(grads(ref_model), grads(our_model)):
            torch.testing.assert_close(a, b)
        for a, b in zip(ref_model.buffers(), our_model.buffers()):
            torch.testing.assert_close(a, b)
        ref_opt.step()
        our_opt.step()
        ref_opt.zero_grad()
        our_opt.zero_grad()
    torch.testing.assert_close(agm.coefficients.running, torch.tensor(state.running, dtype=torch.float32))
