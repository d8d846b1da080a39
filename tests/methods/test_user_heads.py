"""A user's own fusion head (an MLP on the concatenated features, without ``.dims``) and no sizes passed: every
method runs, and the methods that need the feature sizes take them from the first forward."""

import pytest
import torch
from torch import nn

from agm_fast import methods

M, B, C, H = 3, 16, 5, 12
DIMS = (6, 4, 5)
EPOCH = 7  # past OPM's 6-epoch warm-up


class UserHead(nn.Module):
    """What a user writes: no .dims, the features as positional arguments."""

    def __init__(self, width=sum(DIMS)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, H), nn.ReLU(), nn.Linear(H, C))

    def forward(self, *features):
        return self.net(torch.cat(features, dim=1))


def parts(seed=0, equal=False):
    torch.manual_seed(seed)
    dims = (6, 6, 6) if equal else DIMS
    encoders = [nn.Sequential(nn.Linear(7, d), nn.ReLU()) for d in dims]
    return encoders, UserHead(sum(dims))


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [([torch.randn(B, 7, generator=g) for _ in range(M)], torch.randint(0, C, (B,), generator=g))
            for _ in range(n)]


def train(method, encoders, head, steps):
    params = [p for mod in [*encoders, head] for p in mod.parameters()]
    opt = torch.optim.SGD([{"params": params}] + method.param_groups(0.1), lr=0.1)
    before = [p.detach().clone() for p in params]
    methods.run_epoch_passes(method, EPOCH, "start", steps, steps)  # PMR's prototypes; the others ask for nothing
    coeffs = [methods.training_step(method, xs, y, EPOCH, opt).coeffs for xs, y in steps]
    return coeffs, before, params


# MLA and ReconBoost put every modality's features through one shared head of their own: they need equal sizes.
SHARED = ("mla", "reconboost")


@pytest.mark.parametrize("name", methods.available())
def test_every_method_runs_on_a_user_mlp_head_without_sizes(name):
    encoders, head = parts()
    method = methods.create(name, encoders, head)
    if name in SHARED:
        with pytest.raises(ValueError, match=r"encoders\[1\]: .* shared head reads every modality's features, "
                                             r"expected features of width 6 \(the other modalities'\), got 4"):
            method.predict(batches(1)[0][0])  # every modality through the shared head
        encoders, head = parts(equal=True)
        method = methods.create(name, encoders, head)
    coeffs, before, params = train(method, encoders, head, batches())
    for c in coeffs:
        assert c.shape == (M,) and c.dtype == torch.float32 and torch.isfinite(c).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    state = method.state_dict()  # saved after the sizes were taken: a fresh method loads it
    again = methods.create(name, *parts(1, equal=name in SHARED))
    again.load_state_dict(state)


def test_sizes_come_from_the_first_forward():
    encoders, head = parts()
    opm = methods.create("opm", encoders, head, p_exe=1.0)
    assert opm.opm.dims is None
    train(opm, encoders, head, batches(1))
    assert opm.opm.dims == list(DIMS)
    mlb = methods.create("mlb", encoders, head)
    train(mlb, encoders, head, batches(1))
    assert [tuple(h.weight.shape) for h in mlb.heads] == [(C, d) for d in DIMS]


def test_cggm_heads_mirror_an_mlp_heads_output_layer():
    encoders, head = parts()
    cggm = methods.create("cggm", encoders, head)
    train(cggm, encoders, head, batches(2))
    # Each head ends as the user's head does (Linear(H, C)) and is compared with the whole output weight.
    for h, d in zip(cggm.cggm.heads, DIMS):
        assert [tuple(p.shape) for p in h.parameters()] == [(H, d), (H,), (C, H), (C,)]
    assert cggm.cggm._slices == [slice(0, H)] * M
    # With the sizes known the same heads are built at once (no lazy layer), and the direction term acts.
    encoders, head = parts()
    known = methods.create("cggm", encoders, head, feature_dims=DIMS, lam=0.5)
    assert all(isinstance(h[0], nn.Linear) and not isinstance(h[0], nn.LazyLinear) for h in known.cggm.heads)
    train(known, encoders, head, batches(3))
    assert known.cggm.loss_term() != 0


def test_cggm_fusion_output_names_the_compared_layer():
    encoders, head = parts()
    by_name = methods.create("cggm", encoders, head, fusion_output="net.2")
    assert by_name.cggm.fusion_weight is head.net[2].weight
    with pytest.raises(ValueError, match=r"fusion_output: expected the name of a layer of fusion, one of \['net.0', "
                                         r"'net.2'\], got 'net.5'"):
        methods.create("cggm", encoders, head, fusion_output="net.5")
    with pytest.raises(ValueError, match=r"fusion_output: expected a layer with one row per class \(5"):
        methods.create("cggm", encoders, head, fusion_output="net.0")
    with pytest.raises(ValueError, match="fusion_output: expected a module of fusion or its name"):
        methods.create("cggm", encoders, head, fusion_output=nn.Linear(H, C))
    # Heads that fit neither comparison: the error says what to pass.
    bad = [nn.Linear(d, C) for d in DIMS]
    with pytest.raises(ValueError, match=r"pass heads= ending in nn.Linear\(12, 5\)"):
        methods.create("cggm", encoders, head, heads=bad, feature_dims=DIMS)
