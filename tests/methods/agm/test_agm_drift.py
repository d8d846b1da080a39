"""AGM's reuse of the full pass never drifts silently: train-mode code that only sometimes differs from eval mode is
classified mode-dependent or caught when it starts to differ, explicit decisions win over a checkpoint's, and
encoders that normalise over the batch get the reference's zero batch."""

import torch
from torch import nn

import agm_fast

B, C, D = 16, 3, 6


class LayerDrop(nn.Module):
    """An HF-style LayerDrop: in train mode the layer is skipped with probability p, decided in Python."""

    def __init__(self, d, p=0.3):
        super().__init__()
        self.layer, self.p = nn.Linear(d, d), p

    def forward(self, x):
        if self.training and torch.rand([]) < self.p:
            return x
        return torch.relu(self.layer(x))


def _encoder(kind):
    torch.manual_seed(1)
    if kind == "layerdrop":
        return nn.Sequential(nn.Linear(D, 8), LayerDrop(8))
    if kind == "late_dropout":
        return nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.0), nn.ReLU())
    if kind == "batchnorm_no_stats":
        return nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU())
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU())


def _pair(kind, strategy):
    torch.manual_seed(0)
    encoders = [_encoder(kind), _encoder("plain")]
    fusion = agm_fast.ConcatFusion([8, 8], C)
    return agm_fast.AGM(encoders=encoders, fusion=fusion, alpha=2.0, strategy=strategy), encoders


def _run(kind, steps, raise_at=None):
    """Coefficients of 40 steps of the default strategy and of the sequential reference, from the same RNG state."""
    out = {}
    for strategy in ("auto", "sequential"):
        agm, encoders = _pair(kind, strategy)
        gen = torch.Generator().manual_seed(3)
        torch.manual_seed(7)
        coeffs = []
        for step in range(steps):
            if raise_at is not None and step == raise_at:
                encoders[0][1].p = 0.3
            xs = [torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)]
            y = torch.randint(0, C, (B,), generator=gen)
            coeffs.append(agm(*xs, target=y).coeffs)
        out[strategy] = torch.stack(coeffs)
    return out


def test_a_layerdrop_that_reads_self_training_is_mode_dependent():
    agm, _ = _pair("layerdrop", "auto")
    assert "reads self.training" in agm.describe()["encoders"][0]["why"]
    got = _run("layerdrop", 40)
    torch.testing.assert_close(got["auto"], got["sequential"])


def test_a_dropout_raised_after_the_first_steps_is_seen_at_the_next_step():
    got = _run("late_dropout", 40, raise_at=3)
    torch.testing.assert_close(got["auto"], got["sequential"])


def test_batch_statistics_without_running_stats_get_the_reference_zero_batch():
    got = _run("batchnorm_no_stats", 5)
    torch.testing.assert_close(got["auto"], got["sequential"])


def test_an_override_and_a_scan_hit_win_over_the_checkpoint():
    torch.manual_seed(0)
    fusion = agm_fast.ConcatFusion([8, 8], C)
    saved = agm_fast.AGM(encoders=[_encoder("plain"), _encoder("plain")], fusion=fusion)
    xs, y = [torch.randn(B, D), torch.randn(B, D)], torch.randint(0, C, (B,))
    saved(*xs, target=y)
    assert [e["reuses_full_pass"] for e in saved.describe()["encoders"]] == [True, True]
    resumed = agm_fast.AGM(encoders=[_encoder("plain"), nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.3))],
                           fusion=fusion, mode_invariant=[False, None])
    resumed.load_state_dict(saved.state_dict())
    assert [e["reuses_full_pass"] for e in resumed.describe()["encoders"]] == [False, False]
