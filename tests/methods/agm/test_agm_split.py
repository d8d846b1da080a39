"""AGM's factorized evaluation through a split head (docs/methods.md, section 5): every head that declares its first
layer linear in each modality's features gives the gradients and coefficients of the sequential strategy."""

import copy

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast.fusion import HeadSplit, has_head_split, head_split

B, C, D_IN, D = 12, 5, 7, 8


def _encoder(dropout):
    return nn.Sequential(nn.Linear(D_IN, 12), nn.LayerNorm(12), nn.GELU(), nn.Dropout(dropout), nn.Linear(12, D))


HEADS = {
    "mlp": lambda M: agm_fast.MLPFusion([D] * M, C, hidden=16),
    "gated": lambda M: agm_fast.GatedFusion([D] * M, C, hidden=16, gate=M - 1),
    "film": lambda M: agm_fast.FiLMFusion([D] * M, C, condition=1),
    "concat": lambda M: agm_fast.ConcatFusion([D] * M, C),
    "sequential": lambda M: nn.Sequential(nn.Linear(D * M, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, C)),
}
SPLIT_HEADS = sorted(HEADS)


class Whole(nn.Module):
    """The black-box form of encoders and head, for the sequential strategy."""

    def __init__(self, encoders, fusion):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion

    def forward(self, *xs):
        h = [enc(x) for enc, x in zip(self.encoders, xs)]
        return self.fusion(torch.cat(h, 1)) if isinstance(self.fusion, nn.Sequential) else self.fusion(*h)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _build(M, head, dropout, dtype, strategy, **kw):
    torch.manual_seed(0)
    whole = Whole([_encoder(dropout) for _ in range(M)], HEADS[head](M)).to(dtype)
    if strategy == "sequential":
        agm = agm_fast.AGM(whole, num_modalities=M, alpha=1.0, strategy="sequential", **kw)
    else:
        agm = agm_fast.AGM(encoders=list(whole.encoders), fusion=whole.fusion, alpha=1.0, **kw)
    return whole, agm


def _side_by_side(M, head, dropout, dtype, kw_got, kw_want, steps=2):
    """Steps of two set-ups from the same weights; before each step the first takes the second's weights, so every
    step compares one step's gradients, not two drifting trajectories. Returns per step (got, want) pairs."""
    runs = [_build(M, head, dropout, dtype, **kw) for kw in (kw_got, kw_want)]
    opts = [torch.optim.SGD(whole.parameters(), lr=0.1) for whole, _ in runs]
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        xs = [torch.randn(B, D_IN, generator=g, dtype=dtype) for _ in range(M)]
        y = torch.randint(0, C, (B,), generator=g)
        runs[0][0].load_state_dict(runs[1][0].state_dict())
        pair = []
        for (whole, agm), opt in zip(runs, opts):
            torch.manual_seed(10 + step)
            res = agm(*xs, target=y)
            opt.zero_grad()
            nn.functional.cross_entropy(res.logits, y).backward()
            pair.append((res.coeffs.clone(), [p.grad.clone() for p in whole.parameters()]))
            opt.step()
        out.append(pair)
    return out, runs[0][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["invariant", "dropout"])
@pytest.mark.parametrize("head", SPLIT_HEADS)
@pytest.mark.parametrize("M", [2, 3, 5])
def test_split_head_equals_the_sequential_strategy(M, head, dropout, dtype):
    # Two steps: the first runs the eval-mode check of the encoders, the second reuses invariant encoders' features.
    pairs, agm = _side_by_side(M, head, dropout, dtype, {"strategy": "factorized"}, {"strategy": "sequential"})
    assert agm._split_head == (head != "concat")  # the concat head keeps its closed form
    # float64: exact to rounding. float32: the split sums M partial products where the head ran one matmul; on a
    # 12-element bias gradient that reaches 1.1e-6, as the unchanged concat closed form's 1.3e-6 on this check (M=5).
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for (c_got, g_got), (c_want, g_want) in pairs:
        assert _rel(c_got, c_want) < tol
        for a, b in zip(g_got, g_want):
            assert _rel(a, b) < tol
    assert not torch.allclose(pairs[0][1][0], torch.ones(M, dtype=pairs[0][1][0].dtype))


class _NoSplit:
    split_head = None  # hides the split: the stacked head call of a head without the protocol


HEADS["mlp-nosplit"] = lambda M: type("MLPNoSplit", (_NoSplit, agm_fast.MLPFusion), {})([D] * M, C, hidden=16)
HEADS["gated-nosplit"] = lambda M: type("GatedNoSplit", (_NoSplit, agm_fast.GatedFusion), {})(
    [D] * M, C, hidden=16, gate=M - 1
)


@pytest.mark.parametrize("head", ["mlp", "gated"])
def test_split_head_with_sampled_subsets(head):
    # M = 5 with two sampled permutations visits some subsets only: the pre-activations come from the presence matrix.
    kw = {"strategy": "factorized", "shapley": "sampled", "num_permutations": 2}
    pairs, agm = _side_by_side(5, head, 0.1, torch.float64, kw, dict(kw, strategy="sequential"))
    assert agm._split_head and len(agm._plan(torch.device("cpu"))[0]) < 2**5 - 1
    for (c_got, g_got), (c_want, g_want) in pairs:
        assert _rel(c_got, c_want) < 1e-12
        for a, b in zip(g_got, g_want):
            assert _rel(a, b) < 1e-12


@pytest.mark.parametrize("head", ["mlp", "gated"])
def test_split_head_with_feature_baselines(head):
    # mute='feature' has no sequential form: the split equals the same head evaluated without its split.
    torch.manual_seed(5)
    baselines = [torch.randn(D, dtype=torch.float64) for _ in range(3)]
    kw = {"strategy": "factorized", "mute": "feature", "baselines": baselines}
    pairs, agm = _side_by_side(3, head, 0.1, torch.float64, kw, kw)
    pairs_plain, plain = _side_by_side(3, head + "-nosplit", 0.1, torch.float64, kw, kw)
    assert agm._split_head and not plain._split_head
    # The stacked call's subset_batch accumulates its backward in float32, hence 1e-8 and not float64's rounding.
    for ((c_got, g_got), _), ((c_want, g_want), _) in zip(pairs, pairs_plain):
        assert _rel(c_got, c_want) < 1e-8
        for a, b in zip(g_got, g_want):
            assert _rel(a, b) < 1e-8


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_split_head_runs_the_first_layer_never_and_the_tail_once_or_twice(dropout):
    torch.manual_seed(0)
    M = 4
    encoders = [_encoder(0.0) for _ in range(M)]
    fusion = nn.Sequential(nn.Linear(D * M, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, C))
    calls = {"first": [], "last": [], "modes": []}
    fusion[0].register_forward_hook(lambda mod, a, o: calls["first"].append(a[0].shape[0]))
    last = fusion[-1]

    def record(mod, args, out):
        calls["last"].append(args[0].shape[0])
        calls["modes"].append(mod.training)

    last.register_forward_hook(record)
    agm = agm_fast.AGM(encoders=encoders, fusion=fusion)
    xs = [torch.randn(B, D_IN) for _ in range(M)]
    agm(*xs, target=torch.randint(0, C, (B,)))
    # The partial products use the layer's weight directly. A head that computes the same in both modes runs its tail
    # once on all 15 subsets' rows; with dropout, on the full pass (train mode), then on the 14 masked non-empty
    # subsets stacked along the batch (eval mode).
    if dropout:
        assert calls == {"first": [], "last": [B, (2**M - 2) * B], "modes": [True, False]}
    else:
        assert calls == {"first": [], "last": [(2**M - 1) * B], "modes": [True]}


@pytest.mark.parametrize("head", SPLIT_HEADS)
def test_head_split_reassembles_the_head(head):
    torch.manual_seed(0)
    fusion = HEADS[head](3).eval()
    feats = [torch.randn(4, D, dtype=torch.float64) for _ in range(3)]
    fusion = fusion.double()
    assert has_head_split(fusion)
    pieces, bias, tail, layout = head_split(fusion, feats)
    z = torch.cat(pieces, 1) if layout == "concat" else sum(pieces)
    want = fusion(torch.cat(feats, 1)) if head == "sequential" else fusion(*feats)
    torch.testing.assert_close(tail(z + bias), want)


def test_head_split_errors():
    assert not has_head_split(nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="in_features=6"):
        head_split(nn.Sequential(nn.Linear(5, 2)), [torch.zeros(2, 3), torch.zeros(2, 3)])

    class Bad(nn.Module):
        def __init__(self, result):
            super().__init__()
            self.result = result

        def split_head(self, *features):
            return self.result

    feats = [torch.zeros(2, 3), torch.zeros(2, 3)]
    with pytest.raises(TypeError, match="split_head: expected to return a HeadSplit, got tuple"):
        head_split(Bad(([], None, None, "sum")), feats)
    with pytest.raises(ValueError, match="one piece per modality"):
        head_split(Bad(HeadSplit([torch.zeros(2, 4)], None, nn.Identity(), "sum")), feats)
    with pytest.raises(ValueError, match="layout 'sum' or 'concat'"):
        head_split(Bad(HeadSplit([torch.zeros(2, 4)] * 2, None, nn.Identity(), "stack")), feats)
    with pytest.raises(ValueError, match="pieces of one width"):
        head_split(Bad(HeadSplit([torch.zeros(2, 4), torch.zeros(2, 5)], None, nn.Identity(), "sum")), feats)
    with pytest.raises(ValueError, match=r"piece 1 of shape \[2, H\]"):
        head_split(Bad(HeadSplit([torch.zeros(2, 4), torch.zeros(3, 4)], None, nn.Identity(), "sum")), feats)


def test_a_head_without_split_is_unchanged():
    # A user's head without split_head keeps the stacked head call (bitwise the values it always gave).
    torch.manual_seed(0)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2 * D, 16), nn.ReLU(), nn.Linear(16, C))

        def forward(self, *h):
            return self.net(torch.cat(h, 1))

    encoders, fusion = [_encoder(0.0) for _ in range(2)], Plain()
    agm = agm_fast.AGM(encoders=copy.deepcopy(encoders), fusion=copy.deepcopy(fusion))
    assert not agm._split_head


@pytest.mark.parametrize("head", ["mlp", "film"])
def test_split_tail_chunks_follow_max_batch(head):
    # max_batch = 2B: the masked subsets' tail runs two subsets per call, with the same values.
    kw = {"strategy": "factorized"}
    pairs, agm = _side_by_side(3, head, 0.1, torch.float64, dict(kw, max_batch=2 * B), kw)
    assert agm._split_head and agm._chunk_spans(6, B) == [(0, 2), (2, 2), (4, 2)]
    for (c_got, g_got), (c_want, g_want) in pairs:
        assert _rel(c_got, c_want) < 1e-12
        for a, b in zip(g_got, g_want):
            assert _rel(a, b) < 1e-12
