"""Multi-view data for ``agm-fast train``: the embedded UCI Multiple Features set and a user's own ``.npz`` files.

The embedded set (``agm_fast/data/mfeat.npz``, credit in ``agm_fast/data/README.md``) holds 2000 handwritten digits
'0'..'9' described by six views of unequal strength: ``fac`` (profile correlations, 216 dims), ``fou`` (Fourier
coefficients, 76), ``kar`` (Karhunen-Loeve coefficients, 64), ``pix`` (pixel averages, 240), ``zer`` (Zernike
moments, 47) and ``mor`` (morphological features, 6). A user's file follows the same layout (:func:`load_npz`), so
pre-extracted features of any data set train the same way.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "MFEAT_VIEWS",
    "MFEAT_PATH",
    "MultiViewData",
    "SplitData",
    "content_hash",
    "load_mfeat",
    "load_npz",
    "stratified_split",
    "split_and_standardize",
]

MFEAT_VIEWS: Tuple[str, ...] = ("fac", "fou", "kar", "pix", "zer", "mor")
MFEAT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mfeat.npz")


@dataclass
class MultiViewData:
    """Aligned views of one data set.

    Attributes:
        names: the view names, in the order of ``xs``.
        xs: per view a float32 array ``[N, d_m]``.
        y: int64 class indices ``[N]`` in ``0..num_classes-1``.
        num_classes: C, ``max(y) + 1``.
    """

    names: List[str]
    xs: List[np.ndarray]
    y: np.ndarray
    num_classes: int


@dataclass
class SplitData:
    """One split (train, validation or test) as CPU tensors.

    Attributes:
        xs: per view a float32 tensor ``[n, d_m]``, standardised with the training split's statistics.
        y: int64 tensor ``[n]``.
        index: int64 array ``[n]``, the rows of the full data set this split holds.
    """

    xs: List[Tensor]
    y: Tensor
    index: np.ndarray


def _select(names: Sequence[str], views: Optional[Sequence[str]], source: str) -> List[str]:
    if views is None:
        return list(names)
    if isinstance(views, str):
        raise TypeError(f"views: expected a sequence of view names, got the string {views!r}")
    chosen = list(views)
    unknown = [v for v in chosen if v not in names]
    if unknown:
        raise ValueError(f"views: unknown view {unknown[0]!r} in {source}; expected one of: {', '.join(names)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"views: expected distinct views, got {', '.join(chosen)}")
    if not chosen:
        raise ValueError("views: expected at least one view, got none")
    return chosen


def _validate(names: List[str], xs: List[np.ndarray], y: np.ndarray, source: str) -> MultiViewData:
    if y.ndim != 1:
        raise ValueError(f"{source}: y: expected a 1-D array [N], got shape {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: y: expected integer class indices, got dtype {y.dtype}")
    if y.shape[0] == 0:
        raise ValueError(f"{source}: y: expected at least one row, got none")
    if y.min() < 0:
        raise ValueError(f"{source}: y: expected class indices >= 0, got {int(y.min())}")
    out = []
    for name, x in zip(names, xs):
        if x.ndim != 2:
            raise ValueError(f"{source}: x_{name}: expected a 2-D array [N, d], got shape {tuple(x.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{source}: x_{name}: expected {y.shape[0]} rows (as y), got {x.shape[0]}")
        if x.shape[1] == 0:
            raise ValueError(f"{source}: x_{name}: expected at least one feature column, got none")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"{source}: x_{name}: expected numbers, got dtype {x.dtype}")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{source}: x_{name}: expected finite values, got NaN or infinite values")
        out.append(x)
    num_classes = int(y.max()) + 1
    present = len(np.unique(y))
    # Labels that are ids rather than class indices (0, 1, 999999) would build a model with a million outputs.
    if num_classes - present > present:
        raise ValueError(
            f"{source}: y: expected class indices 0..C-1 with few gaps, got {present} distinct values up to "
            f"{num_classes - 1}; remap them first, e.g. y = np.unique(y, return_inverse=True)[1]"
        )
    return MultiViewData(names=list(names), xs=out, y=y.astype(np.int64), num_classes=num_classes)


def content_hash(data: MultiViewData) -> str:
    """A SHA-256 of the views' names, values and the labels: a resumed run checks it has the same data."""
    h = hashlib.sha256()
    for name, x in zip(data.names, data.xs):
        h.update(name.encode())
        h.update(str(x.shape).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(data.y).tobytes())
    return h.hexdigest()


def load_npz(path: str, views: Optional[Sequence[str]] = None) -> MultiViewData:
    """Load a user's multi-view data set from an ``.npz`` file.

    File format (``np.savez`` or ``np.savez_compressed``):
        ``x_<name>``: one array per view, ``[N, d_name]``, any float or integer dtype (stored as float32). The
        view's name is what follows ``x_``; views are ordered by name unless ``views`` gives an order.
        ``y``: ``[N]`` integer class indices in ``0..C-1`` (C is ``max(y) + 1``).
        Rows are aligned: row i of every ``x_<name>`` and of ``y`` describe the same sample. Values must be finite.

    Example::

        np.savez("feats.npz", x_audio=audio_emb, x_video=video_emb, y=labels)

    Args:
        path: the ``.npz`` file.
        views: the views to load and their order (default: every ``x_<name>`` in the file, sorted by name).

    Returns:
        :class:`MultiViewData`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable ``.npz`` or does not follow the format above.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(6)
    if not head.startswith(b"PK") and not head.startswith(b"\x93NUMPY"):
        # Not a zip archive (an .npz) nor a .npy: a text file such as a CSV, or anything else.
        raise ValueError(
            f"data file {path!r} is not a readable .npz file (not a zip archive: it starts with {head!r}); save it "
            "with np.savez(path, x_<name>=..., y=...), one x_<name> array [N, d] per view and labels y [N]"
        )
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"data file {path!r} is not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(
            f"data file {path!r} is not a readable .npz file (it holds one {type(z).__name__}, as a .npy file does; "
            "save the arrays with np.savez(path, x_<name>=..., y=...))"
        )
    try:
        with z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"data file {path!r} is not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"data file {path!r} is not a readable .npz file (its member {key!r} is not a .npy array)")
    names = sorted(k[2:] for k in arrays if k.startswith("x_") and len(k) > 2)
    if not names:
        raise ValueError(f"data file {path!r} holds no view arrays named x_<name> (found: {', '.join(arrays)})")
    if "y" not in arrays:
        raise ValueError(f"data file {path!r} holds no label array 'y'")
    chosen = _select(names, views, f"data file {path!r}")
    return _validate(chosen, [arrays["x_" + n] for n in chosen], arrays["y"], f"data file {path!r}")


def load_mfeat(views: Optional[Sequence[str]] = None) -> MultiViewData:
    """Load the embedded UCI Multiple Features data set (2000 digits, 10 classes, 200 per class).

    Args:
        views: any of ``MFEAT_VIEWS`` (``fac, fou, kar, pix, zer, mor``), in the order wanted; default all six.

    Returns:
        :class:`MultiViewData` with float32 views ``[2000, d_m]`` and labels ``[2000]``.
    """
    chosen = _select(MFEAT_VIEWS, views, "the embedded mfeat data")
    with np.load(MFEAT_PATH, allow_pickle=False) as z:
        xs = [z["x_" + n] for n in chosen]
        y = z["y"]
    return _validate(chosen, xs, y, "the embedded mfeat data")


def stratified_split(
    y: np.ndarray, seed: int, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/validation/test split.

    Each class's rows are shuffled with a NumPy generator seeded by ``seed`` and cut so that every split holds
    (up to rounding) the same class proportions; a class with at least 3 rows puts at least one in each split.

    Args:
        y: ``[N]`` integer labels.
        seed: the split's seed (the same seed always gives the same split).
        val_fraction: share of each class in the validation split.
        test_fraction: share of each class in the test split.

    Returns:
        ``(train, val, test)``: sorted int64 row indices.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction, test_fraction: expected fractions in (0, 1) with a sum below 1, got {val_fraction}, "
            f"{test_fraction}"
        )
    rng = np.random.default_rng(seed)
    parts: Tuple[list, list, list] = ([], [], [])
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n = len(rows)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        n_test = min(n_test, n)
        n_val = min(n_val, n - n_test)
        parts[2].append(rows[:n_test])
        parts[1].append(rows[n_test : n_test + n_val])
        parts[0].append(rows[n_test + n_val :])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)


def split_and_standardize(
    data: MultiViewData, seed: int, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> Tuple[SplitData, SplitData, SplitData]:
    """Split with :func:`stratified_split` and standardise every view with the training split's statistics.

    Each feature becomes ``(x - mean_train) / std_train``; a feature that is constant on the training split is only
    centred. A zero input therefore means "the average training sample", which is also what muting a view means.

    Args:
        data: the data set.
        seed, val_fraction, test_fraction: as :func:`stratified_split`.

    Returns:
        ``(train, val, test)`` :class:`SplitData`.
    """
    idx = stratified_split(data.y, seed, val_fraction, test_fraction)
    for name, rows in zip(("train", "validation", "test"), idx):
        if len(rows) == 0:
            raise ValueError(f"the {name} split is empty: the data set has too few rows ({len(data.y)})")
    train = idx[0]
    stats = []
    for x in data.xs:
        mean = x[train].astype(np.float64).mean(0)
        std = x[train].astype(np.float64).std(0)
        stats.append((mean, np.where(std > 1e-12, std, 1.0)))
    out = []
    for rows in idx:
        import torch

        xs = [torch.from_numpy(((x[rows] - m) / s).astype(np.float32)) for x, (m, s) in zip(data.xs, stats)]
        out.append(SplitData(xs=xs, y=torch.from_numpy(data.y[rows]), index=rows))
    return tuple(out)
