"""The ``agm-fast`` arguments: the parser, built from the method registry, and the checks of a parsed command.

Each method's options, their flags and their defaults come from the method classes (:mod:`agm_fast.methods`);
nothing here knows a method by name.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Dict, List, Sequence, Tuple

from .catalog import Entry, entries, mfeat_views

__all__ = [
    "CLIError",
    "DEFAULT_VIEWS",
    "FUSIONS",
    "METHODS",
    "SUPPORT",
    "UNSET",
    "build_parser",
    "explicit_dests",
    "method_kwargs",
    "option_table",
    "resolve",
]

FUSIONS = ("concat", "sum", "mlp", "gated", "film")
DEFAULT_VIEWS = "fac,zer"
DEFAULT_METHOD = "agm"
UNSET: Any = argparse.SUPPRESS
# An explicit alias stands for its target option.
ALIASES = {"modulation": "method", "fusion_method": "fusion"}
# Seeds derived from --seed (the unimodal concepts' seed * 1000 + 17 + m among them) must stay within 64 bits.
SEED_LIMIT = 1 << 32
# The window flags, in the reference's spelling; every method with a window takes them.
WINDOW_DESTS = ("modulation_starts", "modulation_ends")


class CLIError(Exception):
    """A bad argument or unusable input; ``main`` prints it as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise CLIError(message)


def one_line(text) -> str:
    return " ".join(str(text).split())


def _methods() -> Tuple[str, ...]:
    return tuple(e.name for e in entries())


def _entry(name: str) -> Entry:
    for e in entries():
        if e.name == name:
            return e
    raise CLIError(f"--method: expected one of {', '.join(_methods())}, got {name!r}")


def _support() -> Dict[str, Tuple[str, ...]]:
    return {e.name: tuple(f for f in FUSIONS if f not in e.unsupported_fusions) for e in entries()}


# The registry as the command line sees it (recomputed by build_parser, so a method registered later appears).
METHODS: Tuple[str, ...] = _methods()
SUPPORT: Dict[str, Tuple[str, ...]] = _support()


def option_table() -> Dict[str, Dict[str, Any]]:
    """Every method option by its command-line destination: ``{dest: {"flag", "option", "methods", ...}}``.

    Options of several methods that share a flag (``--alpha``, ``--lam``) share one destination; their types must
    agree.
    """
    table: Dict[str, Dict[str, Any]] = {}
    for e in entries():
        name, preset, defaults = e.name, e.preset, e.defaults()
        for opt in e.options:
            if opt.name in preset or not opt.cli:
                continue
            dest = opt.cli_flag[2:].replace("-", "_")
            entry = table.setdefault(
                dest, {"flag": opt.cli_flag, "option": opt, "methods": [], "defaults": {}, "helps": {}}
            )
            if entry["option"].parse is not opt.parse or entry["option"].choices != opt.choices:
                raise TypeError(f"{opt.cli_flag}: methods {entry['methods'][0]} and {name} disagree on its type")
            entry["methods"].append(name)
            entry["defaults"][name] = defaults[opt.name]
            entry["helps"][name] = opt.help
    return table


def _epilog() -> str:
    support = _support()
    lines = ["method x fusion support:"]
    for name, fusions in support.items():
        lines.append(f"  {name:<8} {', '.join(fusions)}")
    lines += [
        "  (ogm, ogm_ge, opm score each view on per-view logits: exact for concat and sum, by zero-out otherwise)",
        "",
        "coeff_<view> in metrics.csv (median over the epoch's steps; coeff_mean_<view> is the mean): the",
        "coefficients each method reports (agm c_m, ogm/ogm_ge k_m, opm keep probability 1 - q_m, cggm rho * B_m,",
        "mslr init_m * ratio_m, mses 1 while the view trains and 0 once stopped, joint 1).",
        "val_acc_<view>: accuracy of the view's Shapley mono-modal output psi_m on the validation split.",
        "",
        "examples:",
        "  agm-fast train                                   # agm on fac + zer, 30 epochs, about 15 s on 2 CPU cores",
        "  agm-fast train --method ogm_ge --views pix,mor --out runs/ogm",
        "  agm-fast train --data feats.npz --epochs 50      # x_<name> [N, d] arrays and y [N] labels",
        "  agm-fast train --out runs/ogm --resume --epochs 60",
    ]
    return "\n".join(lines) + "\n"


def _add_method_options(group, table: Dict[str, Dict[str, Any]]) -> None:
    for dest, entry in table.items():
        opt = entry["option"]
        # One clause per distinct text: "agm: ... (default 1.0); ogm/ogm_ge: ... (default 0.8)".
        by_help: Dict[str, List[str]] = {}
        for m in entry["methods"]:
            by_help.setdefault(entry["helps"][m], []).append(m)
        clauses = []
        for help_text, names in by_help.items():
            values = {repr(entry["defaults"][m]) for m in names}
            default = values.pop() if len(values) == 1 else ", ".join(f"{m} {entry['defaults'][m]!r}" for m in names)
            clauses.append(f"{'/'.join(names)}: {help_text} (default {default})")
        text = "; ".join(clauses)
        kwargs: Dict[str, Any] = dict(dest=dest, default=UNSET, help=text.replace("%", "%%"))
        if opt.parse is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = opt.parse
            if opt.choices is not None:
                kwargs["choices"] = opt.choices
        flags = [entry["flag"]]
        if "_" in entry["flag"][2:]:
            flags.append(entry["flag"].replace("_", "-"))
        group.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``agm-fast`` argument parser (subcommands ``train`` and ``bench``), from the method registry."""
    global METHODS, SUPPORT
    METHODS, SUPPORT = _methods(), _support()
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
        epilog=_epilog(),
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
        help=f"comma-separated views, 2 to 6 of {','.join(mfeat_views())} (default {DEFAULT_VIEWS}; with "
        "--data: the x_<name> arrays of the file, default all of them)",
    )
    g.add_argument(
        "--data",
        default=None,
        metavar="FILE.npz",
        help="your own data: arrays x_<name> [N, d] (one per view) and y [N] (int class indices 0..C-1); "
        "'synthetic' generates the imbalanced two-view set of docs/compare.md (knobs: --synthetic-*)",
    )
    g = t.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default=None, help=f"balancing method (default {DEFAULT_METHOD})")
    g.add_argument(
        "--modulation",
        choices=("Normal", "OGM", "OGM_GE"),
        default=None,
        help="the OGM-GE reference's flag: Normal = --method joint, OGM = ogm, OGM_GE = ogm_ge",
    )
    g.add_argument("--fusion", choices=FUSIONS, default=None, help="fusion head (default concat)")
    g.add_argument("--fusion_method", dest="fusion_method", choices=FUSIONS, default=None,
                   help="the reference's name for --fusion")
    g.add_argument("--modulation_starts", "--modulation-starts", dest="modulation_starts", type=int, default=None,
                   metavar="EPOCH", help="first epoch (from 0) of the modulation window (default 0)")
    g.add_argument("--modulation_ends", "--modulation-ends", dest="modulation_ends", type=int, default=None,
                   metavar="EPOCH",
                   help="last epoch (from 0, inclusive) of the modulation window (default: the whole run)")
    _add_method_options(g, option_table())
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
    g.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds")
    g.add_argument("--no-plot", dest="no_plot", action="store_true", help="do not draw curves.png")
    g.add_argument("--probe", action="store_true",
                   help="linear-probe each frozen encoder every epoch (fit on train, scored on validation; the "
                   "summary adds the test split): probe_acc_<view> in metrics.csv and curves.png")

    from . import synthetic as synthetic_cli

    synthetic_cli.add_options(t)
    t.set_defaults(_options={opt: a.dest for a in t._actions for opt in a.option_strings})

    from .compare_args import add_parser as add_compare_parser

    add_compare_parser(sub, t)

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
    b.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the results (default ./benchmarks/results under the working directory)")
    b.add_argument("--no-save", dest="no_save", action="store_true", help="do not write any results")
    return parser


def explicit_dests(options: Dict[str, str], argv: Sequence[str]) -> set:
    """The destinations of the options that ``argv`` gives explicitly (aliases count as their targets)."""
    given = set()
    for token in argv:
        name = token.split("=", 1)[0]
        if name in options:
            dest = options[name]
            given.add(dest)
            if dest in ALIASES:
                given.add(ALIASES[dest])
    return given


def resolve(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on the method and check every argument; raises :class:`CLIError`."""
    if args.modulation is not None:
        routed = {"Normal": "joint", "OGM": "ogm", "OGM_GE": "ogm_ge"}[args.modulation]
        if args.method is not None and args.method != routed:
            raise CLIError(f"--modulation {args.modulation} means --method {routed}, but --method {args.method} given")
        args.method = routed
    args.method = args.method or DEFAULT_METHOD
    if args.fusion_method is not None:
        if args.fusion is not None and args.fusion != args.fusion_method:
            raise CLIError(f"--fusion {args.fusion} and --fusion_method {args.fusion_method} disagree")
        args.fusion = args.fusion_method
    args.fusion = args.fusion or "concat"
    support = _support()
    if args.fusion not in support[args.method]:
        raise CLIError(
            f"--method {args.method} does not support --fusion {args.fusion}; "
            f"supported: {', '.join(support[args.method])}"
        )
    cls = _entry(args.method)
    for dest, entry in option_table().items():
        if hasattr(args, dest) and args.method not in entry["methods"]:
            raise CLIError(f"{entry['flag']} applies to --method {'/'.join(entry['methods'])}, not to --method "
                           f"{args.method}")
    if not cls.windowed:
        for dest in WINDOW_DESTS:
            if getattr(args, dest) is not None:
                windowed = [e.name for e in entries() if e.windowed]
                raise CLIError(f"--{dest} applies to --method {'/'.join(windowed)}, not to --method {args.method}")
    for key in ("epochs", "hidden", "feature_dim", "threads"):
        if getattr(args, key) < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.batch_size < 2:
        raise CLIError(
            f"--batch-size must be at least 2 (the encoders' BatchNorm needs two samples), got {args.batch_size}"
        )
    if not 0 <= args.seed < SEED_LIMIT:
        raise CLIError(f"--seed must be an int in [0, 2**32), got {args.seed}")
    if not (args.lr > 0 and args.lr < float("inf")):
        raise CLIError(f"--lr must be a positive number, got {args.lr}")
    if not (0 <= args.momentum < 1) or not (0 <= args.weight_decay < float("inf")):
        raise CLIError("--momentum must be in [0, 1) and --weight-decay a finite number >= 0")
    if cls.windowed:
        args.modulation_starts = 0 if args.modulation_starts is None else args.modulation_starts
        if args.modulation_starts < 0:
            raise CLIError(f"--modulation_starts must be >= 0, got {args.modulation_starts}")
        if args.modulation_ends is not None and args.modulation_ends < args.modulation_starts:
            raise CLIError(
                f"--modulation_ends ({args.modulation_ends}) must not be before --modulation_starts "
                f"({args.modulation_starts})"
            )


def method_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The constructor arguments of the chosen method that the command line gives (the rest keep their defaults)."""
    cls = _entry(args.method)
    kwargs: Dict[str, Any] = {}
    for dest, entry in option_table().items():
        if args.method in entry["methods"] and hasattr(args, dest):
            kwargs[entry["option"].name] = getattr(args, dest)
    if cls.windowed:
        kwargs["window"] = (args.modulation_starts, args.modulation_ends)
    return kwargs


def flag_message(message: str, method: str) -> str:
    """A method's error message with its leading argument name replaced by the command-line flag that sets it."""
    flags = {
        entry["option"].name: entry["flag"] for entry in option_table().values() if method in entry["methods"]
    }
    match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])?): ", message)
    if match and match.group(1) in flags:
        return flags[match.group(1)] + match.group(2) + message[len(match.group(1)) + len(match.group(2)) :]
    return message


def config_of(args: argparse.Namespace, hyperparameters: Dict[str, Any]) -> Dict[str, Any]:
    """The configuration a resumed run must share with its checkpoint, keyed by command-line destination."""
    table = option_table()
    config: Dict[str, Any] = {"method": args.method, "fusion": args.fusion}
    for dest, entry in table.items():
        if args.method in entry["methods"]:
            config[dest] = hyperparameters[entry["option"].name]
    if _entry(args.method).windowed:
        config.update({dest: getattr(args, dest) for dest in WINDOW_DESTS})
    for key in ("batch_size", "lr", "momentum", "weight_decay", "hidden", "feature_dim", "seed", "probe"):
        config[key] = getattr(args, key)
    return config


def restorable(args: argparse.Namespace) -> List[str]:
    """The destinations a resumed run takes from its checkpoint when the command line does not give them."""
    keep = ["method", "fusion", "views", "data", "epochs", "device", "threads", "no_plot", "probe", *WINDOW_DESTS]
    keep += ["batch_size", "lr", "momentum", "weight_decay", "hidden", "feature_dim", "seed"]
    keep += [dest for dest in option_table() if hasattr(args, dest)]
    keep += [dest for dest in vars(args) if dest.startswith("synthetic_")]
    return keep
