"""FSDP2 support: the methods on parameters and gradients sharded by ``torch.distributed.fsdp.fully_shard``.

Element-wise gradient changes act on the local shards as they are. OGM-GE's noise needs each shard's global element
offset (:func:`local_shards`, from the DTensor metadata, no communication) and the whole gradient's std. What reads
the fusion head's weights outside its forward reads them whole: :func:`gathered` all-gathers a head for a block,
:func:`full` gives a whole weight that back-propagates into its shard. Every function is a no-op on plain tensors
(docs/training-at-scale.md, "FSDP").
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:  # torch.distributed may be built without DTensor (some platforms)
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - no distributed build
    DTensor, Shard = None, None

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - no distributed build
    FSDPModule = None

__all__ = ["is_sharded", "is_sharded_on_rows", "shard_start", "local_shards", "gathered", "reshard", "full",
           "first_parameter"]


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2)."""
    return DTensor is not None and isinstance(t, DTensor)


def shard_start(t: Tensor, name: str = "tensor") -> int:
    """The global index of the first element of this rank's shard of ``t`` in the flattened whole tensor.

    Args:
        t: a ``DTensor`` sharded on dim 0 over a 1-D mesh (FSDP2's layout).
        name: how errors name it.

    Returns:
        ``row0 * (numel / n_0)``, read from the metadata (no communication).
    """
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"{name}: expected a DTensor sharded on dim 0 over a 1-D mesh (fully_shard's default), got placements "
            f"{tuple(placements)} on a {mesh.ndim}-D mesh"
        )
    world, rank = mesh.size(), mesh.get_local_rank()
    n0 = t.shape[0]
    chunk = -(-n0 // world)
    row0 = min(rank * chunk, n0)
    return row0 * (t.numel() // n0) if n0 else 0


def is_sharded_on_rows(t) -> bool:
    """Whether ``t`` is a ``DTensor`` in FSDP2's default layout (``Shard(0)`` over a 1-D mesh): each rank holds whole
    rows."""
    return is_sharded(t) and t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)


def local_shards(tensors: Sequence[Tensor], name: str = "grads") -> Tuple[List[Tensor], List[int], object]:
    """This rank's shards of FSDP2-sharded tensors, their global element offsets and the group they span.

    Args:
        tensors: ``DTensor`` s sharded on dim 0 over one 1-D mesh (e.g. the ``.grad`` of ``fully_shard`` parameters).
        name: how errors name them.

    Returns:
        ``(shards, starts, group)``: the local tensors (views of the DTensors' storage: writing into them writes the
        gradients), ``starts[i]`` = :func:`shard_start`, and the mesh's process group.
    """
    shards, starts, mesh = [], [], None
    for i, t in enumerate(tensors):
        if not is_sharded(t):
            raise ValueError(
                f"{name}[{i}]: expected every tensor sharded (a DTensor) when one is, got a {type(t).__name__}; "
                "shard every modulated module with fully_shard or none"
            )
        if mesh is None:
            mesh = t.device_mesh
        elif t.device_mesh != mesh:
            raise ValueError(f"{name}[{i}]: on another device mesh than {name}[0]; expected one mesh for all")
        starts.append(shard_start(t, f"{name}[{i}]"))
        with torch.no_grad():
            shards.append(t.to_local())
    return shards, starts, mesh.get_group()


def _units(module: nn.Module) -> List[nn.Module]:
    if FSDPModule is None:
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(module: nn.Module, name: str = "fusion") -> Iterator[nn.Module]:
    """Inside the block, ``module``'s FSDP2-sharded parameters are whole; units that were sharded are resharded on
    exit. Units already whole (between a forward without resharding and its backward) are left as they are.

    Every ``fully_shard`` unit inside ``module`` is all-gathered (one collective each). A module whose sharded
    parameters belong to a unit above it (``fully_shard`` applied only to a parent) cannot be gathered alone: that
    raises, naming the fix.
    """
    sharded = [p for p in module.parameters() if is_sharded(p)]
    if not sharded:
        yield module
        return
    units = _units(module)
    owned = {id(p) for u in units for p in u.parameters()}
    if not units or any(id(p) not in owned for p in sharded):
        raise ValueError(
            f"{name}: its parameters are sharded by a fully_shard applied to a parent module; apply fully_shard "
            f"to {name} itself (it is then all-gathered on its own when read outside its forward)"
        )
    was_sharded: List[nn.Module] = []
    for u in units:
        # The parameters this unit manages: its subtree's, less those of the units inside it.
        inner = {id(p) for v in _units(u) if v is not u for p in v.parameters()}
        managed = [p for p in u.parameters() if id(p) not in inner]
        if any(is_sharded(p) for p in managed):
            was_sharded.append(u)
            u.unshard()
    try:
        yield module
    finally:
        for u in was_sharded:
            u.reshard()


def reshard(module: nn.Module) -> None:
    """Reshard every ``fully_shard`` unit inside ``module`` (a no-op on units already sharded and on plain modules).

    A root unit stays unsharded after a forward without gradients (no backward comes to reshard it), with its module
    holding whole copies of the parameters: the sharded parameters are then not what ``module.parameters()`` gives,
    and a change to them is not seen by the next forward, which finds the unit already gathered. A pass under
    ``torch.no_grad`` calls this after it.
    """
    for unit in _units(module):
        unit.reshard()


def full(t: Tensor) -> Tensor:
    """``t`` whole: a sharded ``DTensor`` is all-gathered, with a gradient that flows back into its shard (every rank
    computes the same from the whole tensor, so each keeps its slice of the same gradient); a plain tensor is
    returned as it is."""
    if is_sharded(t):
        return t.full_tensor()
    return t


def first_parameter(module: nn.Module) -> Optional[Tensor]:
    """The module's first parameter (or None): the object a method compares to detect a model sharded after the
    method was built."""
    return next(module.parameters(), None)
