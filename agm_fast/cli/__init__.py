"""The ``agm-fast`` command: ``agm-fast train``, ``agm-fast compare`` and ``agm-fast bench``.

``agm-fast train`` trains a multimodal classifier (one MLP encoder per view and a fusion head,
:class:`agm_fast.models.MultiViewModel`) with any registered balancing method, on the embedded UCI Multiple
Features data or on a user's ``.npz`` file, and writes ``metrics.csv``, ``summary.json``, ``curves.png`` and a
resumable checkpoint to ``--out``. It is a thin client of :mod:`agm_fast.methods`: the ``--method`` choices, each
method's options and their defaults come from the method registry, and the loop is
:func:`agm_fast.methods.training_step`. ``agm-fast bench`` runs the training-step benchmarks of AGM and OGM-GE
against their reference-style baselines. ``agm-fast compare`` runs every method on several seeds with the options
of ``train``, against joint training and the unimodal baselines (:mod:`agm_fast.cli.compare`).

The ``coeff_<view>`` columns of ``metrics.csv`` hold, per epoch, the median over its steps of the coefficients the
method reports for a view (agm ``c_m``; ogm / ogm_ge ``k_m``; opm the keep probability ``1 - q_m``; cggm
``rho * B_m``; mslr ``init_m * ratio_m``; mses 1 while the view trains and 0 once stopped; joint 1);
``coeff_mean_<view>`` holds the mean. The per-view accuracies (``val_acc_<view>``) are the accuracies of the
Shapley mono-modal outputs ``psi_m`` on the validation split, computed the same way for every method
(:func:`agm_fast.cli.report.evaluate`).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Optional, Sequence

import torch

from ..models import MultiViewModel
from .args import FUSIONS, METHODS, SUPPORT, CLIError, build_parser, explicit_dests, one_line
from .compare import compare as run_compare
from .report import evaluate
from .run import Diverged, Interrupted, Terminate, device_of, train

__all__ = [
    "main",
    "build_parser",
    "train",
    "bench",
    "evaluate",
    "MultiViewModel",
    "CLIError",
    "SUPPORT",
    "METHODS",
    "FUSIONS",
]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``agm-fast`` and ``python -m agm_fast``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success; 2 for a bad argument, unusable input or a failed write; 3 when training
        diverged; 130 on SIGINT and 143 on SIGTERM. Every failure prints one line on stderr.
    """
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        if args.command is None:
            raise CLIError("choose a command: agm-fast train, compare or bench ... (see agm-fast --help)")
        if args.command in ("train", "compare"):
            args._explicit = explicit_dests(args._options, argv)
            args._argv = argv
            threads = torch.get_num_threads()
            previous = _on_sigterm()
            try:
                train(args) if args.command == "train" else run_compare(args)
            finally:
                torch.set_num_threads(threads)
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
            return 0
        return bench(args)
    except Diverged as exc:
        print(f"agm-fast: diverged: {one_line(exc)}", file=sys.stderr)
        return 3
    except Interrupted as exc:
        print(f"agm-fast: {one_line(exc)}", file=sys.stderr)
        return exc.status
    except CLIError as exc:
        print(f"agm-fast: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agm-fast: interrupted", file=sys.stderr)
        return 130


def _raise_terminate(signum, frame):
    raise Terminate()


def _on_sigterm():
    """Make SIGTERM unwind the run like SIGINT (only possible from the main thread); returns the old handler."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminate)
    except ValueError:
        return None


def bench(args: argparse.Namespace) -> int:
    """Run the training-step benchmarks (``agm-fast bench``); returns the exit status."""
    device = device_of(args.device)
    names = {"agm": "bench_agm_step", "ogm_ge": "bench_ogm_ge"}
    chosen = [args.only] if args.only else ["agm", "ogm_ge"]
    modules = []
    for key in chosen:
        name = f"agm_fast.benchmarks.{names[key]}"
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise CLIError(f"the benchmark module {name} is not importable ({one_line(exc)})") from None
        if not hasattr(modules[-1], "main"):
            raise CLIError(f"the benchmark module {name} has no main(argv)")
    argv = ["--device", device.type] + (["--quick"] if args.quick else [])
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}")
        argv += ["--threads", str(args.threads)]
    if args.out is not None:
        argv += ["--out", args.out]
    if args.no_save:
        argv.append("--no-save")
    status = 0
    for mod in modules:
        rc = mod.main(argv)
        status = status or int(rc or 0)
    return status
