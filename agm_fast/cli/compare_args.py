"""The ``agm-fast compare`` subcommand's parser (no torch: ``--help`` answers without it)."""

from __future__ import annotations

import argparse

from .catalog import entries

__all__ = ["OWN", "add_parser"]

# The comparison's own options; the other options of ``agm-fast train`` are taken over unchanged.
OWN = ("method", "modulation", "seed", "out", "resume", "overwrite", "no_plot", "probe", "threads", "help")


def add_parser(sub, train_parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``sub``, with every option of ``train_parser`` but those in ``OWN``."""
    names = ",".join(e.name for e in entries())
    c = sub.add_parser(
        "compare",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compare the balancing methods on your data (several seeds, joint and unimodal baselines)",
        description=(
            "Train every method on every seed with the options of agm-fast train, plus each view alone and their "
            "ensemble, and write compare.md, compare.csv and compare.png to --out: fused test accuracy (mean ± std "
            "over seeds, per-seed difference to joint), each view's linear-probe accuracy against its unimodal "
            "ceiling, and the step time relative to joint. See docs/compare.md."
        ),
        epilog=(
            "examples:\n"
            "  agm-fast compare --data synthetic --epochs 30 --jobs 2     # every method, seeds 0-4\n"
            "  agm-fast compare --methods joint,agm,ogm_ge --seeds 0,1,2 --views fac,zer --out cmp\n"
            "  agm-fast compare --data feats.npz --out cmp --resume       # finish an interrupted grid\n"
        ),
    )
    g = c.add_argument_group("grid")
    g.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default: every registered one, {names}); joint always runs")
    g.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    g.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (default 1)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    g.add_argument("--timing-rounds", dest="timing_rounds", type=int, default=5,
                   help="rounds of the interleaved step-time measurement (default 5; 0 skips it)")
    g.add_argument("--timing-steps", dest="timing_steps", type=int, default=20,
                   help="training steps per method and round (default 20)")
    g.add_argument("--out", default="agm-fast-compare", help="output folder (default ./agm-fast-compare)")
    g.add_argument("--resume", action="store_true", help="finish the grid in --out, skipping its finished runs")
    g.add_argument("--overwrite", action="store_true", help="replace the comparison that --out already holds")
    g.add_argument("--no-plot", dest="no_plot", action="store_true", help="do not draw compare.png")
    for group in train_parser._action_groups:
        actions = [a for a in group._group_actions if a.dest not in OWN and a.option_strings]
        if not actions:
            continue
        copy = c.add_argument_group(group.title, group.description)
        for action in actions:
            copy._add_action(action)
    c.set_defaults(
        _shared=[a.dest for g in train_parser._action_groups for a in g._group_actions
                 if a.dest not in OWN and a.option_strings],
        _options={opt: a.dest for a in c._actions for opt in a.option_strings},
    )
    return c
