"""The OGM score kernels (kernels/ogm_scores.py) and the agm_fast::ogm_scores op against ogm_scores_torch.

On a GPU the kernels run compiled on CUDA tensors; without one they run in Triton's interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1 before triton is imported).
"""

import pytest
import torch
from agm_fast.kernels import ogm_scores as k

from agm_fast.ops.ogm_scores import ogm_coefficients_torch, ogm_scores_op, ogm_scores_torch

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# The kernels run on the GPU when there is one, else in Triton's interpreter on CPU tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (B, C, M, dtype): every B in {1, 7, 64, 300}, C in {1, 2, 10, 101, 1030}, M in {2, 3, 5, 8}, with several
# blocks of samples and several chunks of classes.
CASES = [
    (1, 1, 2, F32),
    (7, 2, 3, F32),
    (64, 10, 5, F32),
    (300, 101, 2, F32),
    (7, 1030, 8, F32),
    (300, 2, 8, F32),
    (64, 101, 3, BF16),
    (300, 10, 2, F16),
    (1, 1030, 5, BF16),
    (7, 10, 8, F16),
]
LOWP_ATOL = {BF16: 1e-2, F16: 1e-3}


def _case_id(case):
    B, C, M, dtype = case
    return f"B{B}-C{C}-M{M}-{str(dtype).split('.')[-1]}"


def _truth(logits, labels, alpha, continuous):
    """Scores in float64 from the same (possibly low-precision) logits; coefficients by the reference rule."""
    p = torch.softmax(logits.double(), dim=-1)
    scores = p.gather(-1, labels.view(1, -1, 1).expand(p.shape[0], -1, 1)).squeeze(-1).sum(1)
    return scores, ogm_coefficients_torch(scores, alpha, continuous)


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case, continuous):
    B, C, M, dtype = case
    logits = (2 * torch.randn(M, B, C, device=DEVICE)).to(dtype)
    labels = torch.randint(0, C, (B,), device=DEVICE)
    out = (torch.full((M,), float("nan"), device=DEVICE), torch.full((M,), float("nan"), device=DEVICE))
    got = k.ogm_scores_fwd(logits, labels, 0.8, continuous, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    want = ogm_scores_torch(logits, labels, 0.8, continuous)
    if dtype == F32:
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    else:
        truth = _truth(logits, labels, 0.8, continuous)
        for name, g, w, t in zip(("scores", "coeffs"), got, want, truth):
            err = (g.double() - t.double()).abs().max().item()
            own = (w.double() - t.double()).abs().max().item()
            assert err <= 2 * own + LOWP_ATOL[dtype], f"{name}: error {err:.3g} > 2 * {own:.3g}"


def test_two_modality_rule_and_tie():
    labels = torch.zeros(4, dtype=torch.long, device=DEVICE)
    zeros = torch.zeros(2, 4, 3, device=DEVICE)
    # Equal scores: the reference damps modality 0 with 1 - tanh(alpha * 1) (no "-1": rho = 1 still damps).
    scores, coeffs = k.ogm_scores_fwd(zeros, labels, 0.8, False)
    torch.testing.assert_close(coeffs.cpu(), torch.tensor([1 - torch.tanh(torch.tensor(0.8)).item(), 1.0]))
    torch.testing.assert_close(scores.cpu(), torch.full((2,), 4 / 3))
    _, coeffs = k.ogm_scores_fwd(zeros, labels, 0.8, True)
    torch.testing.assert_close(coeffs.cpu(), torch.ones(2))
    # Modality 1 dominant: rho > 1 damps modality 1.
    logits = zeros.clone()
    logits[1, :, 0] = 2.0
    for continuous in (False, True):
        got = k.ogm_scores_fwd(logits, labels, 0.8, continuous)
        want = ogm_scores_torch(logits, labels, 0.8, continuous)
        torch.testing.assert_close(got, want)
        assert got[1][0] == 1 and got[1][1] < 1


# Under the interpreter numpy warns about the inf / NaN arithmetic that this test is about.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_logits_follow_softmax():
    logits = torch.randn(3, 64, 10, device=DEVICE)
    logits[0, 3, 2] = float("nan")
    logits[1, 5, :] = float("-inf")
    logits[2, 7, 4] = float("-inf")
    labels = torch.randint(0, 10, (64,), device=DEVICE)
    got = k.ogm_scores_fwd(logits, labels, 0.8, False)
    want = ogm_scores_torch(logits, labels, 0.8, False)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert got[0][:2].isnan().all() and got[0][2].isfinite()
    assert got[1].isnan().all()


def test_strided_inputs():
    logits = torch.randn(10, 64, 6, device=DEVICE).permute(2, 1, 0)[::2]
    labels = torch.randint(0, 10, (128,), device=DEVICE)[::2]
    assert not logits.is_contiguous()
    torch.testing.assert_close(k.ogm_scores_fwd(logits, labels, 0.5, False), ogm_scores_torch(logits, labels, 0.5))


def test_reduction_is_deterministic():
    logits = torch.randn(3, 300, 10, device=DEVICE)
    labels = torch.randint(0, 10, (300,), device=DEVICE)
    first, second = k.ogm_scores_fwd(logits, labels, 0.8, False), k.ogm_scores_fwd(logits, labels, 0.8, False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# C = 1030 has several chunks of classes; C and C + 5 fall on padding columns of the last chunk.
@pytest.mark.parametrize("C", [10, 1030])
def test_out_of_range_label_gives_nan_without_reading_out_of_bounds(C, monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", "triton")
    logits = torch.randn(2, 7, C, device=DEVICE)
    for bad in (C, C + 5, -1, 1 << 40):
        labels = torch.randint(0, C, (7,), device=DEVICE)
        labels[2] = bad
        scores, coeffs = ogm_scores_op(logits, labels, 0.8, False)
        assert scores.isnan().all()
        # A non-finite score makes every coefficient NaN.
        assert coeffs.isnan().all()
        torch.testing.assert_close(coeffs, ogm_coefficients_torch(scores, 0.8), equal_nan=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", backend)
    logits = torch.randn(3, 7, 10, device=DEVICE)
    labels = torch.randint(0, 10, (7,), device=DEVICE)
    torch.library.opcheck(ogm_scores_op, (logits, labels, 0.8, False))
    torch.library.opcheck(ogm_scores_op, (logits[:2], labels, 0.1, True))


def test_compiled_matches_eager(monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", "triton")
    logits = torch.randn(2, 7, 10, device=DEVICE)
    labels = torch.randint(0, 10, (7,), device=DEVICE)

    def fn(x, y):
        return ogm_scores_op(x, y, 0.8, False)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, labels), fn(logits, labels))


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ogm_scores_op(torch.randn(2, 7, 10), torch.zeros(7, dtype=torch.long), 0.8, False)
