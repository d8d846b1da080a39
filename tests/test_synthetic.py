"""The generated imbalanced data set: determinism, shapes, the structure docs/compare.md describes, the CLI knobs."""

import re

import numpy as np
import pytest

from agm_fast import cli, data
from agm_fast.synthetic import SyntheticSpec, make_imbalanced, save_npz

SMALL = dict(rows=600, fast_dims=32, slow_dims=24)


def test_same_arguments_same_arrays_other_seed_other_arrays():
    a, b = make_imbalanced(**SMALL, seed=3), make_imbalanced(**SMALL, seed=3)
    c = make_imbalanced(**SMALL, seed=4)
    assert a.names == ["fast", "slow"]
    for xa, xb, xc in zip(a.xs, b.xs, c.xs):
        np.testing.assert_array_equal(xa, xb)
        assert not np.array_equal(xa, xc)
    np.testing.assert_array_equal(a.y, b.y)


def test_shapes_dtypes_and_balanced_classes():
    d = make_imbalanced(rows=601, coarse=3, fine=4, fast_dims=10, slow_dims=20)
    assert d.num_classes == 12
    assert d.xs[0].shape == (601, 10) and d.xs[1].shape == (601, 20)
    assert all(x.dtype == np.float32 for x in d.xs) and d.y.dtype == np.int64
    counts = np.bincount(d.y, minlength=12)
    assert counts.max() - counts.min() <= 1
    default = make_imbalanced()
    assert [x.shape for x in default.xs] == [(1000, SyntheticSpec.fast_dims), (1000, SyntheticSpec.slow_dims)]


def pairwise_distances(x, labels):
    means = np.stack([x[labels == k].mean(0) for k in range(labels.max() + 1)])
    return means, np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1))[np.triu_indices(len(means), 1)]


def test_the_fast_view_shows_a_to_every_sample_and_b_to_the_shortcut_share():
    rows, dims = 24000, 16
    d = make_imbalanced(rows=rows, fast_dims=dims, slow_dims=12, fast_margin=6.0, shortcut=0.25, seed=1)
    a, b = d.y // SyntheticSpec.fine, d.y % SyntheticSpec.fine
    fast = d.xs[0].astype(np.float64)
    # Grouped by a, the means are the margin apart; grouped by b, a quarter of it (b is shown to a quarter).
    sampling = 4 * np.sqrt(2 * dims / (rows / 4))
    means_a, dist_a = pairwise_distances(fast, a)
    assert np.abs(dist_a - 6.0).max() < sampling
    _, dist_b = pairwise_distances(fast, b)
    assert np.abs(dist_b - 0.25 * 6.0).max() < sampling
    # Once a's means are removed: unit noise plus the shown b code, whose variance summed over the dimensions is
    # shortcut * margin^2 / 2 - shortcut^2 * |mean of b's means|^2 = margin^2 / 2 * shortcut * (1 - shortcut / fine).
    residual = fast - means_a[a]
    expected = 1 + (6.0**2 / 2) * 0.25 * (1 - 0.25 / SyntheticSpec.fine) / dims
    assert abs(residual.var(0).mean() - expected) < 0.03


def test_the_slow_view_holds_the_whole_label_with_its_margin():
    rows, dims = 24000, 16
    d = make_imbalanced(rows=rows, slow_dims=dims, slow_margin=3.0, fast_dims=8, seed=2)
    means, dist = pairwise_distances(d.xs[1].astype(np.float64), d.y)
    # Every pair of class means is slow_margin apart (up to the sampling error of the means).
    assert np.abs(dist - 3.0).max() < 4 * np.sqrt(2 * dims / (rows / 12))
    residual = d.xs[1] - means[d.y]
    assert abs(residual.std() - 1) < 0.01


def test_npz_round_trip(tmp_path):
    path = tmp_path / "sub" / "syn.npz"
    d = make_imbalanced(**SMALL, path=str(path))
    back = data.load_npz(str(path))
    assert back.names == ["fast", "slow"]
    np.testing.assert_array_equal(back.y, d.y)
    for x, y in zip(back.xs, d.xs):
        np.testing.assert_array_equal(x, y)
    save_npz(str(tmp_path / "again.npz"), d)
    assert data.content_hash(data.load_npz(str(tmp_path / "again.npz"))) == data.content_hash(d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rows=10), "rows: expected at least 3 per class"),
        (dict(shortcut=1.5), "shortcut: expected"),
        (dict(slow_margin=-1.0), "slow_margin: expected"),
        (dict(fine=1), "fine: expected"),
        (dict(slow_dims=5), "slow_dims: expected at least coarse * fine (12)"),
        (dict(fast_dims=6), "fast_dims: expected at least coarse + fine (7)"),
        (dict(fast_dims=2.5), "fast_dims: expected an int"),
    ],
)
def test_bad_knobs_raise(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        make_imbalanced(**kwargs)


def test_train_on_data_synthetic_and_its_knobs(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", "synthetic", "--synthetic-rows", "240", "--synthetic-fast-dims", "16",
            "--synthetic-slow-dims", "16", "--method", "joint", "--epochs", "1", "--hidden", "8", "--feature-dim", "4",
            "--batch-size", "64", "--no-plot", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "views fast,slow (synthetic:" in capsys.readouterr().out
    # The knobs are part of the run: resuming without them continues with the same data.
    rc = cli.main(["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--synthetic-rows", "500"], "--synthetic-rows applies to --data synthetic"),
        (["--data", "synthetic", "--synthetic-shortcut", "2"], "--synthetic-shortcut: expected"),
        (["--data", "synthetic", "--views", "fast,audio"], "--views: unknown view 'audio'"),
    ],
)
def test_bad_synthetic_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    rc = cli.main(["train", *argv, "--epochs", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
