"""A generated two-view data set on which modality imbalance costs accuracy (``agm-fast train --data synthetic``).

Each class is a pair ``(a, b)``. The ``fast`` view shows ``a`` with a large margin to every sample and ``b`` to a
share of the samples only, in many noisy dimensions that a network can also use to memorise its training samples.
The ``slow`` view shows the whole label with a small margin, in fewer dimensions: trained alone it learns it. Joint
training fits the training set through the fast view (``a`` and the shown ``b`` first, the rest by memorising the
fast view's noise) before the slow view's encoder has learnt ``b``. The construction, the knobs and why it works:
docs/compare.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ._validate import check_float, check_int

if TYPE_CHECKING:
    import numpy as np

    from .data import MultiViewData

__all__ = ["SyntheticSpec", "make_imbalanced", "save_npz"]

VIEWS = ("fast", "slow")


@dataclass(frozen=True)
class SyntheticSpec:
    """The knobs of :func:`make_imbalanced` (docs/compare.md says what each one does).

    Args:
        rows: samples N (``agm-fast train`` splits them 60/20/20).
        coarse: values of ``a``, the part of the label the fast view shows to every sample.
        fine: values of ``b``, the part the fast view shows to a share of the samples; C = coarse * fine classes.
        fast_dims: features of the fast view (its noise is what joint training memorises).
        fast_margin: distance between the fast view's class means of ``a`` (and of ``b``), in noise std.
        shortcut: share of the samples whose fast view also shows ``b``.
        slow_dims: features of the slow view.
        slow_margin: distance between the slow view's class means (all C classes), in noise std.
        seed: the generator's seed.

    Example::

        data = make_imbalanced(**asdict(SyntheticSpec(rows=3000, slow_margin=4.0)))
    """

    rows: int = 1000
    coarse: int = 4
    fine: int = 3
    fast_dims: int = 1024
    fast_margin: float = 10.0
    shortcut: float = 0.5
    slow_dims: int = 64
    slow_margin: float = 3.5
    seed: int = 0


def _check(spec: SyntheticSpec) -> None:
    for name in ("rows", "coarse", "fast_dims", "slow_dims", "seed"):
        check_int(name, getattr(spec, name), low=1 if name != "seed" else 0)
    check_int("fine", spec.fine, low=2)
    check_float("fast_margin", spec.fast_margin, low=0.0)
    check_float("slow_margin", spec.slow_margin, low=0.0)
    check_float("shortcut", spec.shortcut, low=0.0, high=1.0)
    C = spec.coarse * spec.fine
    if spec.rows < 3 * C:
        raise ValueError(f"rows: expected at least 3 per class ({3 * C} for {spec.coarse} x {spec.fine} classes), "
                         f"got {spec.rows}")
    if spec.fast_dims < spec.coarse + spec.fine:
        raise ValueError(f"fast_dims: expected at least coarse + fine ({spec.coarse + spec.fine}), got "
                         f"{spec.fast_dims}")
    if spec.slow_dims < C:
        raise ValueError(f"slow_dims: expected at least coarse * fine ({C}), got {spec.slow_dims}")


def _simplex(k: int, basis: np.ndarray, margin: float) -> np.ndarray:
    import numpy as np

    """``k`` class means along the ``k`` orthonormal columns of ``basis``, every pair exactly ``margin`` apart."""
    # One-hot corners are sqrt(2) apart; the random basis spreads each mean over all the dimensions, so that
    # standardising a feature hardly changes it.
    return (np.eye(k) * (margin / np.sqrt(2.0))) @ basis.T


def make_imbalanced(
    rows: int = 1000,
    coarse: int = 4,
    fine: int = 3,
    fast_dims: int = 1024,
    fast_margin: float = 10.0,
    shortcut: float = 0.5,
    slow_dims: int = 64,
    slow_margin: float = 3.5,
    seed: int = 0,
    path: Optional[str] = None,
) -> MultiViewData:
    """Generate the two-view data set (views ``fast`` and ``slow``); the same arguments give the same arrays.

    Args:
        rows, coarse, fine, fast_dims, fast_margin, shortcut, slow_dims, slow_margin, seed: see
            :class:`SyntheticSpec` (the defaults are its defaults).
        path: also write the arrays there as an ``.npz`` that ``agm-fast train --data`` reads (default: no file).

    Returns:
        :class:`agm_fast.data.MultiViewData` with ``x_fast [rows, fast_dims]``, ``x_slow [rows, slow_dims]``
        (float32) and ``y = a * fine + b`` in ``0..coarse * fine - 1``, every class within one row of
        ``rows / (coarse * fine)``.
    """
    # numpy is loaded here, not at import: the command line's --help names these knobs without it.
    import numpy as np

    from .data import MultiViewData

    spec = SyntheticSpec(rows, coarse, fine, fast_dims, fast_margin, shortcut, slow_dims, slow_margin, seed)
    _check(spec)
    rng = np.random.default_rng(seed)
    C = coarse * fine
    y = rng.permutation(np.arange(rows) % C)
    a, b = y // fine, y % fine
    # a and b along orthogonal directions of the fast view; b only where it is shown.
    basis, _ = np.linalg.qr(rng.standard_normal((fast_dims, coarse + fine)))
    shown = rng.random(rows) < shortcut
    fast = (
        _simplex(coarse, basis[:, :coarse], fast_margin)[a]
        + shown[:, None] * _simplex(fine, basis[:, coarse:], fast_margin)[b]
        + rng.standard_normal((rows, fast_dims))
    )
    slow_basis, _ = np.linalg.qr(rng.standard_normal((slow_dims, C)))
    slow = _simplex(C, slow_basis, slow_margin)[y] + rng.standard_normal((rows, slow_dims))
    xs = [fast.astype(np.float32), slow.astype(np.float32)]
    data = MultiViewData(names=list(VIEWS), xs=xs, y=y.astype(np.int64), num_classes=C)
    if path is not None:
        save_npz(path, data)
    return data


def save_npz(path: str, data: MultiViewData) -> None:
    """Write ``data`` as ``x_<name>`` and ``y`` arrays, the layout that :func:`agm_fast.data.load_npz` reads."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import numpy as np

    np.savez_compressed(path, y=data.y, **{f"x_{n}": x for n, x in zip(data.names, data.xs)})
