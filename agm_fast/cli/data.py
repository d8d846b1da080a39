"""The data side of ``agm-fast train``: views, the embedded or user data, the output folder and the batches."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import List, Optional

import torch
from torch import Tensor

from .. import data as data_mod
from .args import DEFAULT_VIEWS, CLIError

__all__ = ["batches", "load_data", "prepare_out"]


def _parse_views(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    views = [v.strip() for v in text.split(",") if v.strip()]
    if len(views) < 2:
        raise CLIError(f"--views needs at least 2 views (M >= 2), got {len(views)}: {text!r}")
    if len(set(views)) != len(views):
        raise CLIError(f"--views must not repeat a view, got {text!r}")
    return views


def load_data(args: argparse.Namespace) -> data_mod.MultiViewData:
    from . import synthetic as synthetic_cli

    synthetic_cli.check_unused(args)
    views = _parse_views(args.views)
    if args.data == synthetic_cli.NAME:
        return synthetic_cli.load(args, views)
    if args.data is None:
        views = views or DEFAULT_VIEWS.split(",")
        unknown = [v for v in views if v not in data_mod.MFEAT_VIEWS]
        if unknown:
            raise CLIError(f"--views: unknown view {unknown[0]!r}; choose from {','.join(data_mod.MFEAT_VIEWS)}")
        return data_mod.load_mfeat(views)
    try:
        data = data_mod.load_npz(args.data, views)
    except (OSError, ValueError, TypeError) as exc:
        raise CLIError(f"--data: {exc}") from None
    if len(data.names) < 2:
        raise CLIError(f"--data: {args.data!r} holds {len(data.names)} view (x_{data.names[0]}); M >= 2 needed")
    if data.num_classes < 2:
        raise CLIError(f"--data: y of {args.data!r} holds a single class; at least 2 are needed")
    return data


# What a finished or running agm-fast run leaves in its folder.
RUN_FILES = ("checkpoint.pt", "metrics.csv", "summary.json")
LOCK_NAME = ".agm-fast.lock"


def prepare_out(path: str, resume: bool, overwrite: bool):
    """Create ``--out``, take its lock, and refuse to replace a run that is already there.

    Returns:
        The :class:`RunLock`; keep it for the whole run and close it at the end (the lock file goes with it, and so
        does the folder if this run created it and wrote nothing into it).
    """
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".agm-fast-write-test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise CLIError(f"--out {path!r} is not a writable folder ({exc.strerror or exc})") from None
    lock = RunLock(path, _lock(path), created)
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(path, name))]
    if existing and not resume and not overwrite:
        lock.close()
        raise CLIError(
            f"--out {path!r} already holds a run ({', '.join(existing)}); continue it with --resume, or replace it "
            "with --overwrite"
        )
    return lock


class RunLock:
    """The run's hold on ``--out``: closing it removes the lock file (and the folder, if this run created it and it
    is still empty)."""

    def __init__(self, path: str, handle, created: bool) -> None:
        self.path, self.handle, self.created = path, handle, created

    def close(self) -> None:
        if self.handle is None:
            return
        # Removed while still held, so no other run can take a lock on the file being removed.
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.path, LOCK_NAME))
        self.handle.close()
        self.handle = None
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)  # only an empty folder goes


def _lock(path: str):
    """An exclusive lock on the run folder, so that a second run into the same --out stops with one line."""
    lock_path = os.path.join(path, LOCK_NAME)
    fh = open(lock_path, "a+")
    try:
        import fcntl
    except ImportError:
        # No fcntl (Windows): runs are not protected from each other there.
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "unknown"
        fh.close()
        raise CLIError(
            f"--out {path!r} is in use by another agm-fast run (pid {owner}); wait for it to finish or choose "
            "another --out"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def batches(n: int, batch_size: int, generator: torch.Generator) -> List[Tensor]:
    perm = torch.randperm(n, generator=generator)
    chunks = list(torch.split(perm, batch_size))
    # A trailing batch of one sample cannot go through BatchNorm in train mode; it is left out of that epoch.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()
    return chunks
