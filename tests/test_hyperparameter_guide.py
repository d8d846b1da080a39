"""docs/hyperparameter-guide.md: every setting it writes is one agm_fast accepts.

Each table row's arguments build its method on a small model with that row's number of modalities; each
``agm-fast train`` command parses, passes the command line's checks, builds its method and sets exactly what the row
of its method and data set says; every ``name=value`` of the knob table builds; the example runs. A row or command
with an unknown argument, a flag of another method or an invalid value fails here.
"""

import ast
import contextlib
import io
import os
import re
import shlex

import pytest
import torch

from agm_fast import methods
from agm_fast.cli.args import CLIError, build_parser, method_kwargs, resolve
from agm_fast.models import MultiViewModel

GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "hyperparameter-guide.md")
ARGS_HEADER = "arguments"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def _text():
    with open(GUIDE) as f:
        return f.read()


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _unquote(cell, what):
    if not (len(cell) >= 2 and cell[0] == cell[-1] == "`"):
        raise ValueError(f"{what}: expected a `backticked` value, got {cell!r}")
    return cell[1:-1]


def parse_arguments(text):
    """``"alpha=2.5, window=(0, 80)"`` -> ``{"alpha": 2.5, "window": (0, 80)}`` (literals only)."""
    call = ast.parse(f"f({text})", mode="eval").body
    if call.args or any(k.arg is None for k in call.keywords):
        raise ValueError(f"arguments: expected name=value pairs only, got {text!r}")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def parse_tables(text):
    """Every row of the tables that have an arguments column, as dicts (method, data set, M, kwargs, fusion)."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells if ARGS_HEADER in cells else ()
            continue
        if not header or set(line) <= set("|- "):
            continue
        assert len(cells) == len(header), f"row with {len(cells)} cells under {len(header)} columns: {line}"
        row = dict(zip(header, cells))
        fusion = re.match(r"`(\w+)`", row["fusion"])
        rows.append({
            "method": _unquote(row["method"], "method"),
            "data set": row["data set"],
            "modalities": len([m for m in row["modalities"].split(",") if m.strip()]),
            "kwargs": parse_arguments(_unquote(row[ARGS_HEADER], f"{row['method']} / {row['data set']}")),
            "fusion": fusion.group(1) if fusion else "concat",
        })
    return rows


def parse_commands(text):
    """Every ``agm-fast train`` command of the bash blocks, with the data set its comment line names."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang != "bash":
            continue
        label = None
        for line in body.splitlines():
            if line.startswith("#"):
                label = line[1:].split(":")[0].strip()
            elif line.startswith("agm-fast train"):
                assert label is not None, f"a command without a '# <data set>' line above it: {line}"
                commands.append((label, shlex.split(line)[2:]))
    return commands


def small_model(modalities, fusion):
    return MultiViewModel([5] * modalities, 3, fusion, hidden=8, feature_dim=4)


def build(name, modalities, fusion, **kwargs):
    model = small_model(modalities, fusion)
    return methods.create(name, list(model.encoders), model.fusion, **kwargs)


ROWS = parse_tables(_text())
COMMANDS = parse_commands(_text())


def _id(row):
    return f"{row['method']}-{row['data set']}"


def test_the_guide_has_a_row_for_every_registered_method():
    assert len(ROWS) >= 30 and len(COMMANDS) >= 10
    missing = set(methods.available()) - {"joint"} - {r["method"] for r in ROWS}
    assert not missing, f"no published setting in the guide for {sorted(missing)}"
    keys = [(r["method"], r["data set"]) for r in ROWS]
    assert len(keys) == len(set(keys)), "two rows for one method and data set"


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_every_row_builds_its_method(row):
    method = build(row["method"], row["modalities"], row["fusion"], seed=0, **row["kwargs"])
    held = method.hyperparameters()
    for name, value in row["kwargs"].items():
        if name in held:
            assert _same(held[name], value), f"{_id(row)}: {name} is {held[name]!r}, the guide says {value!r}"


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("label,argv", COMMANDS, ids=[f"{' '.join(a[2:4])} {label}" for label, a in COMMANDS])
def test_every_command_parses_builds_and_matches_its_row(label, argv):
    args = build_parser().parse_args(["train", *argv])
    resolve(args)
    kwargs = method_kwargs(args)
    rows = [r for r in ROWS if r["method"] == args.method and r["data set"] == label]
    assert len(rows) == 1, f"no row for --method {args.method} and data set {label!r}"
    row = rows[0]
    modalities = len(args.views.split(",")) if args.views else row["modalities"]
    build(args.method, modalities, args.fusion, seed=args.seed, **kwargs)
    defaults = methods.get(args.method).cls.defaults()
    published = dict(row["kwargs"])
    published.setdefault("window", (0, None))
    for name, value in kwargs.items():
        expected = published.get(name, defaults.get(name))
        assert _same(value, expected), f"{label}: the command sets {name}={value!r}, the row {expected!r}"
    for name, value in published.items():
        if name in kwargs or name not in defaults:
            continue
        flag = [f"--{name.replace('_', '-')}", f"--{name}"]
        assert not any(f in argv for f in flag), name
        # a published value the command leaves out must be the default (the command then sets it too)
        assert _same(value, defaults[name]), f"{label}: the row sets {name}={value!r}, the command does not"


def knob_settings(text):
    """The ``name=value`` settings of the knob table's "off" column, with the methods of their row."""
    settings, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells if cells[:2] == ["method", "knob"] else ()
            continue
        if not header or set(line) <= set("|- "):
            continue
        row = dict(zip(header, cells))
        names = re.findall(r"`(\w+)`", row["method"])
        for setting in re.findall(r"`(\w+=[^`]+)`", row["off"]):
            settings += [(name, parse_arguments(setting)) for name in names]
    return settings


KNOBS = knob_settings(_text())


def test_the_knob_table_covers_the_methods():
    assert {name for name, _ in KNOBS} >= {"agm", "ogm", "ogm_ge", "opm", "cggm", "mlb"}


@pytest.mark.parametrize("name,kwargs", KNOBS, ids=[f"{n}-{k}" for n, k in KNOBS])
def test_every_setting_of_the_knob_table_builds(name, kwargs):
    build(name, 2, "concat", **kwargs)


def _first_fence(lang):
    return next(body for kind, body in FENCE.findall(_text()) if kind == lang)


def test_the_example_runs():
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_first_fence("python"), GUIDE, "exec"), {"__name__": "guide_example"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 8
    coeffs = [ast.literal_eval(line.split(" ", 2)[2]) for line in lines]
    assert all(c == [1.0, 1.0] for c in coeffs[:6])      # the warm-up: joint training
    assert any(c != [1.0, 1.0] for c in coeffs[6:])      # then OGM-GE damps the leader


@pytest.mark.parametrize(
    "text,error",
    [
        ("| method | data set | modalities | arguments | fusion |\n| --- | --- | --- | --- | --- |\n"
         "| `agm` | X | a, b | `alpah=2.5` | `concat` |\n", TypeError),
        ("| method | data set | modalities | arguments | fusion |\n| --- | --- | --- | --- | --- |\n"
         "| `agm` | X | a, b | `alpha=-1.0` | `concat` |\n", ValueError),
        ("| method | data set | modalities | arguments | fusion |\n| --- | --- | --- | --- | --- |\n"
         "| `mslr` | X | a, b | `init_lr_scales=[0.9, 1.4, 0.7]` | `concat` |\n", ValueError),
        ("| method | data set | modalities | arguments | fusion |\n| --- | --- | --- | --- | --- |\n"
         "| `agm` | X | a, b | alpha=2.5 | `concat` |\n", ValueError),
    ],
)
def test_a_bad_row_fails(text, error):
    with pytest.raises(error):
        for row in parse_tables(text):
            build(row["method"], row["modalities"], row["fusion"], **row["kwargs"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--method", "agm", "--alpah", "2.5"],
        ["--method", "mslr", "--alpha", "2.5"],
        ["--method", "agm", "--alpha", "x"],
        ["--method", "agm", "--modulation_starts", "5", "--modulation_ends", "1"],
    ],
)
def test_a_bad_command_fails(argv):
    with pytest.raises(CLIError):
        args = build_parser().parse_args(["train", *argv])
        resolve(args)
