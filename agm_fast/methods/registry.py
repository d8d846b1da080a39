"""The registry of balancing methods: names to classes (and the arguments a name fixes)."""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Tuple, Type

from .base import Method

__all__ = ["Registered", "available", "create", "get", "register", "unregister"]


class Registered(NamedTuple):
    """A registry entry: the class and the constructor arguments its name fixes."""

    cls: Type[Method]
    preset: Dict[str, Any]


_REGISTRY: Dict[str, Registered] = {}


def register(name: str, cls: Type[Method], **preset: Any) -> Type[Method]:
    """Register ``cls`` under ``name``; ``preset`` fixes constructor arguments for that name.

    Args:
        name: the registry key (also the ``--method`` value of the command line).
        cls: a :class:`Method` subclass.
        **preset: constructor arguments that this name fixes (e.g. ``mode="OGM"``).

    Returns:
        ``cls``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: expected an identifier such as 'ogm_ge', got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"cls: expected a subclass of agm_fast.methods.Method, got {cls!r}")
    for key in preset:
        if key not in cls.HPARAMS:
            raise TypeError(f"{key}: not a hyper-parameter of {cls.__name__} (its hyper-parameters: "
                            f"{', '.join(cls.HPARAMS.names)})")
    entry = Registered(cls, dict(preset))
    if name in _REGISTRY and _REGISTRY[name] != entry:
        raise ValueError(f"name: {name!r} is already registered for {_REGISTRY[name].cls.__name__}")
    _REGISTRY[name] = entry
    return cls


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (a no-op for an unknown name)."""
    _REGISTRY.pop(name, None)


def available() -> Tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Registered:
    """The class and preset arguments registered under ``name`` (a :class:`Registered`, which unpacks as
    ``cls, preset``)."""
    if name not in _REGISTRY:
        raise ValueError(f"method: expected one of {available()}, got {name!r}")
    cls, preset = _REGISTRY[name]
    return Registered(cls, dict(preset))


def create(name: str, encoders, fusion, **kwargs: Any) -> Method:
    """Build the method registered under ``name`` on the model's ``encoders`` and ``fusion`` head.

    Args:
        name: a registered name (:func:`available`).
        encoders: M encoder modules, one per modality.
        fusion: the fusion head, ``fusion(*features) -> [B, C]``.
        **kwargs: the method's hyper-parameters, ``window`` and ``seed``.

    Returns:
        The :class:`Method`.
    """
    cls, preset = get(name)
    clash = sorted(set(preset) & set(kwargs))
    if clash:
        raise ValueError(f"{clash[0]}: fixed to {preset[clash[0]]!r} by method {name!r}, got {kwargs[clash[0]]!r}")
    method = cls(encoders, fusion, **preset, **kwargs)
    method.name = name
    return method
