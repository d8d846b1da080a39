"""Every balancing method behind one training-step interface, and the registry that names them.

::

    method = agm_fast.methods.create("ogm_ge", encoders=[enc_a, enc_v], fusion=head, alpha=0.8, window=(0, 50))
    optimizer = torch.optim.SGD([{"params": params}] + method.param_groups(lr), lr=lr)
    for epoch in range(epochs):
        for x_a, x_v, y in loader:
            agm_fast.methods.training_step(method, [x_a, x_v], y, epoch, optimizer)
        method.end_epoch(epoch, {"modality_accuracy": acc, "modality_loss": loss})

Adding a method is one file with a :class:`Method` subclass and one :func:`register` call; the ``agm-fast``
command line builds its ``--method`` choices and options from this registry.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Type

from .base import TASKS, Method, Option, StepOutput, StepResult, training_step

__all__ = [
    "Method",
    "Option",
    "StepOutput",
    "StepResult",
    "TASKS",
    "available",
    "create",
    "get",
    "register",
    "training_step",
]

_REGISTRY: Dict[str, Tuple[Type[Method], Dict[str, Any]]] = {}


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
    if name in _REGISTRY and _REGISTRY[name] != (cls, preset):
        raise ValueError(f"name: {name!r} is already registered for {_REGISTRY[name][0].__name__}")
    _REGISTRY[name] = (cls, dict(preset))
    return cls


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (a no-op for an unknown name)."""
    _REGISTRY.pop(name, None)


def available() -> Tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Tuple[Type[Method], Dict[str, Any]]:
    """The class and preset arguments registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"method: expected one of {available()}, got {name!r}")
    cls, preset = _REGISTRY[name]
    return cls, dict(preset)


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


def _register_builtins() -> None:
    from . import agm, cggm, joint, mses, mslr, ogm, opm

    register("joint", joint.Joint)
    register("agm", agm.AGMMethod)
    register("ogm", ogm.OGMMethod, mode="OGM")
    register("ogm_ge", ogm.OGMMethod, mode="OGM_GE")
    register("opm", opm.OPMMethod)
    register("cggm", cggm.CGGMMethod)
    register("mslr", mslr.MSLRMethod)
    register("mses", mses.MSESMethod)


_register_builtins()
