"""What the command line knows of each method (names, presets, options, fusion support), without importing torch.

When the method registry is loaded (the process imported :mod:`agm_fast.methods`, or another package registers
methods through the ``agm_fast.methods`` entry points), the catalog is read from it. Otherwise it comes from
``methods.json`` beside this file, which ``scripts/hparams_docs.py`` generates from the registry (a test checks that
it is current), so that ``agm-fast --help`` and argument errors answer without loading torch.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._parse import PARSERS, parser_name

__all__ = ["CATALOG_PATH", "Entry", "Option", "entries", "generate", "mfeat_views"]

CATALOG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods.json")


@dataclass(frozen=True)
class Option:
    """A method's hyper-parameter as the command line sees it (see :class:`agm_fast.methods.HParam`)."""

    name: str
    default: Any
    help: str
    parse: Optional[Callable[[str], Any]]
    choices: Optional[Tuple[Any, ...]]
    flag: Optional[str]

    @property
    def cli(self) -> bool:
        return self.parse is not None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Entry:
    """One registered name: its options, the arguments the name fixes, and what the command line needs of its class."""

    name: str
    options: Tuple[Option, ...]
    preset: Dict[str, Any]
    windowed: bool
    needs_epoch_metrics: bool
    unsupported_fusions: Tuple[str, ...]

    def defaults(self) -> Dict[str, Any]:
        return {o.name: o.default for o in self.options}


def _live() -> bool:
    return "agm_fast.methods.registry" in sys.modules or _has_entry_points()


@functools.lru_cache(maxsize=None)
def _has_entry_points() -> bool:
    # Scanning the installed distributions is the slow part of --help: once per process (the parser asks often).
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group="agm_fast.methods")
    except TypeError:  # Python < 3.10
        eps = entry_points().get("agm_fast.methods", [])
    return bool(list(eps))


def _from_registry() -> List[Entry]:
    from .. import methods

    out = []
    for name in methods.available():
        cls, preset = methods.get(name)
        options = tuple(Option(p.name, p.default, p.help, p.parse, p.choices, p.flag) for p in cls.HPARAMS)
        out.append(Entry(name, options, dict(preset), bool(cls.windowed), bool(cls.needs_epoch_metrics),
                         tuple(getattr(cls, "unsupported_fusions", ()))))
    return out


@functools.lru_cache(maxsize=None)
def _from_file() -> Tuple[Entry, ...]:
    with open(CATALOG_PATH) as f:
        raw = json.load(f)
    out = []
    for e in raw["methods"]:
        options = tuple(
            Option(o["name"], o["default"], o["help"], PARSERS[o["parse"]] if o["parse"] else None,
                   tuple(o["choices"]) if o["choices"] is not None else None, o["flag"])
            for o in e["options"]
        )
        out.append(Entry(e["name"], options, e["preset"], e["windowed"], e["needs_epoch_metrics"],
                         tuple(e["unsupported_fusions"])))
    return tuple(out)


def entries() -> List[Entry]:
    """The catalog, in registration order."""
    return _from_registry() if _live() else list(_from_file())


def mfeat_views() -> Tuple[str, ...]:
    """The views of the embedded data set (:data:`agm_fast.data.MFEAT_VIEWS`)."""
    if "agm_fast.data" in sys.modules:
        return tuple(sys.modules["agm_fast.data"].MFEAT_VIEWS)
    with open(CATALOG_PATH) as f:
        return tuple(json.load(f)["mfeat_views"])


def generate() -> str:
    """The text of ``methods.json``, from the registry."""
    methods = []
    for e in _from_registry():
        methods.append({
            "name": e.name,
            "preset": e.preset,
            "windowed": e.windowed,
            "needs_epoch_metrics": e.needs_epoch_metrics,
            "unsupported_fusions": list(e.unsupported_fusions),
            "options": [
                {"name": o.name, "default": o.default, "help": o.help,
                 "parse": parser_name(o.parse) if o.parse is not None else None,
                 "choices": list(o.choices) if o.choices is not None else None, "flag": o.flag}
                for o in e.options
            ],
        })
    from ..data import MFEAT_VIEWS

    return json.dumps({"mfeat_views": list(MFEAT_VIEWS), "methods": methods}, indent=1) + "\n"
