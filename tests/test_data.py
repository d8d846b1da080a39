"""The embedded UCI Multiple Features data, user .npz files, the stratified split and the standardisation."""

import numpy as np
import pytest
import torch

from agm_fast import data


def test_mfeat_shapes_dtypes_and_classes():
    d = data.load_mfeat()
    assert d.names == list(data.MFEAT_VIEWS)
    assert [x.shape for x in d.xs] == [(2000, 216), (2000, 76), (2000, 64), (2000, 240), (2000, 47), (2000, 6)]
    assert all(x.dtype == np.float32 for x in d.xs)
    assert d.y.dtype == np.int64 and d.num_classes == 10
    assert np.bincount(d.y).tolist() == [200] * 10


def test_mfeat_values_match_the_source_rows():
    # Rows copied by hand from the UCI CSV files: first and last row of mor, row 1000 of kar, last row of fac.
    d = data.load_mfeat(["mor", "kar", "fac"])
    mor, kar, fac = d.xs
    np.testing.assert_array_equal(mor[0], np.array([1, 0, 0, 133.15, 1.3117, 1620.2], dtype=np.float32))
    np.testing.assert_array_equal(mor[1999], np.array([1, 1, 1, 133.92, 1.5646, 3808], dtype=np.float32))
    np.testing.assert_array_equal(kar[999, :3], np.array([-11.664, -2.8136, -5.9604], dtype=np.float32))
    np.testing.assert_array_equal(fac[1999, :3], np.array([355, 379, 867], dtype=np.float32))
    assert d.y[0] == 0 and d.y[999] == 4 and d.y[1999] == 9


def test_mfeat_view_order_and_errors():
    d = data.load_mfeat(["mor", "pix"])
    assert d.names == ["mor", "pix"] and d.xs[0].shape[1] == 6 and d.xs[1].shape[1] == 240
    with pytest.raises(ValueError, match="unknown view 'abc'"):
        data.load_mfeat(["pix", "abc"])
    with pytest.raises(ValueError, match="expected distinct views"):
        data.load_mfeat(["pix", "pix"])
    with pytest.raises(TypeError, match="sequence of view names"):
        data.load_mfeat("pix")


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    y = np.repeat(np.arange(4), [50, 30, 20, 10])
    tr, va, te = data.stratified_split(y, seed=3)
    tr2, va2, te2 = data.stratified_split(y, seed=3)
    for a, b in ((tr, tr2), (va, va2), (te, te2)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(te, data.stratified_split(y, seed=4)[2])
    everything = np.concatenate([tr, va, te])
    assert len(everything) == len(y) and len(np.unique(everything)) == len(y)
    # 20% of every class in validation and in test.
    assert np.bincount(y[va], minlength=4).tolist() == [10, 6, 4, 2]
    assert np.bincount(y[te], minlength=4).tolist() == [10, 6, 4, 2]
    with pytest.raises(ValueError, match="val_fraction"):
        data.stratified_split(y, seed=0, val_fraction=0.6, test_fraction=0.5)


def test_standardisation_uses_train_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(60, 4)).astype(np.float32)
    x[:, 2] = 5.0  # constant feature: only centred
    y = np.repeat(np.arange(3), 20)
    d = data.MultiViewData(names=["a", "b"], xs=[x, x[:, :2].copy()], y=y, num_classes=3)
    train, val, test = data.split_and_standardize(d, seed=1)
    mean = x[train.index].astype(np.float64).mean(0)
    std = x[train.index].astype(np.float64).std(0)
    std[2] = 1.0
    want = torch.from_numpy(((x[val.index] - mean) / std).astype(np.float32))
    torch.testing.assert_close(val.xs[0], want)
    torch.testing.assert_close(train.xs[0].mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.xs[0].std(0, unbiased=False)[[0, 1, 3]], torch.ones(3), atol=1e-5, rtol=0)
    assert train.xs[0][:, 2].abs().max() == 0
    torch.testing.assert_close(test.y, torch.from_numpy(y[test.index]))


def test_load_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "feats.npz"
    np.savez(path, x_video=rng.normal(size=(12, 5)), x_audio=rng.integers(0, 9, size=(12, 3)), y=np.arange(12) % 3)
    d = data.load_npz(str(path))
    assert d.names == ["audio", "video"] and d.num_classes == 3
    assert d.xs[0].dtype == np.float32 and d.xs[0].shape == (12, 3) and d.xs[1].shape == (12, 5)
    d2 = data.load_npz(str(path), ["video", "audio"])
    assert d2.names == ["video", "audio"]
    np.testing.assert_array_equal(d2.xs[1], d.xs[0])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_a": np.zeros((4, 2))}, "no label array 'y'"),
        ({"y": np.zeros(4, dtype=int)}, "no view arrays named x_<name>"),
        ({"x_a": np.zeros((4, 2)), "y": np.zeros(5, dtype=int)}, "x_a: expected 5 rows \\(as y\\), got 4"),
        ({"x_a": np.zeros((4, 2)), "y": np.zeros(4)}, "y: expected integer class indices"),
        ({"x_a": np.zeros((4, 2)), "y": -np.ones(4, dtype=int)}, "class indices >= 0"),
        ({"x_a": np.zeros(4), "y": np.zeros(4, dtype=int)}, "x_a: expected a 2-D array"),
        ({"x_a": np.full((4, 2), np.nan), "y": np.zeros(4, dtype=int)}, "NaN or infinite"),
    ],
)
def test_load_npz_rejects_bad_files(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        data.load_npz(str(path))


def test_load_npz_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_npz(str(tmp_path / "nope.npz"))
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load_npz(str(path))
    np.savez(tmp_path / "ok.npz", x_a=np.zeros((4, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="unknown view 'b'"):
        data.load_npz(str(tmp_path / "ok.npz"), ["b"])


def test_a_csv_given_as_data_is_named_for_what_it_is(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b,y\n1,2,0\n")
    with pytest.raises(ValueError, match="not a readable .npz file .not a zip archive.* np.savez"):
        data.load_npz(str(path))
