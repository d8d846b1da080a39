"""Shapley mono-modal outputs of AGM: axioms, the reference variant, permutation sampling (docs/methods.md,
section 1.3)."""

import itertools
import math

import pytest
import torch
from agm_models import Composite, Encoder, MLPFusion, make_batch
from torch import nn

import agm_fast
from agm_fast import functional as fn

# The Shapley combination accumulates in float32 (the op contract): float64 hand values are compared at that precision.
TOL = dict(rtol=1e-5, atol=1e-6)


def close(a, b):
    torch.testing.assert_close(a.double(), b.double(), **TOL)


def _subset_table(model: nn.Module, xs, M: int) -> dict:
    """f(S) for all 2^M subsets (zeros at the muted inputs), model in eval mode, as float64."""
    with torch.no_grad():
        return {
            mask: model(*[x if (mask >> m) & 1 else torch.zeros_like(x) for m, x in enumerate(xs)]).double()
            for mask in range(2**M)
        }


def _phi_by_permutations(table: dict, M: int) -> torch.Tensor:
    """The Shapley value from its definition: the average marginal contribution over all M! orders."""
    phi = torch.zeros((M,) + tuple(table[0].shape), dtype=torch.float64)
    for order in itertools.permutations(range(M)):
        prefix = 0
        for m in order:
            phi[m] += table[prefix | (1 << m)] - table[prefix]
            prefix |= 1 << m
    return phi / math.factorial(M)


def _model(M: int, ignore=None, seed=0) -> Composite:
    torch.manual_seed(seed)
    model = Composite([Encoder(3 + m, 5, bn=False) for m in range(M)], MLPFusion(5 * M, 3, bn=False))
    if ignore is not None:
        # The head never sees modality `ignore`: its weights on that feature are zero.
        with torch.no_grad():
            model.fusion.net[0].weight[:, 5 * ignore : 5 * ignore + 5] = 0
    return model.eval()


@pytest.mark.parametrize("M", [2, 3, 4, 5, 6])
def test_exact_shapley_axioms(M):
    xs, y = make_batch(M, B=3, num_classes=3)
    model = _model(M, ignore=M - 1)
    agm = agm_fast.AGM(model, num_modalities=M, shapley="exact", strategy="batched").eval()
    phi = agm(*xs, target=y).mono
    table = _subset_table(model, xs, M)
    # Efficiency.
    close(phi.sum(0), table[2**M - 1] - table[0])
    # Null player: the ignored modality gets exactly nothing.
    close(phi[M - 1], torch.zeros_like(phi[M - 1]))
    # The definition (average over orders), for small M.
    if M <= 5:
        close(phi, _phi_by_permutations(table, M))


@pytest.mark.parametrize("M", [2, 3, 4, 5, 6])
def test_exact_shapley_symmetry(M):
    # Modalities 0 and 1 share their encoder and input, and the head treats their features alike.
    torch.manual_seed(M)
    shared = Encoder(3, 5, bn=False)
    encoders = [shared, shared] + [Encoder(3 + m, 5, bn=False) for m in range(2, M)]

    class SymHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = MLPFusion(5 * (M - 1), 3, bn=False)

        def forward(self, *f):
            return self.mix(f[0] + f[1], *f[2:])

    model = Composite(encoders, SymHead()).eval()
    xs, y = make_batch(M, B=3, num_classes=3)
    xs[1] = xs[0].clone()
    phi = agm_fast.AGM(model, num_modalities=M, shapley="exact", strategy="sequential").eval()(*xs, target=y).mono
    torch.testing.assert_close(phi[0], phi[1])


@pytest.mark.parametrize("M", [2, 3, 4, 5, 6])
def test_reference_variant_sums_to_full_output(M):
    xs, y = make_batch(M, B=3, num_classes=3)
    model = _model(M)
    psi = agm_fast.AGM(model, num_modalities=M).eval()(*xs, target=y).mono
    table = _subset_table(model, xs, M)
    close(psi.sum(0), table[2**M - 1])
    # psi = phi + f(empty) / M.
    if M <= 4:
        close(psi, _phi_by_permutations(table, M) + table[0] / M)


def test_reference_variant_two_modalities_formula():
    xs, y = make_batch(2, B=3, num_classes=3)
    model = _model(2)
    psi = agm_fast.AGM(model, num_modalities=2).eval()(*xs, target=y).mono
    t = _subset_table(model, xs, 2)
    close(psi[0], 0.5 * (t[3] - t[2] + t[1]))
    close(psi[1], 0.5 * (t[3] - t[1] + t[2]))


def test_functional_shapley_outputs_from_masks_and_weights():
    M = 3
    F = torch.randn(2**M, 4, 3, dtype=torch.float64)
    table = {mask: F[mask] for mask in range(2**M)}
    phi = fn.shapley_outputs(F, masks=list(range(2**M)), num_modalities=M)
    close(phi, _phi_by_permutations(table, M))
    masks, W = fn.shapley_subsets(M, "reference")
    assert masks == list(range(1, 2**M))
    psi = fn.shapley_outputs(F[1:], W.double())
    close(psi.sum(0), F[-1])
    # Masks in another order give the same values.
    perm = [5, 1, 7, 3, 2, 6, 4]
    torch.testing.assert_close(fn.shapley_outputs(F[perm], masks=perm, num_modalities=M), psi)
    with pytest.raises(ValueError, match="every non-empty subset"):
        fn.shapley_outputs(F[:5], masks=[1, 2, 3, 4, 5], num_modalities=M)


def test_sampled_error_falls_with_more_permutations():
    M = 5
    F = torch.randn(2**M, 6, 3, dtype=torch.float64)
    exact = fn.shapley_outputs(F[1:], masks=list(range(1, 2**M)), num_modalities=M)
    errors = []
    for P in (2, 8, 32, 128):
        err = 0.0
        for seed in range(8):
            gen = torch.Generator().manual_seed(seed)
            masks, W = fn.shapley_subsets(M, "sampled", num_permutations=P, generator=gen)
            est = fn.shapley_outputs(F[masks], W.double())
            # Every estimate of the reference variant sums to f(A) exactly.
            close(est.sum(0), F[-1])
            err += (est - exact).pow(2).mean().sqrt().item()
        errors.append(err / 8)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Monte Carlo: the error falls roughly as 1/sqrt(P); 64x the permutations gives well under a third.
    assert errors[-1] < errors[0] / 3, errors


def test_sampled_agm_beyond_eight_modalities_and_step_counter():
    M = 9
    torch.manual_seed(0)
    model = Composite([Encoder(2, 3, bn=False) for _ in range(M)], nn.Linear(3 * M, 2))
    xs = [torch.randn(4, 2) for _ in range(M)]
    y = torch.randint(0, 2, (4,))
    agm = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, shapley="sampled", num_permutations=3)
    first = agm(*xs, target=y)
    second = agm(*xs, target=y)
    assert agm.get_extra_state()["step"] == 2
    torch.testing.assert_close(first.mono.sum(0), first.logits, atol=1e-5, rtol=1e-5)
    # A new permutation draw each step, reproducible from (seed, step).
    assert not torch.allclose(first.mono, second.mono)
    again = agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion, shapley="sampled", num_permutations=3)
    torch.testing.assert_close(again(*xs, target=y).mono, first.mono)
    with pytest.raises(ValueError, match="shapley='sampled'"):
        agm_fast.AGM(encoders=list(model.encoders), fusion=model.fusion)
