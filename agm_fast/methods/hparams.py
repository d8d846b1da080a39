"""Hyper-parameters declared once: name, default, help text, check and command-line parsing.

A method (or a method's core class) lists its hyper-parameters in one :class:`HParams` and decorates its class with
:func:`declare`. The constructor then takes them as keyword arguments, checks each at construction and sets them as
attributes before its own body runs; ``inspect.signature`` shows them with their defaults. The command line,
``Method.defaults()``, ``Method.describe()``, checkpoints and the docs table all read the same declaration.

This module imports nothing heavy (no torch), so ``agm-fast --help`` can build its parser from the declarations.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from .._validate import check_bool, check_choice, check_float, check_int

__all__ = ["HParam", "HParams", "declare", "number", "integer", "boolean", "choice", "any_value"]

Check = Callable[[str, Any], Any]


def number(*, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False, allow_none: bool = False) -> Check:
    """A check for a finite real number in a range (``None`` allowed when ``allow_none``)."""
    return functools.partial(_number, low=low, high=high, low_open=low_open, high_open=high_open,
                             allow_none=allow_none)


def _number(name, value, **bounds):
    return check_float(name, value, **bounds)


def integer(*, low: Optional[int] = None, high: Optional[int] = None, allow_none: bool = False) -> Check:
    """A check for an integer in a range (``None`` allowed when ``allow_none``)."""
    def check(name: str, value: Any) -> Any:
        if value is None and allow_none:
            return None
        return check_int(name, value, low=low, high=high)

    return check


def boolean(name: str, value: Any) -> bool:
    """A check for a bool."""
    return check_bool(name, value)


def choice(*choices: Any) -> Check:
    """A check for one of ``choices``."""
    return functools.partial(_choice, choices=tuple(choices))


def _choice(name, value, choices):
    return check_choice(name, value, choices)


def any_value(name: str, value: Any) -> Any:
    """No check here: the value is checked where it is used (it depends on M, or it is a module or a callable)."""
    return value


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter.

    Attributes:
        name: the keyword argument.
        default: its default.
        help: one line for ``--help``, ``describe()`` readers and the docs.
        check: ``check(name, value) -> value``: raises TypeError / ValueError naming the argument, returns the value
            (normalised).
        parse: parses the command-line text (``bool``: a switch without a value); None: not on the command line.
        choices: the values the command line accepts, or None.
        flag: the command-line flag (default ``--`` + name with ``-`` for ``_``).
    """

    name: str
    default: Any
    help: str
    check: Check = any_value
    parse: Optional[Callable[[str], Any]] = None
    choices: Optional[Tuple[Any, ...]] = None
    flag: Optional[str] = None

    @property
    def cli(self) -> bool:
        """Whether the command line exposes it."""
        return self.parse is not None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        """The checked value."""
        return self.check(self.name, value)


class HParams:
    """An ordered set of :class:`HParam` with unique names."""

    def __init__(self, *params: HParam) -> None:
        names = [p.name for p in params]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"params: each name declared once, got {dup[0]!r} twice")
        self._params: Dict[str, HParam] = {p.name: p for p in params}

    def __iter__(self) -> Iterator[HParam]:
        return iter(self._params.values())

    def __len__(self) -> int:
        return len(self._params)

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def __getitem__(self, name: str) -> HParam:
        return self._params[name]

    def __add__(self, other: "HParams") -> "HParams":
        return HParams(*self, *other)

    def __repr__(self) -> str:
        return f"HParams({', '.join(self._params)})"

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._params)

    def without(self, *names: str) -> "HParams":
        """The same declarations less ``names``."""
        return HParams(*(p for p in self if p.name not in names))

    def defaults(self) -> Dict[str, Any]:
        """Every default, by name."""
        return {p.name: p.default for p in self}

    def resolve(self, owner: str, given: Mapping[str, Any]) -> Dict[str, Any]:
        """Every value, given or default, checked.

        Args:
            owner: the class name, for the error on an unknown name.
            given: the values passed.
        """
        for key in given:
            if key not in self._params:
                raise TypeError(f"{key}: not an argument of {owner} (its hyper-parameters: {', '.join(self.names)})")
        return {p.name: p.validate(given[p.name] if p.name in given else p.default) for p in self}


def declare(hparams: HParams) -> Callable[[type], type]:
    """Class decorator: the constructor takes ``hparams`` as keyword arguments, checks them, and sets each as an
    attribute (the dict of all as ``self.hparams_values``, the names passed as ``self.hparams_given``) before its own
    body runs."""

    def wrap(cls: type) -> type:
        init = cls.__dict__["__init__"]
        sig = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in hparams}
            if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
                for key in kwargs:
                    if key not in sig.parameters:
                        raise TypeError(
                            f"{key}: not an argument of {cls.__name__} (its hyper-parameters: "
                            f"{', '.join(hparams.names)})"
                        )
            values = hparams.resolve(cls.__name__, given)
            object.__setattr__(self, "hparams_values", values)
            object.__setattr__(self, "hparams_given", frozenset(given))
            for key, value in values.items():
                object.__setattr__(self, key, value)
            init(self, *args, **kwargs)

        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        var_kw = [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
        params += [inspect.Parameter(h.name, inspect.Parameter.KEYWORD_ONLY, default=h.default) for h in hparams
                   if h.name not in sig.parameters]
        __init__.__signature__ = sig.replace(parameters=params + var_kw)
        cls.__init__ = __init__
        cls.HPARAMS = hparams
        return cls

    return wrap


def table(hparams: HParams, fixed: Sequence[str] = ()) -> str:
    """A Markdown table of the declarations (the docs' per-method table)."""
    rows = ["| name | default | flag | what |", "| --- | --- | --- | --- |"]
    for p in hparams:
        if p.name in fixed:
            continue
        flag = f"`{p.cli_flag}`" if p.cli else ""
        rows.append(f"| `{p.name}` | `{p.default!r}` | {flag} | {p.help} |")
    return "\n".join(rows)
