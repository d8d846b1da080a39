"""The ``agm-fast`` command: ``agm-fast train``, ``agm-fast compare`` and ``agm-fast bench``.

``agm-fast train`` trains a multimodal classifier (:class:`agm_fast.models.MultiViewModel`) with any registered
method on the embedded UCI Multiple Features data or a user's ``.npz`` file, and writes ``metrics.csv``,
``summary.json``, ``curves.png`` and a resumable checkpoint to ``--out``. The ``--method`` choices and each method's
options and defaults come from the methods' declarations, and the loop is :func:`agm_fast.methods.training_step`.
``agm-fast compare`` runs methods on several seeds against joint training and the unimodal baselines
(:mod:`agm_fast.cli.compare`). ``agm-fast bench`` runs the training-step benchmarks. What each column of
``metrics.csv`` means is in ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Optional, Sequence

from .args import FUSIONS, METHODS, SUPPORT, CLIError, build_parser, explicit_dests, one_line

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
        # Only a command that runs loads torch: --help and argument errors answer before this.
        import torch

        from .compare import compare as run_compare
        from .run import train

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
    except CLIError as exc:
        # A run's own endings (loaded with the run, so never before it started).
        run = sys.modules.get(f"{__name__}.run")
        if run is not None and isinstance(exc, run.Diverged):
            print(f"agm-fast: diverged: {one_line(exc)}", file=sys.stderr)
            return 3
        if run is not None and isinstance(exc, run.Interrupted):
            print(f"agm-fast: {one_line(exc)}", file=sys.stderr)
            return exc.status
        print(f"agm-fast: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agm-fast: interrupted", file=sys.stderr)
        return 130


def _raise_terminate(signum, frame):
    from .run import Terminate

    raise Terminate()


def _on_sigterm():
    """Make SIGTERM unwind the run like SIGINT (only possible from the main thread); returns the old handler."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminate)
    except ValueError:
        return None


def bench(args: argparse.Namespace) -> int:
    """Run the training-step benchmarks (``agm-fast bench``); returns the exit status."""
    from .run import device_of

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


_LAZY = {"train": ".run", "evaluate": ".report", "MultiViewModel": "..models"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'agm_fast.cli' has no attribute {name!r}")
