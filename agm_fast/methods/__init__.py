"""Every balancing method behind one training-step interface, and the registry that names them.

::

    method = agm_fast.methods.create("ogm_ge", encoders=[enc_a, enc_v], fusion=head, alpha=0.8, window=(0, 50))
    optimizer = torch.optim.SGD([{"params": params}] + method.param_groups(lr), lr=lr)
    for epoch in range(epochs):
        agm_fast.methods.run_epoch_passes(method, epoch, "start", train_loader, val_loader)   # PMR, relearning
        for x_a, x_v, y in train_loader:
            agm_fast.methods.training_step(method, [x_a, x_v], y, epoch, optimizer)
        method.end_epoch(epoch, {"modality_accuracy": acc, "modality_loss": loss})
        agm_fast.methods.run_epoch_passes(method, epoch, "end", train_loader, val_loader)

Each method is one folder here (``agm/``, ``ogm/``, ...) that declares its hyper-parameters once and registers itself
from its ``__init__``; methods of other packages register through the ``agm_fast.methods`` entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import TASKS, Method, StepOutput, StepResult, encode
from .epoch_data import EpochPass, PassBatch, run_epoch_passes
from .hparams import HParam, HParams, declare
from .registry import Registered, available, create, get, register, unregister
from .step import training_step

__all__ = [
    "Method",
    "EpochPass",
    "HParam",
    "HParams",
    "PassBatch",
    "Registered",
    "StepOutput",
    "StepResult",
    "TASKS",
    "available",
    "create",
    "declare",
    "encode",
    "get",
    "register",
    "run_epoch_passes",
    "training_step",
    "unregister",
]

# The built-in methods, in the order the command line lists them.
BUILTIN = ("joint", "agm", "ogm", "opm", "cggm", "mslr", "mses")


def _load_builtins() -> None:
    found = {m.name for m in pkgutil.iter_modules(__path__) if m.ispkg}
    for name in BUILTIN + tuple(sorted(found - set(BUILTIN))):
        importlib.import_module(f"{__name__}.{name}")


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group="agm_fast.methods")
    except TypeError:  # Python < 3.10
        eps = entry_points().get("agm_fast.methods", [])
    for ep in eps:
        ep.load()


_load_builtins()
_load_entry_points()
