"""Linear-probe evaluation: a separable modality probes near 1, a noise modality near chance, the encoders stay
frozen, bad inputs name their argument, and agm-fast train --probe reports it."""

import json

import pytest
import torch
from torch import nn

import agm_fast
from agm_fast import cli


def _data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    informative = torch.randn(n, 6, generator=g) + 3 * nn.functional.one_hot(y, 6).float()
    noise = torch.randn(n, 5, generator=g)
    return [informative, noise], y


def test_probe_accuracy_follows_the_information_in_each_modality():
    xs, y = _data()
    acc = agm_fast.linear_probe([x[:200] for x in xs], y[:200], [x[200:] for x in xs], y[200:])
    assert acc.dtype == torch.float64 and acc.shape == (2,)
    assert acc[0] > 0.95
    assert acc[1] < 0.6


def test_probe_is_deterministic():
    xs, y = _data()
    a = agm_fast.linear_probe([x[:200] for x in xs], y[:200], [x[200:] for x in xs], y[200:])
    b = agm_fast.linear_probe([x[:200] for x in xs], y[:200], [x[200:] for x in xs], y[200:])
    assert torch.equal(a, b)


def test_probe_encoders_freezes_and_restores_them():
    xs, y = _data()
    encoders = [nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)), nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5))]
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in encoders]
    acc = agm_fast.probe_encoders(encoders, [x[:200] for x in xs], y[:200], [x[200:] for x in xs], y[200:])
    assert acc[0] > acc[1]
    for e, state in zip(encoders, before):
        assert e.training
        for k, v in e.state_dict().items():
            assert torch.equal(v, state[k]), k
    assert all(p.grad is None for e in encoders for p in e.parameters())


def test_probe_errors_name_the_argument():
    xs, y = _data()
    with pytest.raises(ValueError, match=r"test_features: expected as many modalities"):
        agm_fast.linear_probe(xs, y, xs[:1], y)
    with pytest.raises(ValueError, match=r"train_labels: expected \[300\] int64 class indices"):
        agm_fast.linear_probe(xs, y.float(), xs, y)
    bad = xs[0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"train_features\[0\]: expected finite features"):
        agm_fast.linear_probe([bad, xs[1]], y, xs, y)
    with pytest.raises(ValueError, match=r"test_features\[1\]: expected 5 features per sample"):
        agm_fast.linear_probe(xs, y, [xs[0], xs[1][:, :3]], y)
    with pytest.raises(ValueError, match="max_iter: expected an int >= 1"):
        agm_fast.linear_probe(xs, y, xs, y, max_iter=0)


def test_cli_probe_columns_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--probe", "--epochs", 2, "--out", out, "--hidden", 16, "--feature-dim", 8, "--batch-size", 128]
    assert cli.main([str(a) for a in argv]) == 0
    stdout = capsys.readouterr().out
    assert "| probe fac" in stdout
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "probe_acc_fac" in header and "probe_acc_zer" in header
    summary = json.loads((out / "summary.json").read_text())
    probe = summary["probe_test_acc_per_modality"]
    assert set(probe) == {"fac", "zer"} and all(0.1 < a <= 1 for a in probe.values())
    assert summary["config"]["probe"] is True


def test_probe_encoders_gives_every_submodule_its_own_mode_back():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    enc.train()
    enc[1].eval()  # frozen statistics inside a training encoder
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    agm_fast.probe_encoders([enc, enc], [x, x], y, [x, x], y)
    assert enc.training and not enc[1].training
    before = enc[1].running_mean.clone()
    enc(torch.randn(8, 4) + 3.0)
    assert torch.equal(enc[1].running_mean, before)
