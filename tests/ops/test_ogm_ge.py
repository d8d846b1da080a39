"""agm_fast::ogm_ge_: in-place OGM / OGM-GE gradient scaling with Philox noise.

The compiled extension is checked against the pure-PyTorch path (exactly without noise, to float rounding with
noise), the torch path's Philox against the published known-answer vectors and a plain-Python implementation, and the
noise statistically (mean, std, independence).
"""

import contextlib
import math
import platform
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

from agm_fast import _backend, functional, ops
from agm_fast.ops.ogm_ge import philox4x32, philox_normal

EXT_REASON = (
    f"agm_fast._C is not built ({_backend.backend_info()['ext_error']}); "
    "build it with `pip install --no-build-isolation -e .`"
)
needs_ext = pytest.mark.skipif(not _backend.has_ext(), reason=EXT_REASON)
BACKENDS = ["torch", pytest.param("ext", marks=needs_ext)]

MASK32 = 0xFFFFFFFF


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("AGM_FAST_BACKEND", request.param)
    return request.param


def run(name, monkeypatch, grads, group, coeffs, noise, seed=0, offset=0):
    """functional.ogm_ge_ on clones of ``grads`` with the backend ``name`` forced; returns the clones."""
    monkeypatch.setenv("AGM_FAST_BACKEND", name)
    out = [g.clone() for g in grads]
    functional.ogm_ge_(out, group, coeffs, noise=noise, seed=seed, offset=offset)
    return out


def random_grads(num, sizes, dtypes, seed):
    """``num`` tensors with sizes and dtypes drawn from the lists, some of them 2-D."""
    rng = random.Random(seed)
    grads = []
    for _ in range(num):
        n = rng.choice(sizes)
        shape = (n,) if n % 7 != 0 or rng.random() < 0.5 else (7, n // 7)
        g = (torch.randn(shape) * rng.uniform(0.1, 3.0) + rng.uniform(-1, 1)).to(rng.choice(dtypes))
        grads.append(g)
    return grads


# Philox4x32-10


def _philox_python(ctr, key):
    """Philox4x32-10 with Python ints (the definition, for checking the vectorised torch path)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return [c0, c1, c2, c3]


def test_philox_known_answers():
    # Known-answer vectors of Random123 (philox4x32, 10 rounds).
    cases = [
        ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([MASK32] * 4, (MASK32, MASK32), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            (0xA4093822, 0x299F31D0),
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for ctr, key, want in cases:
        assert philox4x32(torch.tensor([ctr]), key)[0].tolist() == want
        assert _philox_python(ctr, key) == want


def test_philox_ref_matches_python_ints():
    rng = random.Random(1)
    key = (rng.getrandbits(32), rng.getrandbits(32))
    ctrs = [[rng.getrandbits(32) for _ in range(4)] for _ in range(200)] + [[MASK32, 0, MASK32, 0]]
    got = philox4x32(torch.tensor(ctrs), key).tolist()
    assert got == [_philox_python(c, key) for c in ctrs]


def test_philox_normal_by_hand():
    # Counter (q, index, offset lo, offset hi), key (seed lo, seed hi); Box-Muller on 24-bit uniforms, in float64.
    seed, offset, index, numel = (7 << 32) | 123, (5 << 32) | 9, 3, 10
    want = []
    for q in range((numel + 3) // 4):
        x = _philox_python([q, index, offset & MASK32, offset >> 32], (seed & MASK32, seed >> 32))
        for a, b in ((x[0], x[1]), (x[2], x[3])):
            r = math.sqrt(-2 * math.log(((a >> 8) + 1) * 2.0**-24))
            want += [r * math.cos(2 * math.pi * (b >> 8) * 2.0**-24), r * math.sin(2 * math.pi * (b >> 8) * 2.0**-24)]
    got = philox_normal(numel, seed, offset, index)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    torch.testing.assert_close(got.double(), torch.tensor(want[:numel], dtype=torch.float64), rtol=1e-5, atol=1e-5)


# The extension against the torch path


@needs_ext
@pytest.mark.parametrize("num", [1, 2, 13, 60])
def test_ogm_ext_equals_torch_path_exactly(num, monkeypatch):
    grads = random_grads(num, [1, 7, 1000, 65537], [torch.float32, torch.float16, torch.bfloat16], seed=num)
    group = [i % 3 for i in range(num)]
    coeffs = torch.tensor([0.37, 1.0, 2.5])[: max(group) + 1].contiguous()
    want = [g.float() * coeffs[m] for g, m in zip(grads, group)]
    got_ext = run("ext", monkeypatch, grads, group, coeffs, noise=False)
    got_ref = run("torch", monkeypatch, grads, group, coeffs, noise=False)
    for g, e, r, w in zip(grads, got_ext, got_ref, want):
        assert e.dtype == g.dtype and e.shape == g.shape
        torch.testing.assert_close(e, r, rtol=0, atol=0)
        torch.testing.assert_close(e, w.to(g.dtype), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ge_ext_matches_torch_path(dtype, monkeypatch):
    grads = random_grads(9, [1, 7, 1000, 65537], [dtype], seed=5)
    group = [0, 1, 1, 0, 1, 0, 0, 1, 1]
    coeffs = torch.tensor([0.6, 1.0])
    got_ext = run("ext", monkeypatch, grads, group, coeffs, noise=True, seed=11, offset=4)
    got_ref = run("torch", monkeypatch, grads, group, coeffs, noise=True, seed=11, offset=4)
    # Both compute in float32 and round once to the gradient dtype: at most one rounding step of it apart.
    rtol = {torch.float32: 1.3e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    for e, r in zip(got_ext, got_ref):
        torch.testing.assert_close(e.float(), r.float(), rtol=rtol, atol=1e-5)


@needs_ext
def test_ext_noise_equals_torch_path_noise(monkeypatch):
    # k = 0 on constant tensors (std 0) leaves 1e-8 * z: the raw noise of every tensor index.
    grads = [torch.full((n,), 2.0) for n in (1, 7, 1000, 65537)]
    coeffs = torch.zeros(1)
    got = run("ext", monkeypatch, grads, [0] * 4, coeffs, noise=True, seed=2**40 + 3, offset=2**33 + 1)
    for i, g in enumerate(got):
        z = philox_normal(g.numel(), 2**40 + 3, 2**33 + 1, i)
        torch.testing.assert_close(g / 1e-8, z, rtol=1e-5, atol=1e-5)


def _capability_or_skip(cap, monkeypatch):
    """Force the CPU noise pass of ``cap`` (AGM_FAST_CPU_CAPABILITY); skip when this CPU does not run it."""
    monkeypatch.setenv("AGM_FAST_CPU_CAPABILITY", cap)
    got = _backend.get_ext().cpu_capability()
    if got != cap:
        pytest.skip(f"this CPU does not run the {cap} noise pass (it would use {got})")


@needs_ext
@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_ext_bitwise_equals_torch_path_every_isa(cap, dtype, threads, monkeypatch):
    # The SIMD noise pass against the per-element formula of the pure-PyTorch path (the same float32 operations):
    # lengths around the vector steps (96 elements with AVX2 and AVX-512, blocks of 960), starts inside a counter's
    # four elements, a given sigma (so that both compute the same k g + sigma z). Bitwise, every dtype.
    _capability_or_skip(cap, monkeypatch)
    sizes = [1, 2, 3, 5, 95, 96, 97, 191, 959, 960, 961, 1023, 1921, 4099, 20011]
    starts = [0, 1, 2, 3, 5, 7, 0, 1, 6, 9, 2, 3, 1001, 0, 65537]
    torch.manual_seed(len(sizes) + threads)
    grads = [(torch.randn(n) * 3 + 0.5).to(dtype) for n in sizes]
    group = [i % 2 for i in range(len(sizes))]
    coeffs = torch.tensor([0.7, 1.3])
    sig = torch.rand(len(sizes)) * 2 + 0.1
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = [g.clone() for g in grads]
        monkeypatch.setenv("AGM_FAST_BACKEND", "ext")
        functional.ogm_ge_(got, group, coeffs, seed=2**40 + 9, offset=2**33 + 3, starts=starts, sigma=sig)
    finally:
        torch.set_num_threads(old)
    want = [g.clone() for g in grads]
    monkeypatch.setenv("AGM_FAST_BACKEND", "torch")
    functional.ogm_ge_(want, group, coeffs, seed=2**40 + 9, offset=2**33 + 3, starts=starts, sigma=sig)
    for n, a, b in zip(sizes, got, want):
        assert torch.equal(a, b), f"{n} elements: {(a.float() - b.float()).abs().max().item()} off"


@needs_ext
@pytest.mark.parametrize("cap", ["avx2", "avx512"])
def test_simd_noise_equals_portable_noise(cap, monkeypatch):
    # Computed std as well: the SIMD pass and the portable loop give bitwise the same result.
    grads = random_grads(12, [1, 7, 97, 1000, 65537, 100003], [torch.float32, torch.bfloat16], seed=7)
    group = [i % 2 for i in range(12)]
    coeffs = torch.tensor([0.8, 1.0])
    monkeypatch.setenv("AGM_FAST_CPU_CAPABILITY", "default")
    want = run("ext", monkeypatch, grads, group, coeffs, noise=True, seed=4, offset=9)
    _capability_or_skip(cap, monkeypatch)
    got = run("ext", monkeypatch, grads, group, coeffs, noise=True, seed=4, offset=9)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_ext
def test_cpu_capability_switch_checks_its_value(monkeypatch):
    monkeypatch.setenv("AGM_FAST_CPU_CAPABILITY", "sse9")
    with pytest.raises(RuntimeError, match="AGM_FAST_CPU_CAPABILITY: expected default, avx2 or avx512, got 'sse9'"):
        run("ext", monkeypatch, [torch.randn(10)], [0], torch.ones(1), noise=True)


@needs_ext
def test_extension_has_no_fused_multiply_add():
    # The noise is defined with separately rounded multiplies and adds; -ffp-contract=off keeps the compiler from
    # fusing them where the ISA has FMA (the AVX-512 pass, which this machine may not be able to run).
    objdump = shutil.which("objdump")
    if objdump is None or sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("needs objdump on x86-64 Linux")
    so = _backend.get_ext().__file__
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", so], capture_output=True, text=True, check=True).stdout
    assert "noisy_scale" in asm and "avx512" in asm.lower()
    fused = re.findall(r"\bv?f(?:n?m(?:add|sub)|maddsub|msubadd)\d+[a-z]+\b", asm)
    assert not fused, f"fused multiply-adds in {so}: {sorted(set(fused))[:5]}"


# The noise: statistics, keys, reproducibility


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_noise_statistics(backend):
    n = 1 << 17
    base = [torch.randn(n) * 2.0 + 3.0, torch.rand(n) * 5.0]
    sigma = [g.double().std().item() + 1e-8 for g in base]
    grads = [g.clone() for g in base]
    functional.ogm_ge_(grads, [0, 0], torch.zeros(1), noise=True, seed=5, offset=1)
    z = [g.double() / s for g, s in zip(grads, sigma)]
    for zi in z:
        # mean 0 and std 1 within 5 standard errors
        assert abs(zi.mean().item()) < 5 / math.sqrt(n)
        assert abs(zi.std().item() - 1) < 5 / math.sqrt(2 * n)
        # Gaussian: the CDF at a few points
        for t in (-2.0, -1.0, 0.0, 0.5, 1.5):
            p = torch.special.ndtr(torch.tensor(t, dtype=torch.float64)).item()
            assert abs((zi <= t).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
        # neighbours (same Box-Muller pair, same counter, next counter) are uncorrelated
        for lag in (1, 2, 3, 4, 5):
            assert abs(torch.corrcoef(torch.stack([zi[:-lag], zi[lag:]]))[0, 1].item()) < 5 / math.sqrt(n)
    # different tensors are uncorrelated
    assert abs(torch.corrcoef(torch.stack(z))[0, 1].item()) < 5 / math.sqrt(n)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_noise_keys(backend):
    g = torch.zeros(4099)
    coeffs = torch.ones(1)

    def noise(seed, offset, index=0):
        grads = [torch.zeros(1) for _ in range(index)] + [g.clone()]
        functional.ogm_ge_(grads, [0] * len(grads), coeffs, noise=True, seed=seed, offset=offset)
        return grads[-1]

    first = noise(3, 8)
    assert torch.equal(first, noise(3, 8))
    for other in (noise(3, 9), noise(4, 8), noise(3, 8, index=1), noise(3, 8 + 2**32), noise(3 + 2**32, 8)):
        assert (other != first).float().mean().item() > 0.99


@needs_ext
def test_ext_bitwise_reproducible_any_thread_count(monkeypatch):
    grads = random_grads(12, [7, 1000, 65537, 100003], [torch.float32, torch.bfloat16], seed=3)
    group = [i % 2 for i in range(12)]
    coeffs = torch.tensor([0.8, 1.0])
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            outs.append(run("ext", monkeypatch, grads, group, coeffs, noise=True, seed=1, offset=2))
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(*outs):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_one_element_tensor(backend):
    # The unbiased std of one element is undefined; it is taken as 0, so sigma = 1e-8.
    g = torch.tensor([[0.75]])
    grads = [torch.ones(3), g.clone()]
    functional.ogm_ge_(grads, [0, 1], torch.tensor([1.0, 2.0]), noise=True, seed=9, offset=2)
    z = philox_normal(1, 9, 2, 1)
    torch.testing.assert_close(grads[1], (2.0 * g + 1e-8 * z).view(1, 1))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_stays_non_finite(backend, bad):
    for noise in (False, True):
        g = torch.randn(1001)
        g[17] = bad
        grads = [g, torch.tensor([bad]), torch.randn(5)]
        functional.ogm_ge_(grads, [0, 0, 1], torch.tensor([0.5, 1.0]), noise=noise, seed=0, offset=0)
        assert not torch.isfinite(grads[0][17]) and not torch.isfinite(grads[1]).any()
        assert torch.isfinite(grads[2]).all()
        if noise:
            # a NaN std spreads NaN over the whole tensor
            assert torch.isnan(grads[0]).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_statistics_in_float32(backend, dtype):
    # Mean 300 over 65537 elements: a float16 sum would overflow (max 65504); in float32 the std is exact enough.
    g = (300.0 + torch.randn(65537)).to(dtype)
    sigma = g.double().std().item() + 1e-8
    grads = [g.clone()]
    functional.ogm_ge_(grads, [0], torch.zeros(1), noise=True, seed=4, offset=0)
    want = sigma * philox_normal(g.numel(), 4, 0, 0).double()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grads[0].double(), want, rtol=eps, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_std_is_numerically_stable(backend):
    # Mean 1e4, std 1e-2: the sum of squares minus the square of the sum would lose every digit in float32.
    g = 1e4 + 1e-2 * torch.randn(100003)
    sigma = g.double().std().item() + 1e-8
    grads = [g.clone()]
    functional.ogm_ge_(grads, [0], torch.zeros(1), noise=True, seed=6, offset=0)
    z = philox_normal(g.numel(), 6, 0, 0).double()
    torch.testing.assert_close(grads[0].double(), sigma * z, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_coefficients_read_from_tensor_memory(backend, monkeypatch):
    g = torch.randn(257)
    coeffs = torch.tensor([0.5, 1.0])
    # No host read of any tensor value on the hot path.
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host sync in ogm_ge_"))
    first = [g.clone()]
    functional.ogm_ge_(first, [1], coeffs, noise=False)
    coeffs[1] = 3.0
    second = [g.clone()]
    functional.ogm_ge_(second, [1], coeffs, noise=False)
    monkeypatch.undo()
    torch.testing.assert_close(first[0], g, rtol=0, atol=0)
    torch.testing.assert_close(second[0], 3.0 * g, rtol=0, atol=0)


# Errors


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_errors(backend):
    g = [torch.randn(4), torch.randn(3)]
    c = torch.ones(2)
    cases = [
        (ValueError, "coeffs", (g, [0, 1], torch.ones(3))),
        (ValueError, "coeffs", (g, [0, 0], c)),
        (ValueError, "one device", ([g[0], torch.randn(3, device="meta")], [0, 1], c)),
        (TypeError, "float32, float16 or bfloat16", ([g[0], torch.ones(3, dtype=torch.int64)], [0, 1], c)),
        (TypeError, "float32, float16 or bfloat16", ([g[0], torch.ones(3, dtype=torch.float64)], [0, 1], c)),
        (ValueError, "contiguous", ([g[0], torch.randn(3, 4).t()], [0, 1], c)),
        (ValueError, "group", (g, [0], c)),
        (ValueError, "group\\[1\\]", (g, [1, -1], c)),
        (ValueError, "at least one", ([], [], c)),
        (TypeError, "coeffs", (g, [0, 1], torch.ones(2, dtype=torch.float64))),
        (ValueError, "coeffs", (g, [0, 1], torch.ones(2, device="meta"))),
        (TypeError, "grads\\[1\\]", ([g[0], None], [0, 1], c)),
        (TypeError, "grads", (g[0], [0], c)),
        (TypeError, "group\\[0\\]", (g, [0.0, 1], c)),
    ]
    for exc, match, args in cases:
        with pytest.raises(exc, match=match):
            functional.ogm_ge_(*args)
    with pytest.raises(ValueError, match="seed"):
        functional.ogm_ge_(g, [0, 1], c, seed=-1)
    with pytest.raises(ValueError, match="offset"):
        functional.ogm_ge_(g, [0, 1], c, offset=2**63)
    with pytest.raises(TypeError, match="noise"):
        functional.ogm_ge_(g, [0, 1], c, noise=1)
    with pytest.raises(ValueError, match="starts"):
        functional.ogm_ge_(g, [0, 1], c, starts=[0])
    with pytest.raises(ValueError, match="starts\\[1\\]"):
        functional.ogm_ge_(g, [0, 1], c, starts=[0, -4])
    with pytest.raises(ValueError, match="starts\\[0\\]"):
        functional.ogm_ge_(g, [0, 1], c, starts=[2**34 - 2, 0])
    with pytest.raises(TypeError, match="starts"):
        functional.ogm_ge_(g, [0, 1], c, starts=3)
    with pytest.raises(ValueError, match="sigma"):
        functional.ogm_ge_(g, [0, 1], c, sigma=torch.ones(3))
    with pytest.raises(ValueError, match="sigma"):
        functional.ogm_ge_(g, [0, 1], c, sigma=torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma"):
        functional.ogm_ge_(g, [0, 1], c, sigma=torch.ones(2, device="meta"))
    with pytest.raises(TypeError, match="sigma"):
        functional.ogm_ge_(g, [0, 1], c, sigma=[1.0, 1.0])
    # the op itself gives the same errors
    with pytest.raises(ValueError, match="coeffs"):
        torch.ops.agm_fast.ogm_ge_(g, [0, 1], torch.ones(3), True, 0, 0)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.agm_fast.ogm_ge_([g[0], torch.randn(3, device="meta")], [0, 1], c, True, 0, 0)
    # 2^34 elements overflow the Philox counter (checked on metadata only)
    with pytest.raises(ValueError, match="2\\^34"):
        functional.ogm_ge_([torch.empty(2**34, device="meta")], [0], torch.ones(1, device="meta"))


# Shards (FSDP): a shard's noise is bitwise the slice of the whole tensor's, with the whole tensor's std.


def _shard_bounds(numel, cuts):
    edges = [0] + sorted(cuts) + [numel]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel,cuts", [(37, [5, 5, 18]), (4103, [1, 2051, 4100]), (20000, [6147, 13001]), (9, [])])
def test_shards_draw_the_slice_of_the_whole_noise(backend, dtype, numel, cuts):
    # Shards cut anywhere (inside a Philox counter's four lanes, empty shards, 1-element shards): applying the op to
    # each shard with its start and the whole tensor's sigma gives bitwise the whole tensor's result.
    torch.manual_seed(numel)
    other = torch.randn(50).to(dtype)
    whole = (torch.randn(numel) * 2 + 0.3).to(dtype)
    coeffs = torch.tensor([0.7, 1.3])
    # The std is given (the extension's own accumulation order is not torch.std's; the sharded std comes from
    # merged moments in any case).
    sig = torch.stack([other.float().std(), whole.float().std()]) + 1e-8
    expect = [other.clone(), whole.clone()]
    functional.ogm_ge_(expect, [0, 1], coeffs, seed=11, offset=5, sigma=sig)
    computed = [other.clone(), whole.clone()]
    functional.ogm_ge_(computed, [0, 1], coeffs, seed=11, offset=5)
    torch.testing.assert_close(computed, expect)
    got = whole.clone()
    for lo, hi in _shard_bounds(numel, cuts):
        shard = got[lo:hi]  # a view: the op writes into got
        o = other.clone()
        functional.ogm_ge_([o, shard], [0, 1], coeffs, seed=11, offset=5, starts=[0, lo], sigma=sig)
        assert torch.equal(o, expect[0])
    assert torch.equal(got, expect[1])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_given_sigma_is_used_as_given(backend):
    g = torch.randn(1000)
    z = philox_normal(1000, 3, 4, 0)
    out = g.clone()
    functional.ogm_ge_([out], [0], torch.tensor([0.5]), seed=3, offset=4, sigma=torch.tensor([0.25]))
    torch.testing.assert_close(out, 0.5 * g + 0.25 * z, rtol=1e-6, atol=1e-6)
    # without noise, sigma is not read
    out = g.clone()
    functional.ogm_ge_([out], [0], torch.tensor([0.5]), noise=False, sigma=torch.tensor([float("nan")]))
    assert torch.equal(out, 0.5 * g)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_tensors_keep_their_index(backend):
    # An empty shard is left alone and the tensors after it draw the noise of their own index.
    a, b = torch.randn(10), torch.randn(12)
    expect = [a.clone(), torch.empty(0), b.clone()]
    functional.ogm_ge_(expect, [0, 1, 1], torch.tensor([1.0, 2.0]), seed=1, offset=2)
    got = [a.clone(), b.clone()]
    functional.ogm_ge_(got, [0, 1], torch.tensor([1.0, 2.0]), seed=1, offset=2)
    assert torch.equal(expect[0], got[0])
    assert not torch.equal(expect[2], got[1])  # index 2, not 1
    z = philox_normal(12, 1, 2, 2)
    torch.testing.assert_close(expect[2], 2.0 * b + (b.std() + 1e-8) * z, rtol=1e-5, atol=1e-5)
    functional.ogm_ge_([torch.empty(0)], [0], torch.ones(1))  # only empty: nothing to do, no error


def test_philox_normal_start_is_a_slice():
    whole = philox_normal(103, 7, 9, 2)
    for start, n in [(0, 103), (1, 10), (3, 1), (4, 99), (50, 53), (102, 1), (40, 0)]:
        assert torch.equal(philox_normal(n, 7, 9, 2, start=start), whole[start : start + n])


@needs_ext
def test_ext_checks_its_arguments():
    with pytest.raises(RuntimeError, match="coeffs must have shape"):
        torch.ops.agm_fast._ogm_ge_impl([torch.randn(3)], [0], torch.ones(2), True, 0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.agm_fast._ogm_ge_impl([torch.randn(3, 4).t()], [0], torch.ones(1), True, 0, 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.agm_fast._ogm_ge_impl([torch.ones(3, dtype=torch.int32)], [0], torch.ones(1), True, 0, 0)
    with pytest.raises(RuntimeError, match="group\\[0\\]"):
        torch.ops.agm_fast._ogm_ge_impl([torch.randn(3)], [-1], torch.ones(1), True, 0, 0)
    with pytest.raises(RuntimeError, match="starts"):
        torch.ops.agm_fast._ogm_ge_impl([torch.randn(3)], [0], torch.ones(1), True, 0, 0, [0, 1])
    with pytest.raises(RuntimeError, match="starts\\[0\\]"):
        torch.ops.agm_fast._ogm_ge_impl([torch.randn(3)], [0], torch.ones(1), True, 0, 0, [-1])
    with pytest.raises(RuntimeError, match="sigma"):
        torch.ops.agm_fast._ogm_ge_impl([torch.randn(3)], [0], torch.ones(1), True, 0, 0, None, torch.ones(2))


# torch.library and torch.compile


def test_schema():
    # The contract other modules rely on. seed and offset are SymInts so that a per-step offset does not recompile.
    assert str(torch.ops.agm_fast.ogm_ge_.default._schema) == (
        "agm_fast::ogm_ge_(Tensor(a!)[] grads, int[] group, Tensor coeffs, bool noise, SymInt seed, SymInt offset, "
        "int[]? starts=None, Tensor? sigma=None) -> ()"
    )
    assert "ogm_ge_" in ops.__all__ and "ogm_ge_" in functional.__all__


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("noise", [False, True])
def test_opcheck(backend, noise):
    grads = [torch.randn(7), torch.randn(3, 5, dtype=torch.bfloat16), torch.randn(1), torch.randn(2, 3).half()]
    args = (grads, [0, 1, 1, 0], torch.tensor([0.5, 2.0]), noise, 1, 2)
    torch.library.opcheck(torch.ops.agm_fast.ogm_ge_.default, args)


def _model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        dict(audio=torch.nn.Linear(4, 8), visual=torch.nn.Linear(3, 8), head=torch.nn.Linear(16, 5))
    )


def _loss(model, xa, xv, y):
    feats = torch.cat([torch.relu(model["audio"](xa)), torch.relu(model["visual"](xv))], dim=1)
    return torch.nn.functional.cross_entropy(model["head"](feats), y)


def _modulate_and_step(model, coeffs, offset):
    """OGM-GE on the encoders' gradients, then an SGD step."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    functional.ogm_ge_(grads[:4], [0, 0, 1, 1], coeffs, noise=True, seed=7, offset=offset)
    with torch.no_grad():
        torch._foreach_add_(params, grads, alpha=-0.1)
    for p in params:
        p.grad = None


def _train_step(model, xa, xv, y, coeffs, offset):
    loss = _loss(model, xa, xv, y)
    loss.backward()
    _modulate_and_step(model, coeffs, offset)
    return loss.detach()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_compiled_training_step_equals_eager(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    xa, xv, y = torch.randn(6, 4), torch.randn(6, 3), torch.randint(0, 5, (6,))
    coeffs = torch.tensor([0.4, 1.0])
    eager, compiled = _model(), _model()
    counter = CompileCounterWithBackend("aot_eager")
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        # Dynamo traces loss.backward(): the whole step (forward, backward, ogm_ge_, SGD) is one graph.
        patch = torch._dynamo.config.patch(trace_autograd_ops=True)
        whole = torch.compile(_train_step, fullgraph=True, backend=counter)
    else:
        # Older torch: backward runs eagerly between two full graphs.
        patch = contextlib.nullcontext()
        fwd = torch.compile(_loss, fullgraph=True, backend=counter)
        upd = torch.compile(_modulate_and_step, fullgraph=True, backend=counter)

        def whole(model, xa, xv, y, coeffs, offset):
            loss = fwd(model, xa, xv, y)
            loss.backward()
            upd(model, coeffs, offset)
            return loss.detach()

    with patch:
        for offset in range(4):
            want = _train_step(eager, xa, xv, y, coeffs, offset)
            got = whole(compiled, xa, xv, y, coeffs, offset)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    # the step-dependent offset is a SymInt: one recompile (to dynamic), not one per step
    assert counter.frame_count <= 3
    torch._dynamo.reset()
