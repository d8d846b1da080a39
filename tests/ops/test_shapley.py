"""The fused AGM kernels (kernels/shapley.py) and their ops against their torch paths, forward and backward.

On a GPU the kernels run compiled on CUDA tensors; without one they run in Triton's interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1 before triton is imported). The shape list covers every B in {1, 7, 64, 300},
C in {1, 2, 10, 101, 1030}, M in {2, 3, 5, 8} and dtype, including several blocks of samples and several chunks of
classes, without the full cartesian product.
"""

import math

import pytest
import torch
from agm_fast.kernels import shapley as k

from agm_fast import functional
from agm_fast.coalitions import shapley_weights, subset_masks
from agm_fast.ops.shapley import (
    shapley_bwd_op,
    shapley_combine_bwd_op,
    shapley_combine_op,
    shapley_outputs_torch,
    shapley_scores_op,
    shapley_scores_torch,
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# The kernels run on the GPU when there is one, else in Triton's interpreter on CPU tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (B, C, M, dtype)
CASES = [
    (1, 1, 2, F32),
    (7, 2, 3, F32),
    (64, 10, 5, F32),
    (300, 101, 2, F32),
    (7, 1030, 3, F32),
    (1, 10, 8, F32),
    (300, 10, 3, BF16),
    (64, 101, 2, F16),
    (7, 1030, 2, BF16),
    (1, 2, 8, F16),
    (64, 1, 5, BF16),
    (7, 101, 5, F16),
]
LOWP_ATOL = {BF16: 1e-2, F16: 1e-3}


def _case_id(case):
    B, C, M, dtype = case
    return f"B{B}-C{C}-M{M}-{str(dtype).split('.')[-1]}"


def _inputs(B, C, M, dtype, count_shape=(), device=DEVICE):
    masks = subset_masks(M)
    W = shapley_weights(M, masks, torch.float32)
    F = torch.randn(len(masks), B, C).to(dtype)
    labels = torch.randint(0, C, (B,))
    # Running means of the size of real scores: c = exp(alpha * (rbar - r)) stays moderate, as in training.
    running = 2 + 0.3 * torch.randn(M)
    count = torch.full(count_shape, 4.0)
    prev = torch.rand(M) + 0.5
    return tuple(t.to(device) for t in (F, W, labels, running, count, prev))


def _nan_out(M, B, C, dtype, count_shape):
    nan = dict(fill_value=float("nan"), device=DEVICE)
    return (
        torch.full((M, B, C), dtype=dtype, **nan),
        torch.full((M,), **nan),
        torch.full((M,), **nan),
        torch.full(count_shape, **nan),
        torch.full((M,), **nan),
    )


def _truth(F, W, labels, running, count, prev, alpha, cap, in_window, hold_last):
    """The AGM step in float64 (classification), from the same (possibly low-precision) inputs."""
    psi = torch.einsum("ms,sbc->mbc", W.double(), F.double())
    logp = torch.log_softmax(psi, -1).gather(-1, labels.view(1, -1, 1).expand(psi.shape[0], -1, 1)).squeeze(-1)
    s = (-logp.clamp(min=math.log(1e-8))).mean(1)
    S, t, M = running.double(), count.double(), s.shape[0]
    diff = torch.exp((S.sum() - S) / (M - 1) - S) - torch.exp((s.sum() - s) / (M - 1) - s)
    if cap is not None:
        diff = diff.clamp(max=cap)
    coeffs = torch.exp(alpha * diff)
    if not in_window:
        coeffs = prev.double() if hold_last else torch.ones_like(coeffs)
    return psi, s, S * t / (t + 1) + s / (t + 1), t + 1, coeffs


def _assert_lowp(got, lowp, truth, dtype, what):
    """flash-attention's rule: max error at most twice the reference's own error in ``dtype``, plus a small atol.

    The atol is LOWP_ATOL plus one unit in the last place of the largest value: Triton's interpreter converts float32
    to bfloat16 by truncation (the GPU rounds to nearest), so on CPU a rounded output may be one ulp off.
    """
    truth = truth.double()
    err = (got.double() - truth).abs().max().item()
    own = (lowp.double() - truth).abs().max().item()
    atol = LOWP_ATOL[dtype] + torch.finfo(dtype).eps * truth.abs().max().item()
    assert err <= 2 * own + atol, f"{what}: error {err:.3g} > 2 * {own:.3g} + {atol:.3g}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_scores_kernel_matches_reference(case):
    B, C, M, dtype = case
    count_shape = () if B % 2 else (1,)
    F, W, labels, running, count, prev = _inputs(B, C, M, dtype, count_shape)
    args = (F, W, labels, running, count, prev, 1.5, 10.0, True, False)
    out = _nan_out(M, B, C, dtype, count_shape)
    got = k.shapley_scores_fwd(*args, False, out=out)
    assert all(g is o for g, o in zip(got, out))
    want = shapley_scores_torch(*args)
    names = ("psi", "scores", "running_new", "count_new", "coeffs")
    assert got[3].shape == count.shape
    if dtype == F32:
        for name, g, w in zip(names, got, want):
            torch.testing.assert_close(g, w.reshape(g.shape), msg=lambda m: f"{name}: {m}")
    else:
        truth = _truth(*args)
        for name, g, w, t in zip(names, got, want, truth):
            assert not g.isnan().any(), f"{name} has unwritten (NaN) elements"
            _assert_lowp(g, w.reshape(g.shape), t.reshape(g.shape), dtype, name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_kernels_match_reference(case):
    B, C, M, dtype = case
    masks = subset_masks(M)
    W = shapley_weights(M, masks, torch.float32).to(DEVICE)
    dpsi = torch.randn(M, B, C, device=DEVICE).to(dtype)
    g = torch.randn(B, C, device=DEVICE).to(dtype)
    coeffs = torch.rand(M, device=DEVICE) + 0.5
    nan_dF = torch.full((len(masks), B, C), float("nan"), dtype=dtype, device=DEVICE)
    dF = k.shapley_bwd(dpsi, W, dtype, out=nan_dF.clone())
    dF_comb = k.shapley_combine_bwd(g, W, coeffs, out=nan_dF.clone())
    want = torch.einsum("ms,mbc->sbc", W, dpsi.float()).to(dtype)
    want_comb = ((coeffs @ W).view(-1, 1, 1) * g.float()).to(dtype)
    if dtype == F32:
        torch.testing.assert_close(dF, want)
        torch.testing.assert_close(dF_comb, want_comb)
    else:
        truth = torch.einsum("ms,mbc->sbc", W.double(), dpsi.double())
        truth_comb = (coeffs.double() @ W.double()).view(-1, 1, 1) * g.double()
        _assert_lowp(dF, want, truth, dtype, "dF")
        _assert_lowp(dF_comb, want_comb, truth_comb, dtype, "dF (combine)")


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[10]], ids=_case_id)
def test_ops_forward_and_gradients_match_torch_backend(case, monkeypatch):
    B, C, M, dtype = case
    F, W, labels, running, count, prev = _inputs(B, C, M, dtype)
    coeffs = torch.rand(M, device=DEVICE) + 0.5
    dpsi = torch.randn(M, B, C, device=DEVICE).to(dtype)
    dout = torch.randn(B, C, device=DEVICE).to(dtype)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("AGM_FAST_BACKEND", backend)
        Fg = F.clone().requires_grad_(True)
        outs = shapley_scores_op(Fg, W, labels, running, count, prev, 2.5, None, True, False, False)
        (dF_psi,) = torch.autograd.grad(outs[0], Fg, dpsi)
        combined = shapley_combine_op(Fg, W, coeffs, len(subset_masks(M)) - 1)
        (dF_comb,) = torch.autograd.grad(combined, Fg, dout)
        results[backend] = [o.detach() for o in outs] + [combined.detach(), dF_psi, dF_comb]
    tol = {} if dtype == F32 else dict(atol=2e-2, rtol=2e-2)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(results["triton"][5], F[-1])


@pytest.mark.parametrize("in_window,hold_last", [(False, False), (False, True)])
def test_outside_window(in_window, hold_last):
    F, W, labels, running, count, prev = _inputs(7, 10, 3, F32)
    args = (F, W, labels, running, count, prev, 1.5, None, in_window, hold_last)
    got = k.shapley_scores_fwd(*args, False)
    want = shapley_scores_torch(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(got[4], prev if hold_last else torch.ones(3, device=DEVICE))


# Under the interpreter numpy warns about the inf / NaN arithmetic that this test is about.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cap_bounds_the_exponent():
    F, W, labels, running, count, prev = _inputs(64, 10, 3, F32)
    running = torch.tensor([0.0, 0.0, 8.0], device=DEVICE)
    for cap in (0.05, None):
        args = (F, W, labels, running, count, prev, 3.0, cap, True, False)
        got = k.shapley_scores_fwd(*args, False)
        for g, w in zip(got, shapley_scores_torch(*args)):
            torch.testing.assert_close(g, w)
    capped = k.shapley_scores_fwd(F, W, labels, running, count, prev, 3.0, 0.05, True, False, False)[4]
    assert capped.max() <= math.exp(3.0 * 0.05) * (1 + 1e-6)


@pytest.mark.parametrize("target_shape", ["B", "BC"])
def test_regression_scores(target_shape):
    B, C, M = 300, 3, 3
    F, W, _, running, count, prev = _inputs(B, C, M, F32)
    y = torch.randn((B,) if target_shape == "B" else (B, C), device=DEVICE)
    args = (F, W, y, running, count, prev, 1.0, 10.0, True, False)
    got = k.shapley_scores_fwd(*args, True, out=_nan_out(M, B, C, F32, ()))
    want = shapley_scores_torch(*args, task="regression")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# Under the interpreter numpy warns about the inf / NaN arithmetic that this test is about.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_logits_leave_state_unchanged():
    F, W, labels, running, count, prev = _inputs(64, 10, 3, F32)
    F[2, 5, 3] = float("inf")
    F[0, 9, 0] = float("nan")
    args = (F, W, labels, running, count, prev, 1.5, 10.0, True, False)
    got = k.shapley_scores_fwd(*args, False)
    want = shapley_scores_torch(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)
    assert got[1].isnan().all() and got[4].isnan().all()
    torch.testing.assert_close(got[2], running)
    torch.testing.assert_close(got[3], count)


# C = 1030 has several chunks of classes; C and C + 5 fall on padding columns of the last chunk.
@pytest.mark.parametrize("C", [10, 1030])
def test_out_of_range_label_gives_nan_without_reading_out_of_bounds(C, monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", "triton")
    F, W, labels, running, count, prev = _inputs(7, C, 2, F32)
    for bad in (C, C + 5, -1, 1 << 40):
        y = labels.clone()
        y[3] = bad
        psi, scores, running_new, count_new, coeffs = shapley_scores_op(
            F, W, y, running, count, prev, 1.5, 10.0, True, False, False
        )
        assert scores.isnan().all() and coeffs.isnan().all()
        torch.testing.assert_close(running_new, running)
        torch.testing.assert_close(count_new, count)
        torch.testing.assert_close(psi, shapley_outputs_torch(F, W))


def test_strided_inputs():
    B, C, M = 64, 10, 3
    _, W, _, _, count, _ = _inputs(B, C, M, F32)
    # F [S, B, C] as a transposed, sliced view; W, labels and the state with non-unit strides.
    F = torch.randn(C, 7, 2 * B, device=DEVICE)[:, :, ::2].permute(1, 2, 0)
    W = W.t().contiguous().t()
    labels = torch.randint(0, C, (2 * B,), device=DEVICE)[::2]
    running = 2 + torch.rand(2 * M, device=DEVICE)[::2]
    prev = torch.rand(2 * M, device=DEVICE)[1::2]
    assert not F.is_contiguous() and not W.is_contiguous()
    args = (F, W, labels, running, count, prev, 1.5, 10.0, True, False)
    for g, w in zip(k.shapley_scores_fwd(*args, False), shapley_scores_torch(*args)):
        torch.testing.assert_close(g, w)
    dpsi = torch.randn(C, M, B, device=DEVICE).permute(1, 2, 0)
    torch.testing.assert_close(k.shapley_bwd(dpsi, W, F32), torch.einsum("ms,mbc->sbc", W, dpsi))
    g = torch.randn(C, B, device=DEVICE).t()
    coeffs = torch.rand(2 * M, device=DEVICE)[::2]
    torch.testing.assert_close(k.shapley_combine_bwd(g, W, coeffs), (coeffs @ W).view(-1, 1, 1) * g)


def test_reduction_is_deterministic():
    F, W, labels, running, count, prev = _inputs(300, 10, 2, F32)
    args = (F, W, labels, running, count, prev, 1.5, 10.0, True, False, False)
    first = k.shapley_scores_fwd(*args)
    second = k.shapley_scores_fwd(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", backend)
    F, W, labels, running, count, prev = _inputs(7, 10, 2, F32)
    coeffs = torch.rand(2, device=DEVICE) + 0.5
    F.requires_grad_(True)
    torch.library.opcheck(shapley_scores_op, (F, W, labels, running, count, prev, 1.5, 10.0, True, False, False))
    torch.library.opcheck(shapley_combine_op, (F, W, coeffs, 2))
    dpsi = torch.randn(2, 7, 10, device=DEVICE)
    torch.library.opcheck(shapley_bwd_op, (dpsi, W, torch.empty(0, dtype=BF16, device=DEVICE)))
    torch.library.opcheck(shapley_combine_bwd_op, (torch.randn(7, 10, device=DEVICE), W, coeffs))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_step_matches_eager(backend, monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", backend)
    M, B, C = 3, 7, 10
    F0, W, labels, running, count, prev = _inputs(B, C, M, F32)
    full = len(subset_masks(M)) - 1

    def step(F):
        psi, scores, running_new, count_new, coeffs = functional.shapley_scores(
            F, W, labels, running, count, prev, 1.5, 10.0
        )
        out = functional.shapley_combine(F, W, coeffs, full)
        loss = torch.nn.functional.cross_entropy(out, labels) + 0.1 * psi.square().mean()
        return loss, scores, running_new, coeffs

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        F = F0.clone().requires_grad_(True)
        loss, *state = fn(F)
        loss.backward()
        results.append([loss.detach(), *state, F.grad])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    F, W, labels, running, count, prev = _inputs(7, 10, 2, F32, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        shapley_scores_op(F, W, labels, running, count, prev, 1.5, 10.0, True, False, False)


def test_functional_validation():
    # CPU tensors: their label range is checked eagerly.
    F, W, labels, running, count, prev = _inputs(7, 10, 3, F32, device="cpu")

    def call(**kw):
        args = dict(F=F, W=W, labels=labels, running=running, count=count, prev_coeffs=prev, alpha=1.5)
        args.update(kw)
        return functional.shapley_scores(**args)

    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 10\)"):
        call(labels=torch.full((7,), 10))
    with pytest.raises(TypeError, match="labels: expected int64"):
        call(labels=labels.int())
    with pytest.raises(ValueError, match="labels: expected shape"):
        call(labels=labels[:5])
    with pytest.raises(ValueError, match=r"F: expected subset logits \[S, B, C\]"):
        call(F=F[0])
    with pytest.raises(TypeError, match="F: expected floating-point"):
        call(F=F.long())
    with pytest.raises(ValueError, match=r"W: expected Shapley weights \[M, 7\]"):
        call(W=W[:, :5])
    with pytest.raises(ValueError, match="W: expected at least two modalities"):
        call(W=W[:1])
    with pytest.raises(ValueError, match=r"running: expected shape \[3\]"):
        call(running=running[:2])
    with pytest.raises(ValueError, match="count: expected a step count"):
        call(count=torch.zeros(2))
    with pytest.raises(ValueError, match="labels: on meta"):
        call(labels=labels.to("meta"))
    with pytest.raises(ValueError, match="W: on meta"):
        call(W=W.to("meta"))
    with pytest.raises(ValueError, match="cap: expected a number or None, got NaN"):
        call(cap=float("nan"))
    with pytest.raises(TypeError, match="cap: expected a Python float or None"):
        call(cap="10")
    with pytest.raises(ValueError, match="task:"):
        call(task="ranking")
    with pytest.raises(ValueError, match="labels: expected regression targets"):
        call(labels=torch.randn(7, 3), task="regression")
    with pytest.raises(ValueError, match="full_index"):
        functional.shapley_combine(F, W, prev, 7)
    with pytest.raises(ValueError, match=r"coeffs: expected shape \[3\]"):
        functional.shapley_combine(F, W, prev[:2], 6)
    psi, scores, *_ = call()
    torch.testing.assert_close(scores, shapley_scores_torch(F, W, labels, running, count, prev, 1.5, 10.0, True)[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("regression,in_window,hold_last", [(False, True, False), (False, False, True),
                                                           (True, True, False)])
def test_eager_functions_equal_the_custom_ops_bitwise(backend, regression, in_window, hold_last, monkeypatch):
    # AGM's eager path (agm_fast.ops.shapley_eager) runs the custom ops' own bodies through autograd Functions.
    from agm_fast.ops import shapley_eager

    monkeypatch.setenv("AGM_FAST_BACKEND", backend)
    B, C, M = 7, 10, 3
    F, W, labels, running, count, prev = _inputs(B, C, M, F32)
    if regression:
        labels = torch.randn(B, C, device=DEVICE)
    dpsi, dout = torch.randn(M, B, C, device=DEVICE), torch.randn(B, C, device=DEVICE)
    results = []
    for scores, combine in ((shapley_scores_op, shapley_combine_op), (shapley_eager.scores, shapley_eager.combine)):
        Fg = F.clone().requires_grad_(True)
        outs = scores(Fg, W, labels, running, count, prev, 1.5, 0.5, in_window, hold_last, regression)
        combined = combine(Fg, W, outs[4], F.shape[0] - 1)
        (dF,) = torch.autograd.grad([outs[0], combined], Fg, [dpsi, dout])
        assert scores is shapley_scores_op or not any(o.requires_grad for o in outs[1:])
        results.append([o.detach() for o in outs] + [combined.detach(), dF])
    for got, want in zip(*results):
        assert got.shape == want.shape and torch.equal(got, want)


EXT_CASES = [(1, 1, 2, F32, True, None), (7, 10, 3, F32, True, 0.5), (64, 101, 5, F32, False, 10.0),
             (5, 3, 8, F32, True, 10.0), (7, 10, 3, torch.float64, True, 10.0)]


@pytest.mark.skipif(not __import__("agm_fast._backend")._backend.has_ext(), reason="needs the compiled extension")
@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("in_window,hold_last", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("case", EXT_CASES, ids=[f"B{c[0]}-C{c[1]}-M{c[2]}-{c[3]}-{c[5]}" for c in EXT_CASES])
def test_cpu_kernel_matches_the_torch_path(case, regression, in_window, hold_last):
    # The extension's CPU kernel (agm_fast::_shapley_scores_impl) against shapley_scores_torch: psi is the same float32
    # matrix product (bitwise); the scores and what follows from them agree to float32 rounding (other sum orders).
    B, C, M, dtype, count_is_0d, cap = case
    F, W, labels, running, count, prev = _inputs(B, C, M, dtype, () if count_is_0d else (1,), device="cpu")
    if regression:
        labels = torch.randn(B, C) if B % 2 else torch.randn(B)
    args = (F, W, labels, running, count, prev, 1.5, cap, in_window, hold_last, regression)
    got = torch.ops.agm_fast._shapley_scores_impl(*args)
    want = shapley_scores_torch(*args[:-1], "regression" if regression else "classification")
    assert torch.equal(got[0], want[0]) and got[0].dtype == dtype
    for g, w in zip(got[1:], want[1:]):
        assert g.shape == w.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-6)
    # A non-finite logit: a non-finite score, NaN coefficients, the running state unchanged.
    F[1, 0, 0] = float("inf") if regression else float("-inf")
    got = torch.ops.agm_fast._shapley_scores_impl(*((F,) + args[1:]))
    want = shapley_scores_torch(F, *args[1:-1], "regression" if regression else "classification")
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-6, equal_nan=True)
    assert not torch.isfinite(got[1]).all() and torch.isnan(got[4]).all()
    assert torch.equal(got[2], running) and torch.equal(got[3], count)


@pytest.mark.skipif(not __import__("agm_fast._backend")._backend.has_ext(), reason="needs the compiled extension")
def test_cpu_kernel_is_what_the_op_runs_on_cpu(monkeypatch):
    F, W, labels, running, count, prev = _inputs(7, 10, 3, F32, device="cpu")
    args = (F, W, labels, running, count, prev, 1.5, 10.0, True, False, False)
    monkeypatch.delenv("AGM_FAST_BACKEND", raising=False)
    default = shapley_scores_op(*args)
    assert all(torch.equal(a, b) for a, b in zip(default, torch.ops.agm_fast._shapley_scores_impl(*args)))
    monkeypatch.setenv("AGM_FAST_BACKEND", "torch")
    forced = shapley_scores_op(*args)
    assert all(torch.equal(a, b) for a, b in zip(forced, shapley_scores_torch(*args[:-1])))
