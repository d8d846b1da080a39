"""The data side of ``agm-fast train``: views, the embedded or user data, the output folder and the batches."""

from __future__ import annotations

import argparse
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
    views = _parse_views(args.views)
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


def prepare_out(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".agm-fast-write-test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise CLIError(f"--out {path!r} is not a writable folder ({exc.strerror or exc})") from None


def batches(n: int, batch_size: int, generator: torch.Generator) -> List[Tensor]:
    perm = torch.randperm(n, generator=generator)
    chunks = list(torch.split(perm, batch_size))
    # A trailing batch of one sample cannot go through BatchNorm in train mode; it is left out of that epoch.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()
    return chunks
