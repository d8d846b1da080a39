"""AGM (Li et al., ICCV 2023): Shapley mono-modal outputs and adaptive gradient modulation (SPEC sections 1 and 5).

Three classes:

- :class:`GradMod`, the mirror of the reference wrapper: ``forward(*inputs) -> (psi_0, ..., psi_{M-1}, out)`` and
  ``update_scale(*coeffs)``, for code ported from the reference training loop;
- :class:`AGMCoefficients`, the reference loop's score, running-mean and coefficient arithmetic, on the device;
- :class:`AGM`, the one-call form: ``res = agm(*inputs, target=y, epoch=epoch)`` evaluates every subset output,
  the mono-modal outputs, scores and coefficients in one op, and returns logits whose value is f(A) and whose
  gradient is already modulated.

How the subset outputs f(S) are evaluated (``strategy``, one result up to float rounding):

- ``"sequential"``: one model call per subset (the reference): the full pass in the model's current mode, then every
  masked pass in eval mode, after which each submodule gets its previous mode back.
- ``"batched"``: the full pass, then every masked pass stacked along the batch into one eval-mode call of the model.
  Exact for any model whose eval-mode output is per-sample (BatchNorm running stats, no dropout).
- ``"factorized"`` (``encoders=[...]``, ``fusion=``; the model is ``fusion(enc_0(x_0), ..., enc_{M-1}(x_{M-1}))``):
  each encoder runs on the real input once in its current mode (the full pass) and once in eval mode (the masked
  passes), a muted encoder runs once on a single zero sample in eval mode and is broadcast, and the fusion runs once
  in its current mode (the full set) and once in eval mode over every masked subset stacked. A linear head (an
  ``nn.Linear`` over the concatenated features, or any module with ``contributions(*features) -> (pieces, bias)``
  such that ``fusion(*features) == sum(pieces) + bias``) needs no subset evaluation of the head: f(S) is assembled
  from per-modality ``[B, C]`` pieces.
- ``"auto"``: factorized when encoders and fusion are given, batched for a black-box model (choose ``"sequential"``
  for a model whose eval-mode output mixes samples, e.g. one that normalises over the batch in eval mode).

``max_batch`` bounds the rows of a stacked call: the masked subsets are split into chunks of at most
``max_batch // B`` subsets (at least one).

The full pass always runs first, so masked eval-mode passes see the BatchNorm running statistics after this step's
update, and it is the only pass that updates them or draws dropout masks. No pass is detached.

Parity switches and behaviour beyond the reference (all documented here and in the class docstrings):

- ``masked_mode="train"`` (factorized only, a deviation): the masked passes reuse the full pass's train-mode encoder
  features; only the muted features come from a zero sample in eval mode. The cost is close to plain training.
- ``mute="feature"`` (factorized only): a muted modality's feature is a baseline (zeros, or given tensors or
  learned ``nn.Parameter`` s) instead of the encoder's output on a zero input.
- ``shapley="exact"`` returns phi (f(empty) is evaluated); ``"sampled"`` estimates the reference variant psi from
  ``num_permutations`` random permutations per step, drawn on the host from ``(seed, step)``; its estimates still sum
  to f(A) exactly. Exact variants support up to 8 modalities.
- Outside the modulation window the coefficients are 1; ``hold_last=True`` keeps the last value, as the reference
  code does.
- ``task="regression"`` scores each modality by the mean squared error of psi_m against the target.
- Non-finite logits propagate: the scores and coefficients of that step are NaN (so AMP's GradScaler skips the
  step) and the running state (running means, count, last coefficients) is left unchanged.
- The running state is updated only in training mode (``module.train()``); a call in eval mode computes the
  coefficients from the current state without changing it.

Typical use::

    agm = agm_fast.AGM(encoders=[audio_net, video_net], fusion=head, alpha=1.5, cap=10.0, window=(0, 70))
    for epoch in range(epochs):
        for audio, video, y in loader:
            res = agm(audio, video, target=y, epoch=epoch)
            loss = torch.nn.functional.cross_entropy(res.logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

Porting the reference loop::

    model = agm_fast.GradMod(model, num_modalities=2)
    coeff = agm_fast.AGMCoefficients(num_modalities=2, alpha=1.5, cap=10.0)
    m_a, m_v, out = model(audio, video)
    loss = criterion(out, y)
    model.update_scale(*coeff((m_a, m_v), y))
    loss.backward()
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import distributed, ops
from . import reference as ref
from .functional import _agm_check_modalities, _agm_check_target

__all__ = ["AGM", "AGMCoefficients", "AGMResult", "GradMod"]

_STRATEGIES = ("auto", "sequential", "batched", "factorized")
_SHAPLEY = ("reference", "exact", "sampled")
_MASKED_MODES = ("eval", "train")
_MUTES = ("input", "feature")
_TASKS = ("classification", "regression")

_MASK64 = (1 << 64) - 1

Coefficient = Union[float, int, Tensor]


class AGMResult(NamedTuple):
    """What :class:`AGM` returns for one step.

    Attributes:
        logits: ``[B, C]`` value f(A) (the full pass); its gradient reaches each subset output through the
            coefficient-scaled mono-modal outputs.
        mono: ``[M, B, C]`` mono-modal outputs psi (or phi with ``shapley="exact"``); differentiable.
        scores: ``[M]`` float32 per-modality scores of this batch (detached).
        coeffs: ``[M]`` float32 coefficients applied in this step (detached).
    """

    logits: Tensor
    mono: Tensor
    scores: Tensor
    coeffs: Tensor


def _step_seed(seed: int, step: int) -> int:
    # splitmix64 of (seed, step): neighbouring steps get unrelated permutation streams.
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    # A pageable host-to-device copy waits for the stream; from pinned memory it does not.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@contextlib.contextmanager
def _eval_mode(roots: Sequence[nn.Module]) -> Iterator[None]:
    """Put ``roots`` in eval mode and give every submodule its own previous mode back afterwards."""
    saved = [(mod, mod.training) for root in roots for mod in root.modules()]
    for root in roots:
        root.train(False)
    try:
        yield
    finally:
        for mod, flag in saved:
            mod.training = flag


def _check_choice(name: str, value: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_window(window) -> Optional[Tuple[int, int]]:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or (start_epoch, end_epoch), got {window!r}")
    start, end = window
    if start > end:
        raise ValueError(f"window must have start <= end (inclusive epochs), got {tuple(window)}")
    return (start, end)


def _check_scalar(name: str, value, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a float or None" if allow_none else "a float"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return float(value)


class _ShapleyBase(nn.Module):
    """Subset evaluation and Shapley weights shared by :class:`GradMod` and :class:`AGM`."""

    def __init__(
        self,
        model: Optional[nn.Module],
        num_modalities: Optional[int],
        encoders: Optional[Sequence[nn.Module]],
        fusion: Optional[nn.Module],
        strategy: str,
        masked_mode: str,
        shapley: str,
        mute: str,
        baselines: Optional[Sequence[Tensor]],
        num_permutations: int,
        seed: int,
        max_batch: Optional[int],
        register_model: bool,
    ) -> None:
        super().__init__()
        _check_choice("strategy", strategy, _STRATEGIES)
        _check_choice("masked_mode", masked_mode, _MASKED_MODES)
        _check_choice("shapley", shapley, _SHAPLEY)
        _check_choice("mute", mute, _MUTES)
        if model is not None and (encoders is not None or fusion is not None):
            raise ValueError("pass either model= (a black box) or encoders= and fusion= (factorized), not both")
        if model is None:
            if encoders is None or fusion is None:
                raise ValueError("pass model= (called as model(*inputs) -> [B, C]) or both encoders= and fusion=")
            if isinstance(encoders, nn.Module) and not isinstance(encoders, nn.ModuleList):
                raise TypeError("encoders must be a list of M modules, one per modality")
            encoders = list(encoders)
            for m, enc in enumerate(encoders):
                if not isinstance(enc, nn.Module):
                    raise TypeError(f"encoders[{m}] must be an nn.Module, got {type(enc).__name__}")
            if not isinstance(fusion, nn.Module):
                raise TypeError(f"fusion must be an nn.Module, got {type(fusion).__name__}")
            if num_modalities is None:
                num_modalities = len(encoders)
            elif num_modalities != len(encoders):
                raise ValueError(f"num_modalities={num_modalities} but {len(encoders)} encoders were given")
        else:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
            if num_modalities is None:
                raise ValueError("num_modalities is required with a black-box model")
        M = _agm_check_modalities(num_modalities, shapley)
        factorizable = model is None
        if strategy == "auto":
            strategy = "factorized" if factorizable else "batched"
        if strategy == "factorized" and not factorizable:
            raise ValueError("strategy='factorized' needs encoders=[...] and fusion=, not a black-box model")
        if masked_mode == "train" and strategy != "factorized":
            raise ValueError("masked_mode='train' shares encoder features and needs strategy='factorized'")
        if mute == "feature" and strategy != "factorized":
            raise ValueError("mute='feature' mutes encoder features and needs strategy='factorized'")
        if baselines is not None and mute != "feature":
            raise ValueError("baselines= are muted features and need mute='feature'")
        if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or num_permutations < 1:
            raise ValueError(f"num_permutations must be a positive int, got {num_permutations!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be None or a positive int (rows of the stacked batch), got {max_batch!r}")

        self.num_modalities = M
        self.strategy = strategy
        self.masked_mode = masked_mode
        self.shapley = shapley
        self.mute = mute
        self.num_permutations = num_permutations
        self.seed = int(seed)
        self.max_batch = max_batch
        # A plain tuple is not registered: AGM's state_dict holds the modulator state, not the model weights.
        self._parts = (model, tuple(encoders) if encoders is not None else None, fusion)
        if register_model:
            if model is not None:
                self.model = model
            else:
                self.encoders = nn.ModuleList(encoders)
                self.fusion = fusion
        self._linear_head = fusion is not None and (
            isinstance(fusion, nn.Linear) or callable(getattr(fusion, "contributions", None))
        )
        self._num_baselines = 0
        if baselines is not None:
            if len(baselines) != M:
                raise ValueError(f"baselines must hold one feature per modality ({M}), got {len(baselines)}")
            for m, b in enumerate(baselines):
                if not isinstance(b, Tensor):
                    raise TypeError(f"baselines[{m}] must be a tensor [d_m] (or an nn.Parameter), got {type(b)}")
                if isinstance(b, nn.Parameter):
                    self.register_parameter(f"baseline_{m}", b)
                else:
                    self.register_buffer(f"baseline_{m}", b.detach().clone(), persistent=False)
            self._num_baselines = M
        self._step = 0
        self._fixed = None if shapley == "sampled" else ref.subset_masks(M, shapley)
        self._W_cache = {}
        self._sel_cache = {}

    def get_extra_state(self) -> dict:
        return {"step": self._step}

    def set_extra_state(self, state: dict) -> None:
        self._step = int(state["step"])

    def _roots(self) -> List[nn.Module]:
        model, encoders, fusion = self._parts
        return [model] if model is not None else list(encoders) + [fusion]

    def _baseline(self, m: int) -> Optional[Tensor]:
        return getattr(self, f"baseline_{m}") if self._num_baselines else None

    def _plan(self, device: torch.device) -> Tuple[List[int], Tensor]:
        """Subsets (ascending; the full set last) and ``W [M, S]`` float32 on ``device`` for this step."""
        if self._fixed is not None:
            W = self._W_cache.get(device)
            if W is None:
                W = ref.shapley_weights(self.num_modalities, self._fixed, torch.float32).to(device)
                self._W_cache[device] = W
            return self._fixed, W
        gen = torch.Generator().manual_seed(_step_seed(self.seed, self._step))
        masks, W = ref.sampled_shapley_weights(self.num_modalities, self.num_permutations, gen)
        return masks, _to_device(W.to(torch.float32), device)

    def _selection(self, masks: List[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[k, M]`` 0/1 presence of each modality in each subset."""
        key = (tuple(masks), device, dtype)
        sel = self._sel_cache.get(key)
        if sel is None:
            rows = [[float((mask >> m) & 1) for m in range(self.num_modalities)] for mask in masks]
            sel = _to_device(torch.tensor(rows, dtype=dtype), device)
            if self._fixed is not None:
                self._sel_cache[key] = sel
        return sel

    def _check_inputs(self, inputs: Tuple[Tensor, ...]) -> List[Tensor]:
        M = self.num_modalities
        if len(inputs) != M:
            raise ValueError(f"expected {M} inputs (one per modality, in modality order), got {len(inputs)}")
        for m, x in enumerate(inputs):
            if not isinstance(x, Tensor):
                raise TypeError(f"input {m} must be a tensor [B, ...], got {type(x).__name__}")
            if x.dim() == 0:
                raise ValueError(f"input {m} must have a batch dimension [B, ...], got a 0-d tensor")
        sizes = [x.shape[0] for x in inputs]
        if any(s != sizes[0] for s in sizes):
            raise ValueError(f"every input must have the same batch size B, got batch sizes {sizes}")
        if sizes[0] == 0:
            raise ValueError("the batch is empty (B = 0)")
        return list(inputs)

    @staticmethod
    def _check_out(out, rows: int, C: Optional[int], what: str) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"{what} must return a tensor of logits [B, C], got {type(out).__name__}")
        if out.dim() != 2 or out.shape[0] != rows or (C is not None and out.shape[1] != C):
            want = f"[{rows}, {C if C is not None else 'C'}]"
            raise ValueError(f"{what} must return logits of shape [B, C] = {want}, got shape {tuple(out.shape)}")
        if not out.is_floating_point():
            raise TypeError(f"{what} must return floating-point logits, got {out.dtype}")
        return out

    def _chunks(self, masks: List[int], batch: int) -> List[List[int]]:
        k = len(masks) if self.max_batch is None else max(1, self.max_batch // batch)
        return [masks[i : i + k] for i in range(0, len(masks), k)]

    def _call_fusion(self, features: Sequence[Tensor]) -> Tensor:
        fusion = self._parts[2]
        if isinstance(fusion, nn.Linear):
            for m, f in enumerate(features):
                if f.dim() != 2:
                    raise ValueError(
                        f"an nn.Linear fusion runs on the concatenated features, so each must be [B, d_m]; "
                        f"encoder {m} returned shape {tuple(f.shape)}"
                    )
            return fusion(torch.cat(list(features), dim=1))
        return fusion(*features)

    def _call_model(self, xs: Sequence[Tensor]) -> Tensor:
        model, encoders, _ = self._parts
        if model is not None:
            return model(*xs)
        return self._call_fusion([enc(x) for enc, x in zip(encoders, xs)])

    def _what(self) -> str:
        return "model" if self._parts[0] is not None else "fusion"

    def _evaluate(self, xs: List[Tensor], masks: List[int]) -> Tensor:
        """Subset logits ``F [S, B, C]`` in the order of ``masks`` (ascending, the full set last)."""
        if self.strategy == "factorized":
            return self._evaluate_factorized(xs, masks)
        B = xs[0].shape[0]
        full = self._check_out(self._call_model(xs), B, None, self._what())
        C = full.shape[1]
        masked = masks[:-1]
        rows = []
        with _eval_mode(self._roots()):
            if self.strategy == "sequential":
                for mask in masked:
                    inp = [x if (mask >> m) & 1 else torch.zeros_like(x) for m, x in enumerate(xs)]
                    rows.append(self._check_out(self._call_model(inp), B, C, self._what()).unsqueeze(0))
            else:
                for chunk in self._chunks(masked, B):
                    stacked = [ops.subset_batch(x, None, chunk, m) for m, x in enumerate(xs)]
                    what = f"{self._what()} (on {len(chunk)} masked subsets stacked along the batch)"
                    out = self._check_out(self._call_model(stacked), len(chunk) * B, C, what)
                    rows.append(out.view(len(chunk), B, C))
        return torch.cat(rows + [full.unsqueeze(0)])

    @staticmethod
    def _presence(masked: List[int]) -> Tuple[int, int]:
        """Bitmasks of the modalities present in some masked subset and of those absent from some."""
        present = 0
        absent = 0
        for mask in masked:
            present |= mask
            absent |= ~mask
        return present, absent

    def _evaluate_factorized(self, xs: List[Tensor], masks: List[int]) -> Tensor:
        _, encoders, fusion = self._parts
        M = self.num_modalities
        B = xs[0].shape[0]
        h = [enc(x) for enc, x in zip(encoders, xs)]
        full = self._check_out(self._call_fusion(h), B, None, "fusion")
        C = full.shape[1]
        masked = masks[:-1]
        present, absent = self._presence(masked)
        real: List[Optional[Tensor]] = [None] * M
        muted: List[Optional[Tensor]] = [None] * M
        zero_input = self.mute == "input"
        if self.masked_mode == "train":
            real = list(h)
            if zero_input:
                with _eval_mode(encoders):
                    for m in range(M):
                        if (absent >> m) & 1:
                            muted[m] = encoders[m](xs[m].new_zeros((1,) + tuple(xs[m].shape[1:])))
        else:
            with _eval_mode(encoders):
                for m in range(M):
                    need_real = (present >> m) & 1
                    need_zero = zero_input and (absent >> m) & 1
                    x = xs[m]
                    if need_real and need_zero:
                        # One eval-mode call for the real batch and the zero sample: eval outputs are per-sample.
                        out = encoders[m](torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))]))
                        real[m], muted[m] = out[:B], out[B:]
                    elif need_real:
                        real[m] = encoders[m](x)
                    elif need_zero:
                        muted[m] = encoders[m](x.new_zeros((1,) + tuple(x.shape[1:])))
        if not zero_input:
            for m in range(M):
                if (absent >> m) & 1:
                    b = self._baseline(m)
                    feat_shape = tuple(h[m].shape[1:])
                    if b is None:
                        muted[m] = h[m].new_zeros((1,) + feat_shape)
                    else:
                        if tuple(b.shape) != feat_shape:
                            raise ValueError(
                                f"baselines[{m}] must have the feature shape of encoder {m}, {list(feat_shape)}; "
                                f"got {list(b.shape)}"
                            )
                        muted[m] = b.to(h[m].dtype).unsqueeze(0)
        # A modality that is present in every masked subset (or in none) needs only one of the two; the other slot
        # is multiplied by zero, so any tensor of the right shape does.
        real = [r if r is not None else h[m] for m, r in enumerate(real)]
        muted = [z if z is not None else h[m][:1] for m, z in enumerate(muted)]
        if self._linear_head:
            F_masked = self._closed_form(real, muted, masked, B, C)
        else:
            # subset_batch takes one muted sample [...] (None: zeros) and broadcasts it over the batch.
            mute_vals = [None if not zero_input and self._baseline(m) is None else muted[m][0] for m in range(M)]
            rows = []
            with _eval_mode([fusion]):
                for chunk in self._chunks(masked, B):
                    feats = [ops.subset_batch(real[m], mute_vals[m], chunk, m) for m in range(M)]
                    what = f"fusion (on {len(chunk)} masked subsets stacked along the batch)"
                    out = self._check_out(self._call_fusion(feats), len(chunk) * B, C, what)
                    rows.append(out.view(len(chunk), B, C))
            F_masked = torch.cat(rows)
        return torch.cat([F_masked, full.unsqueeze(0)])

    def _contributions(self, features: List[Tensor], rows: int) -> Tuple[List[Tensor], Optional[Tensor]]:
        fusion = self._parts[2]
        M = self.num_modalities
        if isinstance(fusion, nn.Linear):
            dims = []
            for m, f in enumerate(features):
                if f.dim() != 2:
                    raise ValueError(
                        f"an nn.Linear fusion runs on the concatenated features, so each must be [B, d_m]; "
                        f"encoder {m} returned shape {tuple(f.shape)}"
                    )
                dims.append(f.shape[1])
            if sum(dims) != fusion.in_features:
                raise ValueError(
                    f"the nn.Linear fusion has in_features={fusion.in_features} but the features have dims {dims}"
                )
            pieces, off = [], 0
            for f, d in zip(features, dims):
                pieces.append(nn.functional.linear(f, fusion.weight[:, off : off + d]))
                off += d
            return pieces, fusion.bias
        result = fusion.contributions(*features)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise TypeError("fusion.contributions(*features) must return (list of M tensors [B, C], bias [C] or None)")
        pieces, bias = result
        if len(pieces) != M:
            raise ValueError(f"fusion.contributions returned {len(pieces)} pieces, expected one per modality ({M})")
        for m, p in enumerate(pieces):
            self._check_out(p, rows, None, f"fusion.contributions (piece {m})")
        return list(pieces), bias

    def _closed_form(self, real: List[Tensor], muted: List[Tensor], masked: List[int], B: int, C: int) -> Tensor:
        """``f(S) = bias + sum_m (piece_m(real) if m in S else piece_m(muted))`` for every masked S: ``[k, B, C]``."""
        with _eval_mode([self._parts[2]]):
            P, bias = self._contributions(real, B)
            Q, _ = self._contributions(muted, 1)
        for m, p in enumerate(P):
            if p.shape[1] != C:
                raise ValueError(f"fusion.contributions piece {m} has {p.shape[1]} classes, the fusion output {C}")
        P = torch.stack(P)
        Q = torch.cat(Q)
        sel = self._selection(masked, P.device, P.dtype)
        out = torch.einsum("km,mbc->kbc", sel, P) + ((1 - sel) @ Q).unsqueeze(1)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the incoming gradient by ``scales[index]``, read at backward time."""

    @staticmethod
    def forward(ctx, x: Tensor, scales: list, index: int) -> Tensor:
        ctx.scales = scales
        ctx.index = index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scale = ctx.scales[ctx.index]
        if isinstance(scale, Tensor):
            scale = scale.to(device=grad.device, dtype=grad.dtype)
        return grad * scale, None, None


class GradMod(_ShapleyBase):
    """The reference AGM wrapper: mono-modal outputs whose gradients are scaled by ``update_scale``.

    ``forward(*inputs)`` evaluates every subset output f(S) (see the module docstring for the strategies), forms the
    mono-modal outputs psi_m (``shapley="reference"``; phi with ``"exact"``, a permutation estimate of psi with
    ``"sampled"``) and returns ``(psi_0, ..., psi_{M-1}, out)``. In backward the gradient reaching psi_m is multiplied
    by ``scale_m``, read at backward time, so ``update_scale`` may be called between forward and backward, as with the
    reference's identity modules and their full backward hooks. ``out`` has the value f(A) and its gradient flows
    through the scaled psi_m: ``out = sum_m psi_m + stopgrad(f(A) - sum_m psi_m)``.

    The wrapped model (or encoders and fusion) is registered as a submodule, as in the reference, so
    ``GradMod(model).parameters()`` is what the optimizer takes.

    Args:
        model: black-box ``nn.Module`` called as ``model(*inputs) -> [B, C]``. Or give ``encoders`` and ``fusion``.
        num_modalities: M (inferred from ``encoders``); 2 <= M <= 8 for the exact variants.
        encoders: M modules, ``encoders[m](x_m) -> features``.
        fusion: module called as ``fusion(*features) -> [B, C]`` (an ``nn.Linear`` is applied to the features
            concatenated along dim 1).
        strategy: ``"auto"`` (default), ``"sequential"``, ``"batched"`` or ``"factorized"``.
        masked_mode: ``"eval"`` (default, the reference) or ``"train"`` (factorized only; a deviation).
        shapley: ``"reference"`` (default), ``"exact"`` or ``"sampled"``.
        mute: ``"input"`` (default: zero inputs, the reference) or ``"feature"`` (factorized only).
        baselines: with ``mute="feature"``, M tensors ``[d_m]`` (``nn.Parameter`` s are learned); None: zeros.
        num_permutations: permutations per step for ``shapley="sampled"`` (default 16).
        seed: seed of the sampled permutations (drawn from ``(seed, step)``; the step counter is in state_dict).
        max_batch: upper bound on the rows of a stacked masked batch (subsets are chunked; at least one subset per
            call); None: all masked subsets in one call.
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        num_modalities: Optional[int] = None,
        *,
        encoders: Optional[Sequence[nn.Module]] = None,
        fusion: Optional[nn.Module] = None,
        strategy: str = "auto",
        masked_mode: str = "eval",
        shapley: str = "reference",
        mute: str = "input",
        baselines: Optional[Sequence[Tensor]] = None,
        num_permutations: int = 16,
        seed: int = 0,
        max_batch: Optional[int] = None,
    ) -> None:
        super().__init__(
            model, num_modalities, encoders, fusion, strategy, masked_mode, shapley, mute, baselines,
            num_permutations, seed, max_batch, register_model=True,
        )
        self._scales: List[Coefficient] = [1.0] * self.num_modalities

    def update_scale(self, *coeffs: Coefficient) -> None:
        """Set the gradient scale of each mono-modal output (applied in the next backward).

        Args:
            *coeffs: M floats or 0-d tensors (tensors are used on the device, no host sync), or one ``[M]`` tensor.
        """
        M = self.num_modalities
        if len(coeffs) == 1 and isinstance(coeffs[0], Tensor) and coeffs[0].dim() == 1:
            coeffs = tuple(coeffs[0].unbind(0))
        if len(coeffs) != M:
            raise ValueError(f"update_scale expects {M} coefficients (one per modality), got {len(coeffs)}")
        scales: List[Coefficient] = []
        for m, c in enumerate(coeffs):
            if isinstance(c, Tensor):
                if c.numel() != 1:
                    raise ValueError(f"coefficient {m} must be a float or a 0-d tensor, got shape {tuple(c.shape)}")
                scales.append(c.detach().reshape(()))
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                scales.append(float(c))
            else:
                raise TypeError(f"coefficient {m} must be a float or a 0-d tensor, got {type(c).__name__}")
        # In place: graphs built earlier hold this list and read it in backward.
        self._scales[:] = scales

    def forward(self, *inputs: Tensor) -> Tuple[Tensor, ...]:
        """Evaluate every needed subset and return the scaled mono-modal outputs and the loss logits.

        Args:
            *inputs: M tensors ``[B, ...]``, one per modality.

        Returns:
            ``(psi_0, ..., psi_{M-1}, out)``, each ``[B, C]``.
        """
        xs = self._check_inputs(inputs)
        masks, W = self._plan(xs[0].device)
        F = self._evaluate(xs, masks)
        if self.training:
            self._step += 1
        psi = ref.shapley_ref(F, W.to(F.device))
        scaled = [_ScaleGrad.apply(psi[m], self._scales, m) for m in range(self.num_modalities)]
        total = torch.stack(scaled).sum(0)
        out = total + (F[-1] - total).detach()
        return (*scaled, out)


class AGMCoefficients(nn.Module):
    """Scores, running means and coefficients of the reference AGM training loop, on the device (SPEC 1.4).

    For each step: ``s_m = mean_b -log(max(softmax(psi_m)[b, y_b], 1e-8))`` (regression: the MSE of psi_m against the
    target), ``r_m = exp(mean_{j!=m} s_j - s_m)``, ``rbar_m`` the same on the running means S before this step's update,
    ``c_m = exp(alpha * min(rbar_m - r_m, cap))``; then ``S <- S t/(t+1) + s/(t+1)``, ``t <- t+1``, every step, inside
    and outside the window. Outside the window the coefficients are 1 (``hold_last=True``: the last ones, as the
    reference code does). A step with non-finite scores gives NaN coefficients and leaves the state unchanged. The
    state is updated only in training mode.

    Buffers (in ``state_dict()``): ``running [M]``, ``count []`` (steps counted), ``last_coeffs [M]``, all float32.

    Args:
        num_modalities: M >= 2.
        alpha: modulation strength.
        cap: upper bound on ``rbar - r`` (default 10.0), or None.
        window: ``(start_epoch, end_epoch)`` inclusive, or None (always modulate).
        hold_last: outside the window keep the last coefficients instead of 1.
        task: ``"classification"`` (default) or ``"regression"``.
        process_group: with ``torch.distributed`` initialised, the per-modality score sums and sample counts are
            all-reduced over this group (None: the default group) in one collective of 2M numbers, so every rank
            gets the coefficients and running means a single process computes on the global batch. Without
            distributed nothing changes.
    """

    def __init__(
        self,
        num_modalities: int,
        alpha: float,
        cap: Optional[float] = 10.0,
        window: Optional[Tuple[int, int]] = None,
        hold_last: bool = False,
        task: str = "classification",
        process_group=None,
    ) -> None:
        super().__init__()
        M = _agm_check_modalities(num_modalities, "sampled")
        self.num_modalities = M
        self.alpha = _check_scalar("alpha", alpha)
        self.cap = _check_scalar("cap", cap, allow_none=True)
        self.window = _check_window(window)
        self.hold_last = bool(hold_last)
        self.task = _check_choice("task", task, _TASKS)
        self.process_group = process_group
        self.register_buffer("running", torch.zeros(M))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("last_coeffs", torch.ones(M))
        self._eye = {}

    def in_window(self, epoch: Optional[int]) -> bool:
        """Whether ``epoch`` lies in the modulation window (always True without a window)."""
        if self.window is None:
            return True
        if epoch is None:
            raise ValueError(f"epoch is required when a modulation window {self.window} is set")
        return self.window[0] <= epoch <= self.window[1]

    def _update(
        self, F: Tensor, W: Tensor, labels: Tensor, in_window: bool
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Run the fused op on subset logits ``F [S, B, C]``; returns ``(psi [M, B, C], scores [M], coeffs [M])``."""
        if self.running.device != F.device:
            self.to(F.device)
        psi, scores, running_new, count_new, coeffs = ops.shapley_scores(
            F, W, labels, self.running, self.count, self.last_coeffs, self.alpha, self.cap, in_window,
            self.hold_last, self.task == "regression",
        )
        if distributed.is_active(self.process_group):
            # The op's scores are this rank's batch means: one collective turns them into the global batch mean,
            # and the coefficients and running means are recomputed from it (device arithmetic, no host sync).
            scores = distributed.global_mean_scores(scores.detach(), F.shape[1], self.process_group)
            running_new, count_new, coeffs = ref.agm_coefficients_ref(
                scores, self.running, self.count, self.last_coeffs, self.alpha, self.cap, in_window, self.hold_last
            )
        coeffs = coeffs.detach()
        if self.training:
            with torch.no_grad():
                self.running.copy_(running_new)
                self.count.copy_(count_new)
                self.last_coeffs.copy_(torch.where(torch.isfinite(coeffs).all(), coeffs, self.last_coeffs))
        return psi, scores.detach(), coeffs

    def forward(
        self, psis: Union[Tensor, Sequence[Tensor]], labels: Tensor, epoch: Optional[int] = None
    ) -> Tensor:
        """One step of the reference loop's arithmetic.

        Args:
            psis: the M mono-modal outputs ``[B, C]`` (e.g. from :class:`GradMod`), or one ``[M, B, C]`` tensor.
            labels: ``[B]`` int64 class indices (regression: ``[B]`` or ``[B, C]`` float targets).
            epoch: the current epoch (required with a window).

        Returns:
            ``[M]`` float32 coefficients on the device of ``psis`` (pass them to ``GradMod.update_scale(*coeffs)``).
        """
        M = self.num_modalities
        if isinstance(psis, Tensor):
            F = psis.detach()
        else:
            if len(psis) != M:
                raise ValueError(f"expected {M} mono-modal outputs, got {len(psis)}")
            F = torch.stack([p.detach() for p in psis])
        if F.dim() != 3 or F.shape[0] != M:
            raise ValueError(f"psis must be M = {M} tensors [B, C] (or one [M, B, C]), got shape {tuple(F.shape)}")
        _agm_check_target(labels, F.shape[1], F.shape[2], self.task, F.device, name="labels")
        in_window = self.in_window(epoch)
        eye = self._eye.get(F.device)
        if eye is None:
            eye = self._eye[F.device] = torch.eye(M, dtype=torch.float32, device=F.device)
        _, _, coeffs = self._update(F, eye, labels, in_window)
        return coeffs


class AGM(_ShapleyBase):
    """AGM in one call per step: subset outputs, mono-modal outputs, scores, coefficients and modulated logits.

    ``res = agm(*inputs, target=y, epoch=epoch)`` evaluates f(S) for every needed subset (see the module docstring
    for the strategies), then one op computes psi, the scores, the running means and this step's coefficients on the
    device (no host sync), and a second op returns logits whose value is f(A) and whose gradient reaches each f(S)
    as ``sum_m c_m W[m, S] g``: the stop-gradient form of the reference's scaled psi.

    ``state_dict()`` holds the modulator state (running means, count, last coefficients, the sampled-Shapley step
    counter, learned baselines), not the model weights: the model is used, not registered. Resuming from it is
    exact. The state changes only in training mode (``agm.train()``, the default); in eval mode a call computes
    coefficients without updating anything.

    Args:
        model, encoders, fusion, num_modalities, strategy, masked_mode, shapley, mute, baselines, num_permutations,
            seed, max_batch: as :class:`GradMod`.
        alpha: modulation strength (default 1.0; published: AV-MNIST 2.5, CREMA-D 1.5, UR-Funny 4.0 / 6.0).
        cap: upper bound on ``rbar - r`` (default 10.0), or None.
        window: ``(start_epoch, end_epoch)`` inclusive, or None.
        hold_last: outside the window keep the last coefficients (the reference) instead of 1 (default).
        task: ``"classification"`` (default) or ``"regression"`` (MSE score; beyond the reference).
        process_group: as :class:`AGMCoefficients` (distributed training: coefficients of the global batch).
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        *,
        encoders: Optional[Sequence[nn.Module]] = None,
        fusion: Optional[nn.Module] = None,
        num_modalities: Optional[int] = None,
        alpha: float = 1.0,
        cap: Optional[float] = 10.0,
        window: Optional[Tuple[int, int]] = None,
        hold_last: bool = False,
        strategy: str = "auto",
        masked_mode: str = "eval",
        shapley: str = "reference",
        mute: str = "input",
        baselines: Optional[Sequence[Tensor]] = None,
        task: str = "classification",
        num_permutations: int = 16,
        seed: int = 0,
        max_batch: Optional[int] = None,
        process_group=None,
    ) -> None:
        super().__init__(
            model, num_modalities, encoders, fusion, strategy, masked_mode, shapley, mute, baselines,
            num_permutations, seed, max_batch, register_model=False,
        )
        self.coefficients = AGMCoefficients(
            self.num_modalities, alpha, cap, window, hold_last, task, process_group=process_group
        )

    @property
    def task(self) -> str:
        return self.coefficients.task

    def forward(self, *inputs: Tensor, target: Tensor, epoch: Optional[int] = None) -> AGMResult:
        """One training step's AGM.

        Args:
            *inputs: M tensors ``[B, ...]``, one per modality.
            target: ``[B]`` int64 class indices (regression: ``[B]`` or ``[B, C]`` float targets).
            epoch: the current epoch (required with a window).

        Returns:
            :class:`AGMResult` ``(logits [B, C], mono [M, B, C], scores [M], coeffs [M])``.
        """
        xs = self._check_inputs(inputs)
        B = xs[0].shape[0]
        task = self.coefficients.task
        _agm_check_target(target, B, None, task, None)
        in_window = self.coefficients.in_window(epoch)
        masks, W = self._plan(xs[0].device)
        F = self._evaluate(xs, masks)
        if W.device != F.device:
            W = W.to(F.device)
        C = F.shape[2]
        _agm_check_target(target, B, C, task, F.device)
        psi, scores, coeffs = self.coefficients._update(F, W, target, in_window)
        logits = ops.shapley_combine(F, W, coeffs, F.shape[0] - 1)
        if self.training:
            self._step += 1
        return AGMResult(logits, psi, scores, coeffs)
