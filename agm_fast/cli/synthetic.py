"""``--data synthetic``: the generated imbalanced set (:mod:`agm_fast.synthetic`) and its ``--synthetic-*`` knobs."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING, List, Optional

from .. import synthetic
from .args import CLIError, one_line

if TYPE_CHECKING:
    from ..data import MultiViewData

__all__ = ["NAME", "DESTS", "add_options", "load", "check_unused"]

# The --data value that names the generated set (a file of that name is still reachable as ./synthetic).
NAME = "synthetic"
DESTS = tuple(f"synthetic_{f.name}" for f in fields(synthetic.SyntheticSpec))

_HELP = {
    "rows": "samples N",
    "coarse": "values of a, the part of the label the fast view shows to every sample",
    "fine": "values of b, the part the fast view shows to --synthetic-shortcut of the samples (classes: coarse x fine)",
    "fast_dims": "features of the fast view (its noise is what joint training memorises)",
    "fast_margin": "distance between the fast view's class means of a and of b, in noise standard deviations",
    "shortcut": "share of the samples whose fast view also shows b",
    "slow_dims": "features of the slow view",
    "slow_margin": "distance between the slow view's class means (all classes), in noise standard deviations",
    "seed": "the generator's seed (the data; --seed sets the split and the training)",
}


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add the ``--synthetic-<knob>`` options (default: :class:`agm_fast.synthetic.SyntheticSpec`)."""
    g = parser.add_argument_group("generated data (--data synthetic; docs/compare.md)")
    for f in fields(synthetic.SyntheticSpec):
        flag = "--synthetic-" + f.name.replace("_", "-")
        g.add_argument(flag, dest=f"synthetic_{f.name}", type=type(f.default), default=None,
                       help=f"{_HELP[f.name]} (default {f.default})")


def _given(args: argparse.Namespace) -> dict:
    return {d[len("synthetic_"):]: getattr(args, d) for d in DESTS if getattr(args, d, None) is not None}


def check_unused(args: argparse.Namespace) -> None:
    """A ``--synthetic-*`` knob without ``--data synthetic`` is an error, not a silent no-op."""
    given = _given(args)
    if given and args.data != NAME:
        flag = "--synthetic-" + next(iter(given)).replace("_", "-")
        raise CLIError(f"{flag} applies to --data synthetic, not to --data {args.data or '(mfeat)'}")


def load(args: argparse.Namespace, views: Optional[List[str]] = None) -> MultiViewData:
    """Generate the data set that the ``--synthetic-*`` knobs describe, with ``views`` in that order (default
    both); raises :class:`CLIError` for a bad knob or view."""
    knobs = _given(args)
    try:
        data = synthetic.make_imbalanced(**knobs)
    except (TypeError, ValueError) as exc:
        text = one_line(exc)
        name = text.split(":", 1)[0]
        if name in knobs:
            text = "--synthetic-" + name.replace("_", "-") + text[len(name):]
        raise CLIError(text) from None
    if views is None:
        return data
    unknown = [v for v in views if v not in data.names]
    if unknown:
        raise CLIError(f"--views: unknown view {unknown[0]!r} of --data synthetic; choose from {','.join(data.names)}")
    from ..data import MultiViewData

    xs = [data.xs[data.names.index(v)] for v in views]
    return MultiViewData(names=list(views), xs=xs, y=data.y, num_classes=data.num_classes)
