"""The subset-batch kernels (kernels/subset_batch.py) and the agm_fast::subset_batch ops against subset_batch_torch.

On a GPU the kernels run compiled on CUDA tensors; without one they run in Triton's interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1 before triton is imported).
"""

import pytest
import torch
from agm_fast.kernels import subset_batch as k

from agm_fast import functional
from agm_fast.coalitions import subset_masks
from agm_fast.ops.subset_batch import subset_batch_bwd_op, subset_batch_op, subset_batch_torch

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# The kernels run on the GPU when there is one, else in Triton's interpreter on CPU tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (per-sample shape, B, M, modality, muted with a row (else zeros), dtype); D = 1 and D > one block included.
CASES = [
    ((), 1, 2, 0, True, F32),
    ((3, 5), 7, 2, 1, True, F32),
    ((33,), 300, 3, 0, False, F32),
    ((2000,), 64, 2, 1, True, F32),
    ((4, 3), 7, 8, 5, True, F32),
    ((10,), 64, 5, 4, False, BF16),
    ((2, 101), 7, 3, 2, True, F16),
    ((1030,), 1, 3, 1, True, BF16),
]


def _case_id(case):
    inner, B, M, modality, muted, dtype = case
    return f"{'x'.join(map(str, inner)) or 'scalar'}-B{B}-M{M}-m{modality}-{'row' if muted else 'zeros'}-{dtype}"


def _inputs(inner, B, M, modality, muted, dtype):
    x = torch.randn((B,) + inner, device=DEVICE).to(dtype)
    mute = torch.randn(inner, device=DEVICE).to(dtype) if muted else None
    return x, mute, subset_masks(M)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_kernel_matches_reference(case):
    inner, B, M, modality, muted, dtype = case
    x, mute, masks = _inputs(*case)
    out = torch.full((len(masks) * B,) + inner, float("nan"), dtype=dtype, device=DEVICE)
    got = k.subset_batch_fwd(x, mute, masks, modality, out=out)
    assert got is out
    want = subset_batch_torch([x], [(mask >> modality) & 1 for mask in masks], [mute])[0]
    # A copy: bit-exact in every dtype.
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_kernel_matches_reference(case):
    inner, B, M, modality, muted, dtype = case
    masks = subset_masks(M)
    S = len(masks)
    grad = torch.randn((S * B,) + inner, device=DEVICE).to(dtype)
    mute_shape = list(inner) if muted else None
    out = (
        torch.full((B,) + inner, float("nan"), dtype=dtype, device=DEVICE),
        torch.full(inner if muted else (), float("nan"), dtype=dtype, device=DEVICE),
    )
    dx, dmute = k.subset_batch_bwd(grad, mute_shape, masks, modality, out=out)
    keep = torch.tensor([(mask >> modality) & 1 for mask in masks], dtype=torch.float64, device=DEVICE)
    g = grad.double().reshape((S, B) + inner)
    view = (S,) + (1,) * (g.dim() - 1)
    dx_truth = (g * keep.view(view)).sum(0)
    dmute_truth = (g * (1 - keep).view(view)).sum((0, 1)) if muted else g.new_zeros(())
    if dtype == F32:
        torch.testing.assert_close(dx, dx_truth.float())
        torch.testing.assert_close(dmute, dmute_truth.float())
    else:
        # Twice the reference's own error (it accumulates in float32 and rounds once, like the kernel), plus one ulp
        # of the largest value: Triton's interpreter converts float32 to bfloat16 by truncation (the GPU rounds).
        for got, truth in ((dx, dx_truth), (dmute, dmute_truth)):
            own = (truth.to(dtype).double() - truth).abs().max().item()
            err = (got.double() - truth).abs().max().item()
            assert err <= 2 * own + 1e-3 + torch.finfo(dtype).eps * truth.abs().max().item()


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=_case_id)
def test_op_gradients_match_torch_backend(case, monkeypatch):
    inner, B, M, modality, muted, dtype = case
    x, mute, masks = _inputs(*case)
    grad = torch.randn((len(masks) * B,) + inner, device=DEVICE).to(dtype)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("AGM_FAST_BACKEND", backend)
        xg = x.clone().requires_grad_(True)
        mg = None if mute is None else mute.clone().requires_grad_(True)
        out = subset_batch_op(xg, mg, masks, modality)
        inputs = [xg] if mg is None else [xg, mg]
        results[backend] = [out.detach(), *torch.autograd.grad(out, inputs, grad)]
    tol = {} if dtype == F32 else dict(atol=1e-2, rtol=1e-2)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, **tol)


def test_strided_inputs():
    masks = subset_masks(3)
    keep = [(mask >> 1) & 1 for mask in masks]
    # A strided batch dimension (read in place), then a per-sample part that must be copied to be flattened.
    for x in (torch.randn(20, 4, 6, device=DEVICE)[::2], torch.randn(20, 6, 4, device=DEVICE)[::2].transpose(1, 2)):
        mute = torch.randn(6, 4, device=DEVICE).t()
        got = k.subset_batch_fwd(x, mute, masks, 1)
        assert torch.equal(got, subset_batch_torch([x], keep, [mute])[0])
    # The per-sample part [4, 4] of this gradient cannot be viewed as one dimension: the launcher copies it.
    grad = torch.randn(len(masks) * 10, 8, 4, device=DEVICE)[:, ::2]
    dx, dmute = k.subset_batch_bwd(grad, [2, 8], masks, 1)
    g = grad.reshape(len(masks), 10, 4, 4)
    kept = torch.tensor(keep, dtype=torch.float32, device=DEVICE).view(-1, 1, 1, 1)
    torch.testing.assert_close(dx, (g * kept).sum(0))
    torch.testing.assert_close(dmute, (g * (1 - kept)).sum((0, 1)).reshape(2, 8))


def test_mute_in_another_dtype_is_cast():
    x = torch.randn(5, 3, device=DEVICE).to(BF16)
    mute = torch.randn(3, dtype=torch.float64, device=DEVICE)
    got = k.subset_batch_fwd(x, mute, [1, 2, 3], 0)
    assert got.dtype == BF16
    assert torch.equal(got, subset_batch_torch([x], [1, 0, 1], [mute])[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", backend)
    masks = subset_masks(3)
    x = torch.randn(7, 5, device=DEVICE, requires_grad=True)
    mute = torch.randn(5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(subset_batch_op, (x, mute, masks, 2))
    torch.library.opcheck(subset_batch_op, (x, None, masks, 0))
    grad = torch.randn(len(masks) * 7, 5, device=DEVICE)
    torch.library.opcheck(subset_batch_bwd_op, (grad, [5], masks, 2))
    torch.library.opcheck(subset_batch_bwd_op, (grad, None, masks, 0))


def test_compiled_matches_eager(monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", "triton")
    masks = subset_masks(2)
    x0 = torch.randn(7, 5, device=DEVICE)
    mute0 = torch.randn(5, device=DEVICE)

    def fn(x, mute):
        return functional.subset_batch(x, mute, masks, 1).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        x, mute = x0.clone().requires_grad_(True), mute0.clone().requires_grad_(True)
        loss = f(x, mute)
        loss.backward()
        results.append((loss.detach(), x.grad, mute.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_functional_validation():
    x = torch.randn(7, 5)
    with pytest.raises(ValueError, match=r"mute: expected one sample of x, shape \(5,\)"):
        functional.subset_batch(x, torch.zeros(7, 5), [1, 2, 3], 0)
    with pytest.raises(ValueError, match="mute: on meta"):
        functional.subset_batch(x, torch.zeros(5, device="meta"), [1, 2, 3], 0)
    with pytest.raises(ValueError, match="masks: expected a non-empty list"):
        functional.subset_batch(x, None, [], 0)
    with pytest.raises(ValueError, match="masks: expected a non-empty list"):
        functional.subset_batch(x, None, [1, -2], 0)
    with pytest.raises(TypeError, match="modality: expected a non-negative int"):
        functional.subset_batch(x, None, [1, 2, 3], -1)
    with pytest.raises(ValueError, match="x: expected a batch"):
        functional.subset_batch(torch.tensor(1.0), None, [1], 0)
    out = functional.subset_batch(x, None, [1, 2, 3], 0)
    assert torch.equal(out, torch.cat([x, torch.zeros_like(x), x]))
