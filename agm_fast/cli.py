"""The ``agm-fast`` command: ``agm-fast train`` and ``agm-fast bench``.

``agm-fast train`` trains a multimodal classifier (one MLP encoder per view and a fusion head) with one of the
balancing methods, on the embedded UCI Multiple Features data or on a user's ``.npz`` file, and writes
``metrics.csv``, ``summary.json``, ``curves.png`` and a resumable checkpoint to ``--out``. ``agm-fast bench`` runs
the training-step benchmarks of AGM and OGM-GE against their reference-style baselines.

Method / fusion support (``--method`` x ``--fusion``):

========  ======  ===  ===  =====  ==========
method    concat  sum  mlp  gated  film
========  ======  ===  ===  =====  ==========
joint     yes     yes  yes  yes    yes
agm       yes     yes  yes  yes    yes
ogm       yes     yes  z    z      z
ogm_ge    yes     yes  z    z      z
opm       yes     yes  z    z      z
cggm      slice   no   w    w      w, 2 views
mslr      yes     yes  yes  yes    yes
mses      yes     yes  yes  yes    yes
========  ======  ===  ===  =====  ==========

- ``z``: the per-modality logits that OGM scores (and OPM's drop probabilities) come from zero-out, the head run
  with the other views' features set to zero (the OGM-GE maintainers' recommendation); they are exact only for the
  additive heads (concat: weight slice plus ``b / M``; sum: ``fc_m``).
- cggm compares each per-modality head's output layer ``[C, d]`` with the fusion output layer: ``slice``, the
  concat layer's column block of that view; ``w``, the whole last layer of the head (``[C, d]``, the reference's
  models); the sum head has one output layer per view and nothing to compare with, so it is refused, and film's
  output layer is ``[C, d]`` only for two views.
- agm mutes a view by zeroing its input (the reference), which any head supports; mslr and mses only rescale or
  stop encoder gradients.

The ``coeff_<view>`` columns of ``metrics.csv`` hold, per epoch, the median over its steps of the factor each
method applies to a view: agm ``c_m``; ogm / ogm_ge ``k_m``; opm the keep probability ``1 - q_m`` of a dropping
step; cggm ``rho * B_m``; mslr ``init_m * ratio_m``; mses 1 while the view trains and 0 once it is stopped; joint 1.
``coeff_mean_<view>`` holds the mean, which also shows rare extreme steps (CGGM's near-zero sums of metric changes).
The per-view accuracies (``val_acc_<view>``) are the accuracies of the Shapley mono-modal outputs ``psi_m`` on the
validation split, computed the same way for every method (:func:`evaluate`).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as data_mod
from . import reference as ref

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

METHODS = ("joint", "agm", "ogm", "ogm_ge", "opm", "cggm", "mslr", "mses")
FUSIONS = ("concat", "sum", "mlp", "gated", "film")
DEFAULT_VIEWS = "fac,zer"

# Which fusion heads each method supports (see the module docstring). cggm compares each per-modality head's output
# layer [C, d] with one fusion output layer: the concat head's column slice, or the whole [C, d] last layer of the
# mlp, gated and (two views only) film heads; the sum head has M output layers and nothing to compare with.
SUPPORT: Dict[str, Tuple[str, ...]] = {m: FUSIONS for m in METHODS}
SUPPORT["cggm"] = ("concat", "mlp", "gated", "film")

# Switches that only mean something for some methods; giving one to another method is an error, not a no-op.
_APPLIES = {
    "strategy": ("agm",),
    "masked_mode": ("agm",),
    "shapley": ("agm",),
    "permutations": ("agm",),
    "cap": ("agm",),
    "hold_last": ("agm",),
    "continuous": ("ogm", "ogm_ge"),
    "conv_only": ("ogm", "ogm_ge"),
    "q_base": ("opm",),
    "p_exe": ("opm",),
    "rho": ("cggm",),
    "direction": ("cggm",),
    "bound": ("cggm",),
    "patience": ("mses",),
    "lr_scales": ("mslr",),
    "alpha": ("agm", "ogm", "ogm_ge"),
    "lam": ("opm", "cggm"),
    "modulation_starts": ("agm", "ogm", "ogm_ge", "opm"),
    "modulation_ends": ("agm", "ogm", "ogm_ge", "opm"),
}

_DEFAULT_ALPHA = {"agm": 1.0, "ogm": 0.8, "ogm_ge": 0.8}
_DEFAULT_LAM = {"opm": 0.5, "cggm": 0.1}

# The configuration that a resumed run must share with its checkpoint (everything but --epochs, --out, --device).
_RESUME_KEYS = (
    "method",
    "fusion",
    "strategy",
    "masked_mode",
    "shapley",
    "permutations",
    "cap",
    "hold_last",
    "continuous",
    "conv_only",
    "alpha",
    "lam",
    "q_base",
    "p_exe",
    "rho",
    "direction",
    "bound",
    "patience",
    "lr_scales",
    "modulation_starts",
    "modulation_ends",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "hidden",
    "feature_dim",
    "seed",
    "data_signature",
)
# What --resume takes from the checkpoint when the command line does not give it again.
_RESTORED = tuple(k for k in _RESUME_KEYS if k != "data_signature") + (
    "views",
    "data",
    "epochs",
    "device",
    "threads",
    "no_plot",
)
# An explicit alias stands for its target option.
_ALIASES = {"modulation": "method", "fusion_method": "fusion"}
_CHECKPOINT_FORMAT = "agm_fast.cli.checkpoint/1"
_UNSET = object()
_TIME_COLUMNS = ("step_ms", "epoch_s")


_TRAIN_EPILOG = """\
method x fusion support:
  joint, agm, mslr, mses   every head
  ogm, ogm_ge, opm         every head; per-view logits exact for concat and sum, by zero-out for mlp, gated, film
  cggm                     concat, mlp, gated; film with 2 views; not sum (no single output layer to compare with)

coeff_<view> in metrics.csv (median over the epoch's steps; coeff_mean_<view> is the mean):
  agm c_m, ogm/ogm_ge k_m, opm keep probability 1 - q_m, cggm rho * B_m, mslr init_m * ratio_m,
  mses 1 while the view trains and 0 once stopped, joint 1.
val_acc_<view>: accuracy of the view's Shapley mono-modal output psi_m on the validation split (every method).

examples:
  agm-fast train                                   # agm on fac + zer, 30 epochs, about 15 s on 2 CPU cores
  agm-fast train --method ogm_ge --views pix,mor --out runs/ogm
  agm-fast train --data feats.npz --epochs 50      # x_<name> [N, d] arrays and y [N] labels
  agm-fast train --out runs/ogm --resume --epochs 60
"""


class CLIError(Exception):
    """A bad argument or unusable input; ``main`` prints it as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise CLIError(message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    """The ``agm-fast`` argument parser (subcommands ``train`` and ``bench``)."""
    parser = _Parser(
        prog="agm-fast",
        allow_abbrev=False,
        description="Balanced multimodal training (AGM, OGM/OGM-GE, OPM, CGGM, MSLR, MSES) and its benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser(
        "train",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_TRAIN_EPILOG,
        help="train a multimodal classifier with a balancing method",
        description=(
            "Train one MLP encoder per view and a fusion head with a balancing method, on the embedded UCI "
            "Multiple Features digits (default) or on --data FILE.npz. Writes metrics.csv, summary.json, "
            "curves.png and checkpoint.pt to --out. Epochs are numbered from 1 in the output; the modulation "
            "window (--modulation_starts/--modulation_ends) counts epochs from 0, inclusive, as the reference does."
        ),
    )
    g = t.add_argument_group("data")
    g.add_argument(
        "--views",
        default=None,
        help=f"comma-separated views, 2 to 6 of {','.join(data_mod.MFEAT_VIEWS)} (default {DEFAULT_VIEWS}; with "
        "--data: the x_<name> arrays of the file, default all of them)",
    )
    g.add_argument(
        "--data",
        default=None,
        metavar="FILE.npz",
        help="your own data: arrays x_<name> [N, d] (one per view) and y [N] (int class indices 0..C-1)",
    )
    g = t.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default=None, help="balancing method (default agm)")
    g.add_argument(
        "--modulation",
        choices=("Normal", "OGM", "OGM_GE"),
        default=None,
        help="the OGM-GE reference's flag: Normal = --method joint, OGM = ogm, OGM_GE = ogm_ge",
    )
    g.add_argument("--fusion", choices=FUSIONS, default=None, help="fusion head (default concat)")
    g.add_argument("--fusion_method", dest="fusion_method", choices=FUSIONS, default=None,
                   help="the reference's name for --fusion")
    g.add_argument("--alpha", type=float, default=None,
                   help="agm/ogm/ogm_ge: modulation strength (default: agm 1.0, ogm/ogm_ge 0.8)")
    g.add_argument("--modulation_starts", "--modulation-starts", dest="modulation_starts", type=int, default=None,
                   metavar="EPOCH",
                   help="first epoch (from 0) of the modulation window (default 0)")
    g.add_argument("--modulation_ends", "--modulation-ends", dest="modulation_ends", type=int, default=None,
                   metavar="EPOCH",
                   help="last epoch (from 0, inclusive) of the modulation window (default: the whole run)")
    g.add_argument("--strategy", choices=("auto", "sequential", "batched", "factorized"), default=None,
                   help="agm: how the subset outputs f(S) are evaluated (default auto)")
    g.add_argument("--masked-mode", dest="masked_mode", choices=("eval", "train"), default=None,
                   help="agm: mode of the masked passes (default eval, as the reference)")
    g.add_argument("--shapley", choices=("reference", "exact", "sampled"), default=None,
                   help="agm: mono-modal outputs psi (reference), exact phi, or permutation-sampled")
    g.add_argument("--permutations", type=int, default=None, help="agm --shapley sampled: permutations per step")
    g.add_argument("--cap", type=_cap_type, default=_UNSET,
                   help="agm: upper bound on rbar - r, or 'none' (default 10)")
    g.add_argument("--hold-last", dest="hold_last", action="store_true", default=None,
                   help="agm: keep the last coefficients outside the window (the reference) instead of 1")
    g.add_argument("--continuous", action="store_true", default=None,
                   help="ogm/ogm_ge: relu(rho - 1) in the coefficient (the code before May 2022)")
    g.add_argument("--conv-only", dest="conv_only", action="store_true", default=None,
                   help="ogm/ogm_ge: modulate only 4-D (conv) weights, as the reference")
    g.add_argument("--lam", type=float, default=None,
                   help="opm: drop-probability slope (default 0.5); cggm: direction-loss weight (default 0.1)")
    g.add_argument("--q-base", dest="q_base", type=float, default=None, help="opm: base drop probability (0.5)")
    g.add_argument("--p-exe", dest="p_exe", type=float, default=None, help="opm: probability a step drops (0.7)")
    g.add_argument("--rho", type=float, default=None, help="cggm: gradient magnitude scale (default 1.3)")
    g.add_argument("--direction", choices=("weights", "gradient"), default=None,
                   help="cggm: cosine between head weights (the reference) or gradients (the paper)")
    g.add_argument("--bound", type=float, default=None,
                   help="cggm: clamp every B_m to [-bound, bound] (default: no bound, the reference)")
    g.add_argument("--patience", type=int, default=None, help="mses: epochs without improvement before a stop (5)")
    g.add_argument("--lr-scales", dest="lr_scales", type=_float_list, default=None,
                   help="mslr: initial gradient scale per view, comma-separated (default 1 for every view)")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="batch size (default 64)")
    g.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=1e-4, help="SGD weight decay (1e-4)")
    g.add_argument("--hidden", type=int, default=128, help="hidden width of each MLP encoder (default 128)")
    g.add_argument("--feature-dim", dest="feature_dim", type=int, default=64,
                   help="output width of each encoder (default 64)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the data order")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the default models are small, and extra threads cost more "
                   "than they gain, badly so on a busy machine)")
    g.add_argument("--out", default="agm-fast-run", help="output folder (default ./agm-fast-run)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    g.add_argument("--no-plot", dest="no_plot", action="store_true", help="do not draw curves.png")

    t.set_defaults(_options={opt: a.dest for a in t._actions for opt in a.option_strings})

    b = sub.add_parser(
        "bench",
        allow_abbrev=False,
        help="benchmark the AGM and OGM-GE training steps against the reference-style baselines",
        description="Run agm_fast.benchmarks.bench_agm_step and bench_ogm_ge on the current device and print "
        "their tables.",
    )
    b.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    b.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    b.add_argument("--only", choices=("agm", "ogm_ge"), default=None, help="run only one of the two benchmarks")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    b.add_argument("--no-save", dest="no_save", action="store_true",
                   help="do not append the results to benchmarks/results/")
    return parser


def _cap_type(text: str) -> Optional[float]:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
    return value


def _float_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``agm-fast`` and ``python -m agm_fast``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a bad argument or unusable input (one line on stderr), 130 when
        interrupted.
    """
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        if args.command == "train":
            args._explicit = _explicit_dests(args._options, argv)
        if args.command is None:
            raise CLIError("choose a command: agm-fast train ... or agm-fast bench ... (see agm-fast --help)")
        if args.command == "train":
            threads = torch.get_num_threads()
            try:
                train(args)
            finally:
                torch.set_num_threads(threads)
            return 0
        return bench(args)
    except CLIError as exc:
        print(f"agm-fast: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agm-fast: interrupted (continue a training run with --resume)", file=sys.stderr)
        return 130


def _explicit_dests(options: Dict[str, str], argv: Sequence[str]) -> set:
    """The destinations of the options that ``argv`` gives explicitly (aliases count as their targets)."""
    given = set()
    for token in argv:
        name = token.split("=", 1)[0]
        if name in options:
            dest = options[name]
            given.add(dest)
            if dest in _ALIASES:
                given.add(_ALIASES[dest])
    return given


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def bench(args: argparse.Namespace) -> int:
    """Run the training-step benchmarks (``agm-fast bench``); returns the exit status."""
    device = _device(args.device)
    names = {"agm": "bench_agm_step", "ogm_ge": "bench_ogm_ge"}
    chosen = [args.only] if args.only else ["agm", "ogm_ge"]
    modules = []
    for key in chosen:
        name = f"agm_fast.benchmarks.{names[key]}"
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise CLIError(f"the benchmark module {name} is not importable ({_one_line(exc)})") from None
        if not hasattr(modules[-1], "main"):
            raise CLIError(f"the benchmark module {name} has no main(argv)")
    argv = ["--device", device.type] + (["--quick"] if args.quick else [])
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}")
        argv += ["--threads", str(args.threads)]
    if args.no_save:
        argv.append("--no-save")
    status = 0
    for mod in modules:
        rc = mod.main(argv)
        status = status or int(rc or 0)
    return status


def _encoder(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out), nn.ReLU()
    )


class MultiViewModel(nn.Module):
    """One MLP encoder per view and a fusion head: ``fusion(enc_0(x_0), ..., enc_{M-1}(x_{M-1}))``.

    Each encoder is ``Linear(d_m, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, feature_dim) -> ReLU``.

    Args:
        dims: input dimensions ``d_m`` of the views.
        num_classes: C.
        fusion: ``"concat"``, ``"sum"``, ``"mlp"``, ``"gated"`` or ``"film"`` (see :mod:`agm_fast.fusion`).
        hidden: hidden width of each encoder.
        feature_dim: output width of each encoder.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, fusion: str, hidden: int = 128, feature_dim: int = 64):
        super().__init__()
        from .fusion import build_fusion

        self.encoders = nn.ModuleList(_encoder(d, hidden, feature_dim) for d in dims)
        # The MLP head's hidden width equals the feature width, so that its output layer is [C, feature_dim] like
        # every other head's (CGGM compares it with its per-modality heads).
        kwargs = {"hidden": feature_dim} if fusion == "mlp" else {}
        self.fusion = build_fusion(fusion, [feature_dim] * len(dims), num_classes, **kwargs)

    def features(self, *xs: Tensor) -> List[Tensor]:
        """Per-view features: M tensors ``[B, feature_dim]`` from M inputs ``[B, d_m]``."""
        return [enc(x) for enc, x in zip(self.encoders, xs)]

    def forward(self, *xs: Tensor) -> Tensor:
        """Logits ``[B, C]``."""
        return self.fusion(*self.features(*xs))


def _step_stats(loss: Tensor, logits: Tensor, y: Tensor, coeffs) -> Tuple[Tensor, Tensor, int, Tensor]:
    coeffs = torch.as_tensor(coeffs).detach().to(device=y.device, dtype=torch.float32).reshape(-1)
    return loss.detach(), (logits.detach().argmax(-1) == y).sum(), int(y.shape[0]), coeffs


class _Method:
    """One training step of a method, its per-modality coefficients and its state.

    ``step`` runs forward, backward and the optimizer step on one batch and returns
    ``(loss [], n_correct [], n_rows, coeffs [M])``, all detached: the batch's mean loss, how many of its rows the
    fused logits classify correctly, how many rows it trained on and the coefficients applied in that step.
    """


    def __init__(self, model: MultiViewModel, args: argparse.Namespace, num_modalities: int):
        self.model = model
        self.args = args
        self.M = num_modalities
        self.window = (args.modulation_starts, args.modulation_ends)

    def in_window(self, epoch: int) -> bool:
        start, end = self.window
        start = 0 if start is None else start
        return start <= epoch and (end is None or epoch <= end)

    def modules(self) -> List[nn.Module]:
        """The modules to move to the device; their parameters are what the main optimizer updates."""
        return [self.model]

    def step(self, xs: List[Tensor], y: Tensor, epoch: int, opt: torch.optim.Optimizer):
        logits = self.model(*xs)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return _step_stats(loss, logits, y, torch.ones(self.M, device=y.device))

    def end_epoch(self, epoch: int, val: dict) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class _AGM(_Method):
    """AGM: the loss logits come from :class:`agm_fast.AGM`, whose gradient is already modulated."""

    def __init__(self, model, args, num_modalities):
        super().__init__(model, args, num_modalities)
        from .agm import AGM

        start, end = args.modulation_starts, args.modulation_ends
        window = None if start == 0 and end is None else (start, 1 << 30 if end is None else end)
        kwargs = dict(
            encoders=list(model.encoders),
            fusion=model.fusion,
            alpha=args.alpha,
            cap=args.cap,
            window=window,
            hold_last=args.hold_last,
            strategy=args.strategy,
            masked_mode=args.masked_mode,
            shapley=args.shapley,
            seed=args.seed,
        )
        if args.permutations is not None:
            kwargs["num_permutations"] = args.permutations
        self.agm = AGM(**kwargs)

    def modules(self):
        return [self.model, self.agm]

    def step(self, xs, y, epoch, opt):
        res = self.agm(*xs, target=y, epoch=epoch)
        loss = F.cross_entropy(res.logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return _step_stats(loss, res.logits, y, res.coeffs)

    def state_dict(self):
        return self.agm.state_dict()

    def load_state_dict(self, state):
        self.agm.load_state_dict(state)


class _OGM(_Method):
    """OGM / OGM-GE: gradients of each encoder scaled (and noised) between backward and the optimizer step."""

    def __init__(self, model, args, num_modalities):
        super().__init__(model, args, num_modalities)
        from .ogm import OGMGE

        self.ogm = OGMGE(
            list(model.encoders),
            alpha=args.alpha,
            mode="OGM" if args.method == "ogm" else "OGM_GE",
            window=(args.modulation_starts, math.inf if args.modulation_ends is None else args.modulation_ends),
            conv_only=args.conv_only,
            continuous=args.continuous,
            seed=args.seed,
        )

    def step(self, xs, y, epoch, opt):
        feats = self.model.features(*xs)
        logits = self.model.fusion(*feats)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        coeffs = self.ogm.step_from_features(y, self.model.fusion, feats, epoch=epoch)
        opt.step()
        return _step_stats(loss, logits, y, coeffs)

    def state_dict(self):
        return self.ogm.state_dict()

    def load_state_dict(self, state):
        self.ogm.load_state_dict(state)


class _OPM(_Method):
    """OPM: per-sample feature dropping of the dominant views, scored on the detached head."""

    def __init__(self, model, args, num_modalities):
        super().__init__(model, args, num_modalities)
        from .opm import OPM

        self.opm = OPM([args.feature_dim] * num_modalities, q_base=args.q_base, lam=args.lam, p_exe=args.p_exe,
                       seed=args.seed)

    def modules(self):
        return [self.model, self.opm]

    def step(self, xs, y, epoch, opt):
        from .functional import ogm_scores
        from .fusion import per_modality_logits
        from .opm import opm_loss

        feats = self.model.features(*xs)
        if self.in_window(epoch):
            # The scores come from the head on detached features (the journal's detached copy of the head).
            with torch.no_grad():
                scores, _ = ogm_scores(per_modality_logits(self.model.fusion, [h.detach() for h in feats]), y, 0.0)
            q = self.opm.drop_probs(scores)
            feats, weight = self.opm(*feats, drop_probs=q)
        else:
            q = torch.zeros(self.M, device=y.device)
            weight = torch.ones(y.shape[0], device=y.device)
        logits = self.model.fusion(*feats)
        loss = opm_loss(logits, y, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        kept = weight > 0
        n_rows = weight.sum()
        correct = ((logits.detach().argmax(-1) == y) & kept).sum()
        return loss.detach(), correct, n_rows, (1 - q).float()

    def state_dict(self):
        return self.opm.state_dict()

    def load_state_dict(self, state):
        self.opm.load_state_dict(state)


def _fusion_output_layer(fusion: nn.Module) -> nn.Linear:
    # The last Linear of every head of agm_fast.fusion is its output layer (concat: fc, mlp: net[2], gated and
    # film: fc_out).
    return [m for m in fusion.modules() if isinstance(m, nn.Linear)][-1]


class _CGGM(_Method):
    """CGGM: per-view heads on detached features; encoder gradients scaled by rho B_m, direction loss term."""

    def __init__(self, model, args, num_modalities):
        super().__init__(model, args, num_modalities)
        from functools import partial

        from .cggm import CGGM

        num_classes = _fusion_output_layer(model.fusion).weight.shape[0]
        # The heads learn with the main optimizer's kind (SGD with momentum) at half its learning rate (reference).
        self.cggm = CGGM(
            list(model.encoders),
            _fusion_output_layer(model.fusion),
            feature_dims=[args.feature_dim] * num_modalities,
            num_classes=num_classes,
            rho=args.rho,
            lam=args.lam,
            direction=args.direction,
            head_optimizer=partial(torch.optim.SGD, momentum=args.momentum),
            head_lr=args.lr / 2,
            bound=args.bound,
        )
        self._params = [p for p in model.parameters() if p.requires_grad]

    def modules(self):
        # The heads are built on the model's device and learn with their own optimizer, not the main one.
        return [self.model]

    def step(self, xs, y, epoch, opt):
        feats = self.model.features(*xs)
        logits = self.model.fusion(*feats)
        task = F.cross_entropy(logits, y)
        loss = task + self.cggm.loss_term(task if self.args.direction == "gradient" else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        coeffs = self.cggm.observe(feats, y)
        self.cggm.scale_gradients_()
        # The reference's only guard against a near-zero sum of metric changes.
        torch.nn.utils.clip_grad_norm_(self._params, 0.8)
        opt.step()
        return _step_stats(task, logits, y, self.cggm.rho * coeffs)

    def state_dict(self):
        return self.cggm.state_dict()

    def load_state_dict(self, state):
        self.cggm.load_state_dict(state)


class _MSLR(_Method):
    """MSLR: each encoder's gradients scaled by init_m * ratio_m, the ratio following its validation accuracy."""

    def __init__(self, model, args, num_modalities):
        super().__init__(model, args, num_modalities)
        from .mslr import MSLR

        self.mslr = MSLR(list(model.encoders), init_lr_scales=args.lr_scales)

    def step(self, xs, y, epoch, opt):
        logits = self.model(*xs)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.mslr.scale_gradients_()
        opt.step()
        return _step_stats(loss, logits, y, self.mslr.scales)

    def end_epoch(self, epoch, val):
        # The per-modality accuracy MSLR follows: the Shapley mono-modal accuracy on the validation split.
        self.mslr.epoch_end(val["mono_acc"])

    def state_dict(self):
        return self.mslr.state_dict()

    def load_state_dict(self, state):
        self.mslr.load_state_dict(state)


class _MSES(_Method):
    """MSES: an encoder whose smoothed validation loss stops improving is restored and frozen."""

    def __init__(self, model, args, num_modalities):
        super().__init__(model, args, num_modalities)
        from .mslr import MSES

        self.mses = MSES(list(model.encoders), patience=args.patience)

    def step(self, xs, y, epoch, opt):
        logits = self.model(*xs)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.mses.scale_gradients_()
        opt.step()
        return _step_stats(loss, logits, y, [0.0 if s else 1.0 for s in self.mses.stopped])

    def end_epoch(self, epoch, val):
        # The per-modality loss MSES watches: the cross-entropy of the Shapley mono-modal output on validation.
        self.mses.epoch_end(val["mono_loss"])

    def state_dict(self):
        return self.mses.state_dict()

    def load_state_dict(self, state):
        self.mses.load_state_dict(state)


_METHOD_CLASSES = {
    "joint": _Method,
    "agm": _AGM,
    "ogm": _OGM,
    "ogm_ge": _OGM,
    "opm": _OPM,
    "cggm": _CGGM,
    "mslr": _MSLR,
    "mses": _MSES,
}


def _resolve(args: argparse.Namespace) -> None:
    """Fill method defaults and check every argument; raises :class:`CLIError` with a one-line message."""
    if args.modulation is not None:
        routed = {"Normal": "joint", "OGM": "ogm", "OGM_GE": "ogm_ge"}[args.modulation]
        if args.method is not None and args.method != routed:
            raise CLIError(f"--modulation {args.modulation} means --method {routed}, but --method {args.method} given")
        args.method = routed
    args.method = args.method or "agm"
    if args.fusion_method is not None:
        if args.fusion is not None and args.fusion != args.fusion_method:
            raise CLIError(f"--fusion {args.fusion} and --fusion_method {args.fusion_method} disagree")
        args.fusion = args.fusion_method
    args.fusion = args.fusion or "concat"
    if args.fusion not in SUPPORT[args.method]:
        raise CLIError(
            f"--method {args.method} does not support --fusion {args.fusion}; "
            f"supported: {', '.join(SUPPORT[args.method])}"
        )
    for key, methods in _APPLIES.items():
        if getattr(args, key) not in (None, _UNSET) and args.method not in methods:
            flag = "--" + key.replace("_", "-") if not key.startswith("modulation") else "--" + key
            raise CLIError(f"{flag} applies to --method {'/'.join(methods)}, not to --method {args.method}")
    for key, positive in (("epochs", True), ("batch_size", True), ("hidden", True), ("feature_dim", True)):
        if getattr(args, key) < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError(f"--lr must be a positive number, got {args.lr}")
    if not (0 <= args.momentum < 1) or args.weight_decay < 0:
        raise CLIError("--momentum must be in [0, 1) and --weight-decay >= 0")
    if args.alpha is not None and not (args.alpha >= 0 and math.isfinite(args.alpha)):
        raise CLIError(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if args.permutations is not None and (args.shapley != "sampled" or args.permutations < 1):
        raise CLIError("--permutations needs --shapley sampled and a value of at least 1")
    if args.patience is not None and args.patience < 0:
        raise CLIError(f"--patience must be >= 0, got {args.patience}")
    for key in ("q_base", "p_exe"):
        value = getattr(args, key)
        if value is not None and not 0 <= value <= 1:
            raise CLIError(f"--{key.replace('_', '-')} must be in [0, 1], got {value}")
    if args.alpha is None and args.method in _DEFAULT_ALPHA:
        args.alpha = _DEFAULT_ALPHA[args.method]
    if args.lam is None and args.method in _DEFAULT_LAM:
        args.lam = _DEFAULT_LAM[args.method]
    if args.cap is _UNSET:
        args.cap = 10.0 if args.method == "agm" else None
    if args.method == "agm":
        args.strategy = args.strategy or "auto"
        args.masked_mode = args.masked_mode or "eval"
        args.shapley = args.shapley or "reference"
        args.hold_last = bool(args.hold_last)
    if args.method in ("ogm", "ogm_ge"):
        args.continuous = bool(args.continuous)
        args.conv_only = bool(args.conv_only)
    if args.method == "opm":
        args.q_base = 0.5 if args.q_base is None else args.q_base
        args.p_exe = 0.7 if args.p_exe is None else args.p_exe
    if args.method == "cggm":
        args.rho = 1.3 if args.rho is None else args.rho
        args.direction = args.direction or "weights"
    if args.method == "mses":
        args.patience = 5 if args.patience is None else args.patience
    if args.method not in _APPLIES["modulation_starts"]:
        return
    args.modulation_starts = 0 if args.modulation_starts is None else args.modulation_starts
    if args.modulation_starts < 0:
        raise CLIError(f"--modulation_starts must be >= 0, got {args.modulation_starts}")
    if args.modulation_ends is not None and args.modulation_ends < args.modulation_starts:
        raise CLIError(
            f"--modulation_ends ({args.modulation_ends}) must not be before --modulation_starts "
            f"({args.modulation_starts})"
        )


def _parse_views(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    views = [v.strip() for v in text.split(",") if v.strip()]
    if len(views) < 2:
        raise CLIError(f"--views needs at least 2 views (M >= 2), got {len(views)}: {text!r}")
    if len(set(views)) != len(views):
        raise CLIError(f"--views must not repeat a view, got {text!r}")
    return views


def _load_data(args: argparse.Namespace) -> data_mod.MultiViewData:
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


def _prepare_out(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".agm-fast-write-test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise CLIError(f"--out {path!r} is not a writable folder ({exc.strerror or exc})") from None


def _batches(n: int, batch_size: int, generator: torch.Generator) -> List[Tensor]:
    perm = torch.randperm(n, generator=generator)
    chunks = list(torch.split(perm, batch_size))
    # A trailing batch of one sample cannot go through BatchNorm in train mode; it is left out of that epoch.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()
    return chunks


@torch.no_grad()
def evaluate(model: MultiViewModel, xs: Sequence[Tensor], y: Tensor, chunk: int = 32768) -> dict:
    """Fused and mono-modal (Shapley) accuracy and loss of ``model`` in eval mode.

    Every non-empty subset S of the views is evaluated with the muted views' inputs set to zero (after
    standardisation: the average training sample); ``psi_m = sum_S W[m, S] f(S)`` with the exact Shapley weights of
    :func:`agm_fast.reference.shapley_weights` (the reference variant, ``sum_m psi_m = f(A)``), whatever the method.

    Args:
        model: the model.
        xs: M tensors ``[N, d_m]``.
        y: ``[N]`` labels.
        chunk: at most this many rows (subsets x samples) per model call.

    Returns:
        dict with ``acc``, ``loss`` (floats) and ``mono_acc``, ``mono_loss`` (lists of M floats).
    """
    was_training = model.training
    model.eval()
    M = len(xs)
    masks = ref.subset_masks(M, "reference")
    full = masks.index(ref.full_mask(M))
    W = ref.shapley_weights(M, masks, torch.float32).to(y.device)
    step = max(1, chunk // len(masks))
    correct = torch.zeros((), device=y.device)
    loss = torch.zeros((), device=y.device)
    mono_correct = torch.zeros(M, device=y.device)
    mono_loss = torch.zeros(M, device=y.device)
    for start in range(0, y.shape[0], step):
        part = [x[start : start + step] for x in xs]
        yb = y[start : start + step]
        B = yb.shape[0]
        stacked = ref.subset_batch_ref(part, masks, None)
        subset_logits = model(*stacked).float().view(len(masks), B, -1)
        psi = ref.shapley_ref(subset_logits, W)
        fused = subset_logits[full]
        correct += (fused.argmax(-1) == yb).sum()
        loss += F.cross_entropy(fused, yb, reduction="sum")
        mono_correct += (psi.argmax(-1) == yb).sum(1)
        mono_loss += F.cross_entropy(psi.permute(1, 2, 0), yb.unsqueeze(1).expand(B, M), reduction="none").sum(0)
    model.train(was_training)
    n = y.shape[0]
    return {
        "acc": float(correct) / n,
        "loss": float(loss) / n,
        "mono_acc": (mono_correct.double() / n).tolist(),
        "mono_loss": (mono_loss.double() / n).tolist(),
    }


def _unimodal_concepts(splits, num_classes: int, args: argparse.Namespace, device: torch.device, epochs: int = 8):
    """Train one small unimodal model per view (own seed, own RNG stream) and return its encoder's features.

    The concept is the encoder output before its last ReLU: dense, so that ``cov(Y_test)`` is well conditioned
    (dead ReLU units would make it singular).

    Returns:
        per view ``(concept_val [N_val, feature_dim], concept_test [N_test, feature_dim], unimodal_test_acc)``.
    """
    train_s, val_s, test_s = splits
    out = []
    fork_devices = [device] if device.type == "cuda" else []
    for m in range(len(train_s.xs)):
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(args.seed * 1000 + 17 + m)
            enc = _encoder(train_s.xs[m].shape[1], args.hidden, args.feature_dim).to(device)
            head = nn.Linear(args.feature_dim, num_classes).to(device)
            params = list(enc.parameters()) + list(head.parameters())
            opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
            gen = torch.Generator().manual_seed(args.seed * 1000 + 17 + m)
            x, y = train_s.xs[m].to(device), train_s.y.to(device)
            for _ in range(epochs):
                for idx in _batches(len(y), 128, gen):
                    idx = idx.to(device)
                    loss = F.cross_entropy(head(enc(x[idx])), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            enc.eval()
            with torch.no_grad():
                pre_relu = enc[:-1]
                c_val = pre_relu(val_s.xs[m].to(device))
                c_test = pre_relu(test_s.xs[m].to(device))
                logits = head(torch.relu(c_test))
                acc = float((logits.argmax(-1) == test_s.y.to(device)).double().mean())
        out.append((c_val, c_test, acc))
    return out


def _competition_strength(model, splits, num_classes, args, device):
    """Competition strength per view (:func:`agm_fast.competition_strength`, SPEC 1.6).

    The fused feature is the concatenation of the encoder outputs (what the fusion head reads); the ridge is
    fitted on the validation split (held out from training) and evaluated on the test split.

    Returns:
        ``(strengths, unimodal_test_acc, note)``: M floats (or None when the test split is too small for the
        concept's covariance), the unimodal models' test accuracies, and why the strengths are missing (or None).
    """
    from .metrics import competition_strength

    _, val_s, test_s = splits
    concepts = _unimodal_concepts(splits, num_classes, args, device)
    unimodal_acc = [acc for _, _, acc in concepts]
    if len(test_s.y) <= args.feature_dim:
        note = f"the test split has {len(test_s.y)} rows, not more than the concept's {args.feature_dim} dims"
        return None, unimodal_acc, note
    model.eval()
    with torch.no_grad():
        f_val = torch.cat(model.features(*[x.to(device) for x in val_s.xs]), dim=1)
        f_test = torch.cat(model.features(*[x.to(device) for x in test_s.xs]), dim=1)
    d = competition_strength(f_val, [c for c, _, _ in concepts], f_test, [c for _, c, _ in concepts])
    return d.tolist(), unimodal_acc, None


def _columns(names: Sequence[str]) -> List[str]:
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    cols += [f"val_acc_{n}" for n in names] + [f"val_loss_{n}" for n in names] + [f"coeff_{n}" for n in names]
    cols += [f"coeff_mean_{n}" for n in names]
    return cols + list(_TIME_COLUMNS)


def _write_csv(path: str, names: Sequence[str], history: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_columns(names))
        writer.writeheader()
        for row in history:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def _plot(path: str, names: Sequence[str], history: List[dict], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(15, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_coef, ax_loss = fig.subplots(1, 3)
    ax_acc.plot(epochs, [r["val_acc"] for r in history], color="black", linewidth=2.2, label="fused")
    for n in names:
        ax_acc.plot(epochs, [r[f"val_acc_{n}"] for r in history], marker="o", markersize=3, label=f"{n} (Shapley)")
    ax_acc.set_title("Validation accuracy: fused and per modality")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(loc="best", fontsize=8, ncol=2 if len(names) > 3 else 1)
    for n in names:
        ax_coef.plot(epochs, [r[f"coeff_{n}"] for r in history], marker="o", markersize=3, label=n)
    ax_coef.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax_coef.set_title("Modulation coefficient per modality (epoch median)")
    ax_coef.set_xlabel("epoch")
    ax_coef.set_ylabel("coefficient")
    ax_coef.legend(loc="best", fontsize=8, ncol=2 if len(names) > 3 else 1)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train (fused)")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="validation (fused)")
    ax_loss.set_title("Loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend(loc="best", fontsize=8)
    for ax in (ax_acc, ax_coef, ax_loss):
        ax.grid(alpha=0.3)
    for ax in (ax_acc, ax_coef, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    # Fixed margins: tight_layout would cost as much as drawing the figure.
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.85, wspace=0.22)
    fig.savefig(path)


def _save_checkpoint(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CLIError(f"--resume: no checkpoint at {path!r} (train without --resume first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"--resume: checkpoint {path!r} is corrupt or unreadable ({type(exc).__name__})") from None
    required = ("format", "epoch", "args", "config", "model", "optimizer", "method", "torch_rng", "data_rng", "history")
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT or any(k not in ckpt for k in required):
        raise CLIError(f"--resume: {path!r} is not an agm-fast training checkpoint (corrupt or another format)")
    return ckpt


def _check_resume(ckpt: dict, config: dict, epochs: int) -> None:
    for key in _RESUME_KEYS:
        if ckpt["config"].get(key) != config[key]:
            raise CLIError(
                f"--resume: the checkpoint was trained with {key}={ckpt['config'].get(key)!r}, "
                f"this run asks for {config[key]!r}"
            )
    if ckpt["epoch"] > epochs:
        raise CLIError(f"--resume: the checkpoint is at epoch {ckpt['epoch']}, past --epochs {epochs}")


def _format_line(row: dict, names: Sequence[str], epochs: int) -> str:
    mono = " ".join(f"{n} {row[f'val_acc_{n}']:.3f}" for n in names)
    coef = " ".join(f"{n} {row[f'coeff_{n}']:.3f}" for n in names)
    width = len(str(epochs))
    return (
        f"epoch {row['epoch']:>{width}}/{epochs} | loss {row['train_loss']:.4f} | val acc {row['val_acc']:.3f} | "
        f"mono {mono} | coeff {coef} | {row['step_ms']:.2f} ms/step"
    )


def train(args: argparse.Namespace) -> dict:
    """Run ``agm-fast train`` with parsed arguments; returns the summary it writes to ``summary.json``."""
    from tqdm import tqdm

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        # Every option not given again on the command line continues as the checkpoint's run had it.
        ckpt = _read_checkpoint(ckpt_path)
        explicit = set(getattr(args, "_explicit", ()))
        for key, value in ckpt["args"].items():
            if key not in explicit and hasattr(args, key):
                setattr(args, key, value)
    _resolve(args)
    device = _device(args.device)
    torch.set_num_threads(args.threads)
    data = _load_data(args)
    _prepare_out(args.out)
    names = data.names
    M = len(names)
    if args.method == "cggm" and args.fusion == "film" and M != 2:
        raise CLIError(f"--method cggm supports --fusion film only with 2 views, got {M} (the film output layer "
                       "mixes the views)")
    try:
        splits = data_mod.split_and_standardize(data, args.seed)
    except ValueError as exc:
        raise CLIError(f"--data: {exc}") from None
    train_s, val_s, test_s = splits
    args.data_signature = {
        "source": "mfeat" if args.data is None else "npz",
        "views": list(names),
        "dims": [int(x.shape[1]) for x in data.xs],
        "rows": int(len(data.y)),
        "classes": int(data.num_classes),
    }
    config = {key: getattr(args, key) for key in _RESUME_KEYS}
    run_args = {key: getattr(args, key) for key in _RESTORED if key not in ("views", "data")}
    run_args["views"] = ",".join(names)
    run_args["data"] = None if args.data is None else os.path.abspath(args.data)

    torch.manual_seed(args.seed)
    dims = [int(x.shape[1]) for x in data.xs]
    model = MultiViewModel(dims, data.num_classes, args.fusion, args.hidden, args.feature_dim).to(device)
    try:
        method = _METHOD_CLASSES[args.method](model, args, M)
    except ValueError as exc:
        raise CLIError(f"--method {args.method}: {exc}") from None
    params, seen = [], set()
    for module in method.modules():
        module.to(device)
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)

    history: List[dict] = []
    if args.resume:
        _check_resume(ckpt, config, args.epochs)
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            method.load_state_dict(ckpt["method"])
            torch.set_rng_state(ckpt["torch_rng"])
            gen.set_state(ckpt["data_rng"])
            if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CLIError(f"--resume: checkpoint {ckpt_path!r} does not fit this model ({_one_line(exc)})") from None
        history = list(ckpt["history"])
        print(f"resuming from {ckpt_path} at epoch {ckpt['epoch']}/{args.epochs}")

    xs_train = [x.to(device) for x in train_s.xs]
    y_train = train_s.y.to(device)
    xs_val = [x.to(device) for x in val_s.xs]
    y_val = val_s.y.to(device)
    source = "UCI Multiple Features" if args.data is None else os.path.basename(args.data)
    print(
        f"{args.method} | fusion {args.fusion} | views {','.join(names)} ({source}: {len(train_s.y)} train, "
        f"{len(val_s.y)} val, {len(test_s.y)} test, {data.num_classes} classes) | device {device.type}"
    )
    interactive = sys.stderr.isatty()
    for epoch in range(len(history), args.epochs):
        model.train()
        batches = _batches(len(y_train), args.batch_size, gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        coeff_steps = []
        seen_rows = torch.zeros((), device=device)
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, leave=False,
                   disable=not interactive, unit="step")
        t0 = time.perf_counter()
        for idx in batches:
            idx = idx.to(device)
            loss, n_correct, n_rows, coeffs = method.step([x[idx] for x in xs_train], y_train[idx], epoch, opt)
            loss_sum += loss * n_rows
            correct += n_correct
            coeff_steps.append(coeffs)
            seen_rows += n_rows
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        bar.close()
        val = evaluate(model, xs_val, y_val)
        method.end_epoch(epoch, val)
        coeff_all = torch.stack(coeff_steps).float()
        coeff_median = coeff_all.median(dim=0).values.tolist()
        coeff_mean = coeff_all.mean(dim=0).tolist()
        row = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / max(float(seen_rows), 1.0),
            "train_acc": float(correct) / max(float(seen_rows), 1.0),
            "val_loss": val["loss"],
            "val_acc": val["acc"],
        }
        row.update({f"val_acc_{n}": a for n, a in zip(names, val["mono_acc"])})
        row.update({f"val_loss_{n}": v for n, v in zip(names, val["mono_loss"])})
        row.update({f"coeff_{n}": c for n, c in zip(names, coeff_median)})
        row.update({f"coeff_mean_{n}": c for n, c in zip(names, coeff_mean)})
        row.update({"step_ms": 1e3 * elapsed / len(batches), "epoch_s": elapsed})
        history.append(row)
        print(_format_line(row, names, args.epochs), flush=True)
        _write_csv(os.path.join(args.out, "metrics.csv"), names, history)
        _save_checkpoint(
            ckpt_path,
            {
                "format": _CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "args": run_args,
                "config": config,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "method": method.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "data_rng": gen.get_state(),
                "history": history,
            },
        )

    _write_csv(os.path.join(args.out, "metrics.csv"), names, history)
    test = evaluate(model, [x.to(device) for x in test_s.xs], test_s.y.to(device))
    strengths, unimodal_acc, strength_note = _competition_strength(model, splits, data.num_classes, args, device)
    step_ms = [row["step_ms"] for row in history]
    summary = {
        "method": args.method,
        "fusion": args.fusion,
        "views": list(names),
        "data": source,
        "epochs": args.epochs,
        "rows": {"train": len(train_s.y), "val": len(val_s.y), "test": len(test_s.y)},
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_acc_per_modality": dict(zip(names, test["mono_acc"])),
        "val_acc": history[-1]["val_acc"],
        "val_acc_per_modality": {n: history[-1][f"val_acc_{n}"] for n in names},
        "competition_strength": None if strengths is None else dict(zip(names, strengths)),
        "competition_concept": strength_note
        or (
            "features (before the last ReLU) of a unimodal model per view, same encoder, trained 8 epochs "
            "(batch 128) on the train split with its own seed; ridge (alpha 120) from the concatenated encoder "
            "features, fitted on the validation split and evaluated on the test split; lower = the fused features "
            "hold more of that view"
        ),
        "unimodal_test_acc": dict(zip(names, unimodal_acc)),
        "time_per_step_ms": float(np.mean(step_ms)),
        "time_per_step_ms_median": float(np.median(step_ms)),
        "device": device.type,
        "config": {k: v for k, v in config.items() if k != "data_signature"},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    if not args.no_plot:
        title = f"{args.method} | {args.fusion} fusion | views {', '.join(names)} | test acc {test['acc']:.3f}"
        _plot(os.path.join(args.out, "curves.png"), names, history, title)
    mono = " ".join(f"{n} {a:.3f}" for n, a in zip(names, test["mono_acc"]))
    if strengths is None:
        strength = f"n/a ({strength_note})"
    else:
        strength = " ".join(f"{n} {s:.3f}" for n, s in zip(names, strengths))
    print(f"test acc {test['acc']:.3f} | mono {mono} | competition strength {strength}")
    written = "metrics.csv, summary.json, checkpoint.pt" + ("" if args.no_plot else ", curves.png")
    print(f"wrote {written} to {args.out}")
    return summary
