"""Fusion heads and the per-modality logits that OGM, OPM and AGM read from them.

A fusion head maps M per-modality feature tensors ``h_m [B, d_m]`` to logits ``[B, C]`` and is called as
``fusion(*features)``. OGM scores each modality on its own logits ``out_m [B, C]``:

- concat head (one ``Linear`` over ``cat(h_0, ..., h_{M-1})``, weight ``W [C, sum d_m]``, bias ``b [C]``):
  ``out_m = h_m W[:, slice_m]^T + b / M``, so that ``sum_m out_m`` is the head's output;
- sum head (``fc_m(h_m)`` summed): ``out_m = fc_m(h_m)`` with its full bias;
- any other head (MLP, gated, FiLM, a user's module): the head run with every other modality's features set to
  zero ("zero-out", the recommendation of the OGM-GE maintainers).

:func:`per_modality_logits` picks the right rule for a head; the heads here also expose ``contributions`` (the
additive decomposition used by AGM's factorized evaluation) where the head is additive, and ``split_head`` (a first
layer linear in each modality's features and the tail after it; :func:`head_split`) where the maths allows.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import sharding

__all__ = [
    "ConcatFusion",
    "SumFusion",
    "MLPFusion",
    "GatedFusion",
    "FiLMFusion",
    "FUSION_METHODS",
    "build_fusion",
    "output_layer",
    "per_modality_logits",
    "HeadSplit",
    "head_split",
    "has_head_split",
]


class HeadSplit(NamedTuple):
    """A head cut after its first layer, which is linear in each modality's features (docs/methods.md, section 5).

    ``head(*features) == tail(z)`` with ``z = bias + sum_m pieces[m]`` (``layout="sum"``, every piece ``[B, H]``) or
    ``z = cat(pieces, 1) + bias`` (``layout="concat"``, piece m ``[B, H_m]``). ``pieces[m]`` depends on ``h_m`` alone
    and linearly (no bias, no mode); ``tail`` maps ``[N, H] -> [N, C]`` row by row in eval mode.

    Args:
        pieces: M tensors, the partial products of the first layer.
        bias: ``[H]`` or None.
        tail: the rest of the head.
        layout: ``"sum"`` or ``"concat"``.

    Example:
        >>> s = MLPFusion([4, 4], 3, hidden=8).split_head(torch.ones(2, 4), torch.ones(2, 4))
        >>> s.tail(s.bias + s.pieces[0] + s.pieces[1]).shape
        torch.Size([2, 3])
    """

    pieces: List[Tensor]
    bias: Optional[Tensor]
    tail: Callable[[Tensor], Tensor]
    layout: str


def _linear_pieces(weight: Tensor, features: Sequence[Tensor], dims: Sequence[int]) -> List[Tensor]:
    return [nn.functional.linear(h, w) for h, w in zip(features, torch.split(weight, list(dims), dim=1))]


def _is_split_sequential(fusion: nn.Module) -> bool:
    return isinstance(fusion, nn.Sequential) and len(fusion) > 0 and isinstance(fusion[0], nn.Linear)


def has_head_split(fusion: nn.Module) -> bool:
    """Whether :func:`head_split` can cut ``fusion``: it has ``split_head``, or it is an ``nn.Sequential`` whose first
    module is an ``nn.Linear`` (run on the concatenated features)."""
    return callable(getattr(fusion, "split_head", None)) or _is_split_sequential(fusion)


def head_split(fusion: nn.Module, features: Sequence[Tensor]) -> HeadSplit:
    """The head's :class:`HeadSplit` on M features ``[N, d_m]``: its own ``split_head``, or for an ``nn.Sequential``
    that starts with an ``nn.Linear`` over the concatenated features, that layer's column blocks and the rest."""
    M = len(features)
    if _is_split_sequential(fusion):
        first = fusion[0]
        dims = []
        for m, f in enumerate(features):
            if f.dim() != 2:
                raise ValueError(
                    f"encoders[{m}]: expected features [B, d_m] (an nn.Sequential fusion runs on their "
                    f"concatenation), got shape {tuple(f.shape)}"
                )
            dims.append(f.shape[1])
        if sum(dims) != first.in_features:
            raise ValueError(
                f"fusion: expected an nn.Sequential whose first nn.Linear has in_features={sum(dims)} (the features' "
                f"dims {dims}), got in_features={first.in_features}"
            )
        return HeadSplit(_linear_pieces(first.weight, features, dims), first.bias, fusion[1:], "sum")
    split = fusion.split_head(*features)
    if not isinstance(split, HeadSplit):
        raise TypeError(f"fusion.split_head: expected to return a HeadSplit, got {type(split).__name__}")
    if len(split.pieces) != M:
        raise ValueError(f"fusion.split_head: expected one piece per modality ({M}), got {len(split.pieces)} pieces")
    if split.layout not in ("sum", "concat"):
        raise ValueError(f"fusion.split_head: expected layout 'sum' or 'concat', got {split.layout!r}")
    rows = features[0].shape[0]
    for m, p in enumerate(split.pieces):
        if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[0] != rows:
            got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"fusion.split_head: expected piece {m} of shape [{rows}, H], got {got}")
    if split.layout == "sum" and any(p.shape[1] != split.pieces[0].shape[1] for p in split.pieces):
        raise ValueError(
            "fusion.split_head: expected pieces of one width with layout 'sum', got widths "
            f"{[p.shape[1] for p in split.pieces]}"
        )
    return split


def _unpack(features: Sequence) -> Tuple[Tensor, ...]:
    # Accept fusion(h_0, ..., h_{M-1}) and fusion([h_0, ..., h_{M-1}]) alike.
    if len(features) == 1 and isinstance(features[0], (list, tuple)):
        features = features[0]
    return tuple(features)


def _check_features(features: Sequence[Tensor], dims: Optional[Sequence[int]], name: str = "features") -> None:
    """Metadata checks: M tensors ``[B, d_m]`` of one floating dtype family, one batch size, one device."""
    if len(features) < 1:
        raise ValueError(f"{name}: expected at least one feature tensor, got none")
    if dims is not None and len(features) != len(dims):
        raise ValueError(f"{name}: expected {len(dims)} feature tensors (one per modality), got {len(features)}")
    batch = None
    device = None
    for m, h in enumerate(features):
        if not isinstance(h, Tensor):
            raise TypeError(f"{name}[{m}]: expected a Tensor, got {type(h).__name__}")
        if h.dim() != 2:
            raise ValueError(f"{name}[{m}]: expected a [B, d] tensor, got shape {tuple(h.shape)}")
        if not h.is_floating_point():
            raise TypeError(f"{name}[{m}]: expected a floating-point tensor, got {h.dtype}")
        if dims is not None and h.shape[1] != dims[m]:
            raise ValueError(f"{name}[{m}]: expected feature dimension {dims[m]}, got {h.shape[1]}")
        if batch is None:
            batch, device = h.shape[0], h.device
        elif h.shape[0] != batch:
            raise ValueError(f"{name}[{m}]: batch size {h.shape[0]} differs from {name}[0]'s {batch}")
        elif h.device != device:
            raise ValueError(f"{name}[{m}]: on {h.device}, but {name}[0] is on {device}")


def _check_dims(dims: Sequence[int], min_modalities: int = 1) -> List[int]:
    dims = [int(d) for d in dims]
    if len(dims) < min_modalities:
        raise ValueError(f"dims: expected at least {min_modalities} modalities, got {len(dims)}")
    if any(d <= 0 for d in dims):
        raise ValueError(f"dims: every feature dimension must be positive, got {dims}")
    return dims


def _zero_out_batched(head: nn.Module, features: Sequence[Tensor]) -> Tensor:
    """Zero-out logits ``[M, B, C]`` in one call of a per-sample head.

    Block m of the stacked batch holds modality m's features and zeros for the others; the head must treat every
    sample independently (true for the heads of this module, which have no batch statistics).
    """
    M = len(features)
    B = features[0].shape[0]
    stacked = []
    for j, h in enumerate(features):
        zeros = h.new_zeros(h.shape)
        stacked.append(torch.cat([h if j == m else zeros for m in range(M)], dim=0))
    out = head(*stacked)
    return out.view(M, B, -1)


class ConcatFusion(nn.Module):
    """Concatenation fusion: one ``Linear`` over ``cat(h_0, ..., h_{M-1})`` (the reference's ``concat``).

    Args:
        dims: feature dimensions ``d_m``, one per modality.
        num_classes: C.
        bias: whether the linear layer has a bias.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, bias: bool = True):
        super().__init__()
        self.dims = _check_dims(dims)
        self.fc = nn.Linear(sum(self.dims), num_classes, bias=bias)

    def forward(self, *features: Tensor) -> Tensor:
        """Logits ``[B, C]`` from M features ``[B, d_m]``."""
        features = _unpack(features)
        _check_features(features, self.dims)
        return self.fc(torch.cat(features, dim=1))

    def _weight_slices(self) -> List[Tensor]:
        return list(torch.split(self.fc.weight, self.dims, dim=1))

    def contributions(self, *features: Tensor) -> Tuple[List[Tensor], Optional[Tensor]]:
        """The additive decomposition of the head.

        Returns:
            ``(parts, bias)``: M tensors ``[B, C]``, ``parts[m] = h_m W[:, slice_m]^T``, and the bias ``[C]`` (or
            None), with ``forward(*features) == sum(parts) + bias``.
        """
        features = _unpack(features)
        _check_features(features, self.dims)
        parts = [h @ w.t() for h, w in zip(features, self._weight_slices())]
        return parts, self.fc.bias

    def split_head(self, *features: Tensor) -> HeadSplit:
        """The head as :class:`HeadSplit`: the whole head is its first layer, the tail is the identity."""
        parts, bias = self.contributions(*features)
        return HeadSplit(parts, bias, nn.Identity(), "sum")

    def per_modality_logits(self, *features: Tensor) -> Tensor:
        """OGM's per-modality logits ``[M, B, C]``: ``out_m = h_m W[:, slice_m]^T + b / M``."""
        parts, bias = self.contributions(*features)
        out = torch.stack(parts)
        if bias is not None:
            out = out + bias / len(parts)
        return out


class SumFusion(nn.Module):
    """Sum fusion: ``sum_m fc_m(h_m)`` with one ``Linear(d_m, C)`` per modality (the reference's ``sum``).

    Args:
        dims: feature dimensions ``d_m``, one per modality.
        num_classes: C.
        bias: whether each ``fc_m`` has a bias.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, bias: bool = True):
        super().__init__()
        self.dims = _check_dims(dims)
        self.fcs = nn.ModuleList(nn.Linear(d, num_classes, bias=bias) for d in self.dims)

    def forward(self, *features: Tensor) -> Tensor:
        """Logits ``[B, C]`` from M features ``[B, d_m]``."""
        parts, _ = self.contributions(*features)
        return torch.stack(parts).sum(0)

    def contributions(self, *features: Tensor) -> Tuple[List[Tensor], Optional[Tensor]]:
        """The additive decomposition of the head.

        Returns:
            ``(parts, None)``: M tensors ``[B, C]``, ``parts[m] = fc_m(h_m)`` including its bias.
        """
        features = _unpack(features)
        _check_features(features, self.dims)
        return [fc(h) for fc, h in zip(self.fcs, features)], None

    def per_modality_logits(self, *features: Tensor) -> Tensor:
        """OGM's per-modality logits ``[M, B, C]``: ``out_m = fc_m(h_m)`` with its full bias."""
        parts, _ = self.contributions(*features)
        return torch.stack(parts)


class MLPFusion(nn.Module):
    """Concatenation followed by a two-layer MLP: ``Linear(sum d_m, hidden) -> ReLU -> Linear(hidden, C)``.

    Not additive over modalities, so its per-modality logits are the zero-out outputs.

    Args:
        dims: feature dimensions ``d_m``, one per modality.
        num_classes: C.
        hidden: width of the hidden layer.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, hidden: int = 256):
        super().__init__()
        self.dims = _check_dims(dims)
        self.net = nn.Sequential(nn.Linear(sum(self.dims), hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, *features: Tensor) -> Tensor:
        """Logits ``[B, C]`` from M features ``[B, d_m]``."""
        features = _unpack(features)
        _check_features(features, self.dims)
        return self.net(torch.cat(features, dim=1))

    def split_head(self, *features: Tensor) -> HeadSplit:
        """:class:`HeadSplit`: the hidden layer's column blocks ``h_m W1[:, slice_m]^T`` (summed), ReLU and the output
        layer as the tail."""
        features = _unpack(features)
        _check_features(features, self.dims)
        first = self.net[0]
        return HeadSplit(_linear_pieces(first.weight, features, self.dims), first.bias, self.net[1:], "sum")

    def per_modality_logits(self, *features: Tensor) -> Tensor:
        """Zero-out logits ``[M, B, C]``: row m is the head run with every modality but m set to zero."""
        features = _unpack(features)
        _check_features(features, self.dims)
        return _zero_out_batched(self, features)


class GatedFusion(nn.Module):
    """Gated fusion: a sigmoid gate computed from one modality modulates the others.

    Every modality is first projected, ``z_m = fc_m(h_m) [B, hidden]``; then
    ``out = fc_out(sigmoid(z_g) * sum_{m != g} z_m)`` with ``g = gate``. For two modalities this is the reference's
    gated fusion (``x_gate=True`` is ``gate=0``, ``x_gate=False`` is ``gate=1``).

    Args:
        dims: feature dimensions ``d_m``, one per modality (at least two).
        num_classes: C.
        hidden: width of the projections (default: ``dims[gate]``).
        gate: the modality whose projection gives the gate.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, hidden: Optional[int] = None, gate: int = 0):
        super().__init__()
        self.dims = _check_dims(dims, min_modalities=2)
        if not 0 <= gate < len(self.dims):
            raise ValueError(f"gate: expected a modality index in [0, {len(self.dims)}), got {gate}")
        self.gate = gate
        hidden = self.dims[gate] if hidden is None else int(hidden)
        self.fcs = nn.ModuleList(nn.Linear(d, hidden) for d in self.dims)
        self.fc_out = nn.Linear(hidden, num_classes)

    def forward(self, *features: Tensor) -> Tensor:
        """Logits ``[B, C]`` from M features ``[B, d_m]``."""
        features = _unpack(features)
        _check_features(features, self.dims)
        z = [fc(h) for fc, h in zip(self.fcs, features)]
        return self._tail(z)

    def _tail(self, z: Sequence[Tensor]) -> Tensor:
        gated = torch.stack([z_m for m, z_m in enumerate(z) if m != self.gate]).sum(0)
        return self.fc_out(torch.sigmoid(z[self.gate]) * gated)

    def split_head(self, *features: Tensor) -> HeadSplit:
        """:class:`HeadSplit` (sum, width ``2 hidden``): the gate's projection ``h_g W_g^T`` in the first half, every
        other modality's ``h_m W_m^T`` in the second, where they add up; the tail is the gate and the output layer."""
        features = _unpack(features)
        _check_features(features, self.dims)
        pieces = []
        for m, (fc, h) in enumerate(zip(self.fcs, features)):
            p = nn.functional.linear(h, fc.weight)
            pieces.append(torch.cat([p, torch.zeros_like(p)] if m == self.gate else [torch.zeros_like(p), p], dim=1))
        others = [fc.bias for m, fc in enumerate(self.fcs) if m != self.gate]
        bias = torch.cat([self.fcs[self.gate].bias, torch.stack(others).sum(0)])
        width = self.fc_out.in_features

        def tail(z: Tensor) -> Tensor:
            return self.fc_out(torch.sigmoid(z[:, :width]) * z[:, width:])

        return HeadSplit(pieces, bias, tail, "sum")

    def per_modality_logits(self, *features: Tensor) -> Tensor:
        """Zero-out logits ``[M, B, C]``: row m is the head run with every modality but m set to zero."""
        features = _unpack(features)
        _check_features(features, self.dims)
        return _zero_out_batched(self, features)


class FiLMFusion(nn.Module):
    """FiLM fusion: one modality produces a scale and shift (gamma, beta) for each of the others.

    With ``c = condition``: ``[gamma_m, beta_m] = fc(h_c)`` for every ``m != c``, ``u_m = gamma_m * h_m + beta_m``,
    ``out = fc_out(cat_{m != c} u_m)``. For two modalities this is the reference's FiLM fusion (``x_film=True`` is
    ``condition=0``).

    Args:
        dims: feature dimensions ``d_m``, one per modality (at least two).
        num_classes: C.
        condition: the modality that conditions the others.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, condition: int = 0):
        super().__init__()
        self.dims = _check_dims(dims, min_modalities=2)
        if not 0 <= condition < len(self.dims):
            raise ValueError(f"condition: expected a modality index in [0, {len(self.dims)}), got {condition}")
        self.condition = condition
        self._others = [m for m in range(len(self.dims)) if m != condition]
        modulated = sum(self.dims[m] for m in self._others)
        self.fc = nn.Linear(self.dims[condition], 2 * modulated)
        self.fc_out = nn.Linear(modulated, num_classes)

    def forward(self, *features: Tensor) -> Tensor:
        """Logits ``[B, C]`` from M features ``[B, d_m]``."""
        features = _unpack(features)
        _check_features(features, self.dims)
        return self._tail(self.fc(features[self.condition]), [features[m] for m in self._others])

    def _tail(self, film: Tensor, others: Sequence[Tensor]) -> Tensor:
        sizes = [self.dims[m] for m in self._others]
        gammas = torch.split(film[:, : sum(sizes)], sizes, dim=1)
        betas = torch.split(film[:, sum(sizes) :], sizes, dim=1)
        u = [g * h + b for g, b, h in zip(gammas, betas, others)]
        return self.fc_out(torch.cat(u, dim=1))

    def split_head(self, *features: Tensor) -> HeadSplit:
        """:class:`HeadSplit` (concat): the conditioning projection ``h_c W^T`` and the other modalities' features
        themselves (the identity is linear); the tail applies gamma and beta, then the output layer. The tail keeps
        ``fc_out``: it acts on products of two modalities' features, so it cannot be split."""
        features = _unpack(features)
        _check_features(features, self.dims)
        pieces = [nn.functional.linear(h, self.fc.weight) if m == self.condition else h
                  for m, h in enumerate(features)]
        bias = torch.cat([self.fc.bias if m == self.condition else self.fc.bias.new_zeros(d)
                          for m, d in enumerate(self.dims)])
        widths = [p.shape[1] for p in pieces]
        c = self.condition

        def tail(z: Tensor) -> Tensor:
            blocks = torch.split(z, widths, dim=1)
            return self._tail(blocks[c], [blocks[m] for m in self._others])

        return HeadSplit(pieces, bias, tail, "concat")

    def per_modality_logits(self, *features: Tensor) -> Tensor:
        """Zero-out logits ``[M, B, C]``: row m is the head run with every modality but m set to zero."""
        features = _unpack(features)
        _check_features(features, self.dims)
        return _zero_out_batched(self, features)


FUSION_METHODS = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "mlp": MLPFusion,
    "gated": GatedFusion,
    "film": FiLMFusion,
}


def build_fusion(method: str, dims: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build a fusion head by the reference's ``--fusion_method`` name.

    Args:
        method: one of ``"concat"``, ``"sum"``, ``"gated"``, ``"film"`` (the reference's names) or ``"mlp"``.
        dims: feature dimensions ``d_m``, one per modality.
        num_classes: C.
        **kwargs: passed to the head's constructor (``hidden``, ``gate``, ``condition``, ``bias``).

    Returns:
        The head module.
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"method: expected one of {sorted(FUSION_METHODS)}, got {method!r}")
    return FUSION_METHODS[method](dims, num_classes, **kwargs)


def output_layer(module: nn.Module, name: str = "fusion") -> nn.Linear:
    """The output layer of a head: the module itself if it is an ``nn.Linear``, else its last ``nn.Linear``.

    Every head of this module ends in its output layer (concat: ``fc``, MLP: ``net[2]``, gated and FiLM:
    ``fc_out``); CGGM compares its per-modality heads with it.

    Args:
        module: the head.
        name: the argument's name for the error message.

    Returns:
        The ``nn.Linear`` output layer.
    """
    if isinstance(module, nn.Linear):
        return module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{name}: expected a module with an nn.Linear output layer, got {type(module).__name__}")
    return linears[-1]


def linear_heads(
    dims: Optional[Sequence[int]], like: Tensor, M: int, num_classes: Optional[int] = None
) -> List[nn.Module]:
    """M unimodal heads ``nn.Linear(d_m, C)`` on the device and dtype of ``like`` (an output layer's weight ``[C, D]``;
    C = ``num_classes`` if given). With ``dims`` None the heads are ``nn.LazyLinear(C)``: their input sizes come from
    the first features they see (an optimizer built before that holds the same parameter objects)."""
    C = like.shape[0] if num_classes is None else num_classes
    if dims is None:
        return [nn.LazyLinear(C, device=like.device, dtype=like.dtype) for _ in range(M)]
    return [nn.Linear(d, C, device=like.device, dtype=like.dtype) for d in dims]


class _PerModalityLogits(nn.Module):
    # A module around per_modality_logits, so that torch.func.functional_call can swap in detached parameters.
    def __init__(self, fusion: nn.Module, head: Optional[str]):
        super().__init__()
        self.fusion = fusion
        self.head = head

    def forward(self, *features: Tensor) -> Tensor:
        return per_modality_logits(self.fusion, features, self.head)


def per_modality_logits(
    fusion: nn.Module, features: Sequence[Tensor], head: Optional[str] = None, detach_params: bool = False
) -> Tensor:
    """Per-modality logits ``[M, B, C]`` of any fusion head (docs/methods.md, section 2).

    The rule, unless ``head`` names one:

    - a head with a ``per_modality_logits`` method (every head of this module): that method;
    - a plain ``nn.Linear`` over the concatenated features: ``h_m W[:, slice_m]^T + b / M``;
    - anything else: zero-out, one call of ``fusion`` per modality with the other modalities' features set to
      zero (one call each, so heads with batch statistics see ordinary batches).

    Gradients flow through the result; wrap the call in ``torch.no_grad()`` for scores only, or pass
    ``detach_params=True`` to run the head with its parameters detached (a detached copy of the head, as the journal
    code scores OPM): gradients then reach the features only.

    Args:
        fusion: the head, called as ``fusion(*features) -> [B, C]``.
        features: M tensors ``[B, d_m]``.
        head: force a rule: ``"concat"`` (needs a ``weight [C, sum d_m]`` and optional ``bias``) or ``"zero_out"``.
        detach_params: run the head with detached parameters.

    Returns:
        ``[M, B, C]`` tensor.
    """
    features = _unpack(tuple(features))
    _check_features(features, None)
    sharded = any(sharding.is_sharded(p) for p in fusion.parameters())
    if sharded and torch.is_grad_enabled() and not detach_params:
        raise ValueError(
            "fusion: its parameters are sharded (FSDP2), so a gradient through them could not reach the shards; "
            "call per_modality_logits under torch.no_grad() or with detach_params=True"
        )
    # Under FSDP2 the head's weights are read whole here, outside its forward (agm_fast.sharding.gathered); detached
    # copies of them outlive the block, for a backward through the features.
    with sharding.gathered(fusion):
        return _per_modality_logits(fusion, features, head, detach_params, copy=sharded)


def _per_modality_logits(
    fusion: nn.Module, features, head: Optional[str], detach_params: bool, copy: bool = False
) -> Tensor:
    if head not in (None, "concat", "zero_out"):
        raise ValueError(f"head: expected None, 'concat' or 'zero_out', got {head!r}")
    if detach_params:
        params = {f"fusion.{name}": p.detach().clone() if copy else p.detach() for name, p in fusion.named_parameters()}
        return torch.func.functional_call(_PerModalityLogits(fusion, head), params, tuple(features))
    if head is None and hasattr(fusion, "per_modality_logits"):
        return fusion.per_modality_logits(*features)
    if head == "concat" or (head is None and isinstance(fusion, nn.Linear)):
        weight = getattr(fusion, "weight", None)
        dims = [h.shape[1] for h in features]
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != sum(dims):
            got = None if not isinstance(weight, Tensor) else tuple(weight.shape)
            raise ValueError(
                f"fusion: a concat head needs a weight [C, {sum(dims)}] over the concatenated features, got {got}"
            )
        bias = getattr(fusion, "bias", None)
        out = torch.stack([h @ w.t() for h, w in zip(features, torch.split(weight, dims, dim=1))])
        return out if bias is None else out + bias / len(features)
    outs = []
    for m in range(len(features)):
        muted = [h if j == m else torch.zeros_like(h) for j, h in enumerate(features)]
        out = fusion(*muted)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise TypeError(f"fusion: expected the head to return a [B, C] tensor, got {type(out).__name__}")
        outs.append(out)
    return torch.stack(outs)
