"""Which parameters belong to which modality: the one selection rule every method uses.

A modality is named by a module (all its trainable parameters), by a parameter-name prefix of ``model``, by an
iterable of parameters, or by an optimizer-style param group (a dict with ``"params"``). A prefix matches a
parameter whose name, after an optional (Distributed)DataParallel ``module.`` prefix, starts with it (``"audio"``
selects ``audio_net.*``; end a prefix with ``"."`` to match one module exactly). A selection that matches no
trainable parameter, an empty prefix, or a parameter claimed by two modalities is an error, never a silent no-op.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._validate import describe

__all__ = ["Selection", "matches_prefix", "per_modality_values", "resolve_modalities"]

Selection = Union[nn.Module, str, Iterable[Tensor], Mapping[str, object]]

_DP_PREFIX = "module."


def matches_prefix(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` (less a leading DataParallel ``module.``) starts with ``prefix``."""
    if name.startswith(_DP_PREFIX):
        name = name[len(_DP_PREFIX) :]
    return name.startswith(prefix)


def _named(modalities, arg: str) -> "OrderedDict[str, Selection]":
    if isinstance(modalities, Mapping):
        items = OrderedDict((str(k), v) for k, v in modalities.items())
    elif isinstance(modalities, (list, tuple, nn.ModuleList)):
        items = OrderedDict((str(i), v) for i, v in enumerate(modalities))
    else:
        raise TypeError(
            f"{arg}: expected a dict name -> module / name prefix / parameters, or a list of them, "
            f"got {type(modalities).__name__}"
        )
    if len(items) == 0:
        raise ValueError(f"{arg}: expected at least one modality, got none")
    return items


def _what(sel) -> str:
    if isinstance(sel, nn.Module):
        return f"the module {type(sel).__name__}"
    if isinstance(sel, str):
        return f"the prefix {sel!r}"
    return f"the selection {describe(sel)}"


def resolve_modalities(
    modalities,
    model: Optional[nn.Module] = None,
    with_buffers: bool = False,
    conv_only: bool = False,
    arg: str = "modalities",
) -> Tuple[List[str], List[List[Tensor]], List[List[Tensor]]]:
    """Turn the user's modality selections into lists of parameters (and buffers).

    Args:
        modalities: dict name -> selection, or a list of selections (named ``"0"``, ``"1"``, ...).
        model: the model that name prefixes refer to.
        with_buffers: also collect the buffers of module and prefix selections (BatchNorm statistics).
        conv_only: keep only 4-D (convolution) weights, the OGM reference's selection.
        arg: the argument's name in error messages (``""``: each selection is named by its key alone).

    Returns:
        ``(names, params, buffers)``: M names, M lists of trainable parameters, M lists of buffers (empty lists when
        ``with_buffers`` is False or the selection is a plain parameter list).

    Raises:
        ValueError: a selection matches no trainable parameter, a prefix is empty or given without ``model``, or a
            parameter belongs to two modalities.
        TypeError: a selection of an unsupported type.
    """
    items = _named(modalities, arg or "modalities")
    kind = "4-D (conv) parameter" if conv_only else "trainable parameter"
    names, params, buffers = [], [], []
    owner: Dict[int, str] = {}
    for name, sel in items.items():
        label = f"{arg}[{name!r}]" if arg else name
        bufs: List[Tensor] = []
        if isinstance(sel, nn.Module):
            ps = list(sel.parameters())
            if with_buffers:
                bufs = list(sel.buffers())
        elif isinstance(sel, str):
            if not sel:
                raise ValueError(f"{label}: expected a non-empty name prefix, got '' (the whole model)")
            if not isinstance(model, nn.Module):
                raise ValueError(f"{label}: the name prefix {sel!r} needs model= (the module to search)")
            ps = [p for n, p in model.named_parameters() if matches_prefix(n, sel)]
            if with_buffers:
                bufs = [b for n, b in model.named_buffers() if matches_prefix(n, sel)]
        elif isinstance(sel, Mapping):
            if "params" not in sel:
                raise TypeError(f"{label}: expected a param-group dict with a 'params' entry")
            group = sel["params"]
            ps = [group] if isinstance(group, Tensor) else list(group)
        elif isinstance(sel, Tensor):
            ps = [sel]
        else:
            try:
                ps = list(sel)
            except TypeError:
                raise TypeError(
                    f"{label}: expected a module, a name prefix, parameters or a param group, "
                    f"got {type(sel).__name__}"
                ) from None
        for p in ps:
            if not isinstance(p, Tensor):
                raise TypeError(f"{label}: expected parameters (tensors), got {type(p).__name__}")
        ps = [p for p in ps if p.requires_grad and (not conv_only or p.dim() == 4)]
        if not ps:
            # With conv_only the choice that empties the selection is conv_only's: the error names it first.
            where = "conv_only: expected encoders with 4-D (conv) weights, but " if conv_only else ""
            raise ValueError(
                f"{where}{label}: {_what(sel)} selects no {kind}; the method would silently modulate nothing"
            )
        for p in ps:
            if id(p) in owner and owner[id(p)] != name:
                raise ValueError(
                    f"{label}: a parameter of shape {tuple(p.shape)} is selected by both modality "
                    f"{owner[id(p)]!r} and modality {name!r}"
                )
            owner[id(p)] = name
        names.append(name)
        params.append(ps)
        buffers.append(bufs)
    return names, params, buffers


def per_modality_values(values, names: Sequence[str], what: str) -> List[float]:
    """One finite float per modality from a dict, a sequence or a 1-D tensor (read on the host: epoch-level calls)."""
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values and (not n.isdigit() or int(n) not in values)]
        if missing:
            raise ValueError(f"{what}: expected a value for every modality, got none for {missing}")
        out = [values[n] if n in values else values[int(n)] for n in names]
    elif isinstance(values, Tensor):
        if values.dim() != 1 or values.numel() != len(names):
            raise ValueError(f"{what}: expected a tensor [{len(names)}], got shape {tuple(values.shape)}")
        out = values.detach().to("cpu", torch.float64).tolist()
    else:
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(
                f"{what}: expected one number per modality (a sequence, dict or tensor), got {describe(values)}"
            )
        out = list(values)
        if len(out) != len(names):
            raise ValueError(f"{what}: expected {len(names)} values (one per modality), got {len(out)}")
    try:
        out = [float(v) for v in out]
    except (TypeError, ValueError):
        raise TypeError(f"{what}: expected numbers, got {describe(out)}") from None
    bad = [n for n, v in zip(names, out) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: expected finite values, got a non-finite value for modalities {bad}")
    return out
