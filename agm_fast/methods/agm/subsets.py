"""How AGM evaluates the subset outputs f(S): sequential, batched or factorized (docs/methods.md, section 5).

The full pass always runs first, in the model's current mode; the masked passes run in eval mode (or reuse the full
pass for encoders that compute the same in both modes, :mod:`.modes`). No pass is detached.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..._backend import to_device
from ..._seed import step_seed
from ..._validate import check_seed
from ...coalitions import (
    check_modalities,
    sampled_shapley_weights,
    shapley_weights,
    stratified_shapley_weights,
    subset_masks,
)
from ...fusion import has_head_split, head_split
from ...ops.subset_batch import subset_batch_op
from ..base import encode
from .closed_form import assemble, contributions
from .modes import ModeInvariance, fixed_mode, still_fixed, uses_batch_statistics
from .split import full_preactivation, subset_preactivations


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




class ShapleyBase(nn.Module):
    """Subset evaluation and Shapley weights shared by :class:`GradMod` and :class:`AGM`."""

    def __init__(
        self,
        model: Optional[nn.Module],
        num_modalities: Optional[int],
        encoders: Optional[Sequence[nn.Module]],
        fusion: Optional[nn.Module],
        hp: Mapping[str, Any],
        baselines: Optional[Sequence[Tensor]],
        seed: int,
        register_model: bool,
        mode_invariant=None,
    ) -> None:
        super().__init__()
        strategy, masked_mode, shapley, mute = hp["strategy"], hp["masked_mode"], hp["shapley"], hp["mute"]
        num_permutations, max_batch = hp["num_permutations"], hp["max_batch"]
        if model is not None and (encoders is not None or fusion is not None):
            raise ValueError(
                "model: expected either model= (a black box) or encoders= and fusion= (factorized), got both"
            )
        if model is None:
            if encoders is None or fusion is None:
                raise ValueError(
                    "model: expected model= (called as model(*inputs) -> [B, C]) or both encoders= and fusion=, got "
                    "neither"
                )
            if isinstance(encoders, nn.Module) and not isinstance(encoders, nn.ModuleList):
                raise TypeError(
                    f"encoders: expected a list of M modules (one per modality), got {type(encoders).__name__}"
                )
            encoders = list(encoders)
            for m, enc in enumerate(encoders):
                if not isinstance(enc, nn.Module):
                    raise TypeError(f"encoders[{m}]: expected an nn.Module, got {type(enc).__name__}")
            if not isinstance(fusion, nn.Module):
                raise TypeError(f"fusion: expected an nn.Module, got {type(fusion).__name__}")
            if num_modalities is None:
                num_modalities = len(encoders)
            elif num_modalities != len(encoders):
                raise ValueError(
                    f"num_modalities: expected {len(encoders)} (the number of encoders), got {num_modalities}"
                )
        else:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
            if num_modalities is None:
                raise ValueError("num_modalities: expected the number of modalities with a black-box model, got None")
        M = check_modalities(num_modalities, shapley)
        factorizable = model is None
        if strategy == "auto":
            strategy = "factorized" if factorizable else "batched"
        if strategy == "factorized" and not factorizable:
            raise ValueError("strategy: expected encoders=[...] and fusion= with 'factorized', got a black-box model")
        if masked_mode == "train" and strategy != "factorized":
            raise ValueError(
                "masked_mode: 'train' shares encoder features and needs strategy='factorized', got "
                f"strategy={strategy!r}"
            )
        if mute == "feature" and strategy != "factorized":
            raise ValueError(
                f"mute: 'feature' mutes encoder features and needs strategy='factorized', got strategy={strategy!r}"
            )
        if baselines is not None and mute != "feature":
            raise ValueError(f"baselines: muted features that need mute='feature', got mute={mute!r}")
        seed = check_seed("seed", seed)
        self.checkpoint_masked = hp["checkpoint_masked"]
        if mode_invariant is not None and (strategy != "factorized" or masked_mode != "eval"):
            raise ValueError(
                "mode_invariant: decides the eval-mode masked passes of strategy='factorized' with masked_mode="
                f"'eval', got strategy={strategy!r}, masked_mode={masked_mode!r}"
            )
        uses_modes = strategy == "factorized" and masked_mode == "eval"
        self._modes = ModeInvariance(list(encoders), mode_invariant) if uses_modes else None
        # Decided once here, not in the step: a cache filled inside a compiled step would make it recompile.
        self._batch_stats = [uses_batch_statistics(e) for e in encoders] if encoders is not None else []
        # A fusion made of torch's own mode-independent modules needs no switch to eval mode (None: it may need one).
        self._fusion_watch = fixed_mode(fusion) if fusion is not None else None

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
        self._split_head = fusion is not None and not self._linear_head and has_head_split(fusion)
        self._num_baselines = 0
        if baselines is not None:
            if len(baselines) != M:
                raise ValueError(f"baselines: expected one feature per modality ({M}), got {len(baselines)}")
            for m, b in enumerate(baselines):
                if not isinstance(b, Tensor):
                    raise TypeError(
                        f"baselines[{m}]: expected a tensor [d_m] (or an nn.Parameter), got {type(b).__name__}"
                    )
                if isinstance(b, nn.Parameter):
                    self.register_parameter(f"baseline_{m}", b)
                else:
                    self.register_buffer(f"baseline_{m}", b.detach().clone(), persistent=False)
            self._num_baselines = M
        self._step = 0
        self.rounds = hp["rounds"]
        self._fixed = None if shapley in ("sampled", "stratified") else subset_masks(M, shapley)
        self._W_cache = {}
        self._sel_cache = {}

    def get_extra_state(self) -> dict:
        state = {"step": self._step}
        if self._modes is not None:
            state["modes"] = self._modes.state()
        return state

    def set_extra_state(self, state: dict) -> None:
        self._step = int(state["step"])
        if self._modes is not None and "modes" in state:
            self._modes.load(state["modes"])

    def _count_step(self) -> None:
        """Advance the step counter the sampled estimators draw their subsets from (training mode only). The exact
        variants do not read it, and leave it alone: a counter read and written in every step would make
        ``torch.compile`` specialise on its value and recompile at every step."""
        if self.training and self._fixed is None:
            self._step += 1

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
                W = shapley_weights(self.num_modalities, self._fixed, torch.float32).to(device)
                self._W_cache[device] = W
            return self._fixed, W
        gen = torch.Generator().manual_seed(step_seed(self.seed, self._step))
        if self.shapley == "stratified":
            masks, W, _ = stratified_shapley_weights(self.num_modalities, self.rounds, gen)
        else:
            masks, W = sampled_shapley_weights(self.num_modalities, self.num_permutations, gen)
        return masks, to_device(W.to(torch.float32), device)

    def _selection(self, masks: List[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[k, M]`` 0/1 presence of each modality in each subset."""
        M = self.num_modalities
        if torch.compiler.is_compiling():
            # A constant of the graph: a cache read or filled inside a compiled step would make it recompile.
            return torch.tensor([[float((mask >> m) & 1) for m in range(M)] for mask in masks], dtype=dtype,
                                device=device)
        key = (tuple(masks), device, dtype)
        sel = self._sel_cache.get(key)
        if sel is None:
            rows = [[float((mask >> m) & 1) for m in range(M)] for mask in masks]
            sel = to_device(torch.tensor(rows, dtype=dtype), device)
            if self._fixed is not None:
                self._sel_cache[key] = sel
        return sel

    def _check_inputs(self, inputs: Tuple[Tensor, ...]) -> List[Tensor]:
        M = self.num_modalities
        if len(inputs) != M:
            raise ValueError(f"inputs: expected {M} inputs (one per modality, in modality order), got {len(inputs)}")
        for m, x in enumerate(inputs):
            if not isinstance(x, Tensor):
                raise TypeError(f"inputs[{m}]: expected a tensor [B, ...], got {type(x).__name__}")
            if x.dim() == 0:
                raise ValueError(f"inputs[{m}]: expected a batch dimension [B, ...], got a 0-d tensor")
        sizes = [x.shape[0] for x in inputs]
        if any(s != sizes[0] for s in sizes):
            raise ValueError(f"inputs: expected the same batch size B for every input, got batch sizes {sizes}")
        if sizes[0] == 0:
            raise ValueError("inputs: expected a batch of at least one sample, got B = 0")
        return list(inputs)

    @staticmethod
    def _check_out(out, rows: int, C: Optional[int], what: str) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"{what}: expected to return a tensor of logits [B, C], got {type(out).__name__}")
        if out.dim() != 2 or out.shape[0] != rows or (C is not None and out.shape[1] != C):
            want = f"[{rows}, {C if C is not None else 'C'}]"
            raise ValueError(
                f"{what}: expected to return logits of shape [B, C] = {want}, got shape {tuple(out.shape)}"
            )
        if not out.is_floating_point():
            raise TypeError(f"{what}: expected to return floating-point logits, got {out.dtype}")
        return out

    def _chunks(self, masks: List[int], batch: int) -> List[List[int]]:
        k = len(masks) if self.max_batch is None else max(1, self.max_batch // batch)
        return [masks[i : i + k] for i in range(0, len(masks), k)]

    def _call_fusion(self, features: Sequence[Tensor]) -> Tensor:
        fusion = self._parts[2]
        if isinstance(fusion, nn.Linear) or (self._split_head and isinstance(fusion, nn.Sequential)):
            for m, f in enumerate(features):
                if f.dim() != 2:
                    raise ValueError(
                        f"encoders[{m}]: expected features [B, d_m] (an nn.Linear fusion runs on their "
                        f"concatenation), got shape {tuple(f.shape)}"
                    )
            return fusion(torch.cat(list(features), dim=1))
        return fusion(*features)

    def _call_model(self, xs: Sequence[Tensor]) -> Tensor:
        model, encoders, _ = self._parts
        if model is not None:
            return model(*xs)
        return self._call_fusion(encode(encoders, xs))

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
        roots = self._roots()
        if self.strategy == "sequential":
            for mask in masked:
                inp = [x if (mask >> m) & 1 else torch.zeros_like(x) for m, x in enumerate(xs)]
                out = self._eval_apply(self._call_model, roots, inp)
                rows.append(self._check_out(out, B, C, self._what()).unsqueeze(0))
        else:
            for chunk in self._chunks(masked, B):
                stacked = [subset_batch_op(x, None, chunk, m) for m, x in enumerate(xs)]
                what = f"{self._what()} (on {len(chunk)} masked subsets stacked along the batch)"
                out = self._check_out(self._eval_apply(self._call_model, roots, stacked), len(chunk) * B, C, what)
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

    def _eval_apply(self, fn, modules: Sequence[nn.Module], inputs: Sequence[Tensor]) -> Tensor:
        """``fn(inputs)`` with ``modules`` in eval mode; with ``checkpoint_masked`` its activations are recomputed in
        the backward (in eval mode again) instead of being kept."""

        def run(*tensors):
            with _eval_mode(modules):
                return fn(list(tensors))

        if self.checkpoint_masked and torch.is_grad_enabled():
            return checkpoint(run, *inputs, use_reentrant=False)
        return run(*inputs)

    def _fusion_roots(self) -> List[nn.Module]:
        """The fusion, to be put in eval mode for the masked passes; none when it computes the same in both modes."""
        watch = self._fusion_watch
        return [] if watch is not None and still_fixed(watch) else [self._parts[2]]

    def _eval_call(self, module: nn.Module, x: Tensor) -> Tensor:
        """``module(x)`` in eval mode, as :meth:`_eval_apply`."""
        return self._eval_apply(lambda xs: module(xs[0]), [module], [x])

    def _masked_features(self, m: int, x: Tensor, h: Tensor, need_real: bool, need_zero: bool):
        """Encoder m's features for the masked subsets: ``(real [B, ...] or None, muted [1, ...] or None)``.

        The real features are the full pass's own when the encoder computes the same in both modes (decided by
        :class:`agm_fast._modes.ModeInvariance`) or ran in eval mode already; otherwise an eval-mode pass.
        """
        encoder = self._parts[1][m]
        batch_stats = self._batch_stats[m]
        # An encoder that normalises over the batch in eval mode sees the reference's zero batch of B rows (whose rows
        # are all equal); any other encoder computes each row alone, so one zero row stands for all of them.
        zero = x.new_zeros(((x.shape[0] if batch_stats else 1),) + tuple(x.shape[1:]))
        reuse = self._modes.reuse(m) if encoder.training else True
        real = muted = None
        # The check runs the eval-mode pass on the batch alone (not stacked with the zero sample): the same arithmetic
        # as the full pass, so equal features mean that reusing the full pass changes no bit.
        if need_real and reuse is None and torch.compiler.is_compiling():
            # A compiled graph cannot branch on a comparison of values: the check waits for an eager step, and
            # until then the encoder keeps the eval-mode pass (the reference).
            real = self._eval_call(encoder, x)
        elif need_real and reuse is None:
            # The first-step check: the eval-mode pass the reference runs, compared bitwise with the full pass.
            real = self._eval_call(encoder, x)
            with torch.no_grad():
                equal = real.shape == h.shape and torch.equal(real, h)
                diff = 0.0 if equal or real.shape != h.shape else float((real - h).abs().max())
            self._modes.record(m, bool(equal), diff)
        elif need_real and reuse:
            real = h
        elif need_real and need_zero and not batch_stats:
            # A mode-dependent encoder: one eval-mode call for the batch and the zero sample (eval outputs are
            # per-sample), as the eval-mode passes always ran.
            out = self._eval_call(encoder, torch.cat([x, zero]))
            return out[: x.shape[0]], out[x.shape[0] :]
        elif need_real:
            real = self._eval_call(encoder, x)
        if need_zero:
            # An encoder that computes the same in both modes (or is in eval mode already) runs the zero sample as it
            # is: the switch to eval mode would change nothing but cost a walk over its modules.
            muted = self._eval_apply(lambda xs: encoder(xs[0]), [] if reuse else [encoder], [zero])[:1]
        return real, muted

    def describe(self) -> dict:
        """How the subset outputs are evaluated and, per encoder, whether the masked passes reuse the full pass's
        features (``mode_invariant``) and why."""
        out = {
            "strategy": self.strategy,
            "masked_mode": self.masked_mode,
            "shapley": self.shapley,
            "mute": self.mute,
            "checkpoint_masked": self.checkpoint_masked,
        }
        if self.strategy == "factorized":
            if self.masked_mode == "train":
                out["encoders"] = [
                    {"index": m, "reuses_full_pass": True, "why": "masked_mode='train' (a deviation)"}
                    for m in range(self.num_modalities)
                ]
            else:
                out["encoders"] = [
                    {"index": m, "reuses_full_pass": self._modes.decided[m], "why": self._modes.reasons[m]}
                    for m in range(self.num_modalities)
                ]
        return out

    def _evaluate_factorized(self, xs: List[Tensor], masks: List[int]) -> Tensor:
        _, encoders, fusion = self._parts
        M = self.num_modalities
        B = xs[0].shape[0]
        if self._modes is not None and self.training:
            self._modes.watch()
        masked = masks[:-1]
        present, absent = self._presence(masked)
        zero_input = self.mute == "input"
        h, stacked_zero, stacked = self._encode_full(xs, absent if zero_input and self.masked_mode == "eval" else 0)
        if (self._linear_head and stacked_zero and all(z is not None for z in stacked_zero)
                and not self._fusion_roots()):
            # A linear head that computes the same in both modes, every encoder's batch and zero sample from one
            # call: every subset's output, the full set's too, from one call of the pieces on those rows.
            return self._closed_form_stacked(stacked, masks, B)
        full = C = None
        if not self._split_head:
            full = self._check_out(self._call_fusion(h), B, None, "fusion")
            C = full.shape[1]
        real: List[Optional[Tensor]] = [None] * M
        muted: List[Optional[Tensor]] = [None] * M
        if self.masked_mode == "train":
            real = list(h)
            if zero_input:
                with _eval_mode(encoders):
                    for m in range(M):
                        if (absent >> m) & 1:
                            rows = xs[m].shape[0] if self._batch_stats[m] else 1
                            muted[m] = encoders[m](xs[m].new_zeros((rows,) + tuple(xs[m].shape[1:])))[:1]
        else:
            for m in range(M):
                if stacked_zero[m] is not None:
                    real[m], muted[m] = h[m], stacked_zero[m]
                    continue
                real[m], muted[m] = self._masked_features(m, xs[m], h[m], (present >> m) & 1,
                                                          zero_input and (absent >> m) & 1)
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
                                f"baselines[{m}]: expected the feature shape of encoder {m}, {list(feat_shape)}; "
                                f"got {list(b.shape)}"
                            )
                        muted[m] = b.to(h[m].dtype).unsqueeze(0)
        # A modality that is present in every masked subset (or in none) needs only one of the two; the other slot
        # is multiplied by zero, so any tensor of the right shape does.
        real = [r if r is not None else h[m] for m, r in enumerate(real)]
        muted = [z if z is not None else h[m][:1] for m, z in enumerate(muted)]
        if self._split_head:
            return self._split_evaluate(h, real, muted, masks, B, stacked)
        if self._linear_head:
            F_masked = self._closed_form(real, muted, masked, B, C)
        else:
            # subset_batch takes one muted sample [...] (None: zeros) and broadcasts it over the batch.
            mute_vals = [None if not zero_input and self._baseline(m) is None else muted[m][0] for m in range(M)]
            rows = []
            for chunk in self._chunks(masked, B):
                feats = [subset_batch_op(real[m], mute_vals[m], chunk, m) for m in range(M)]
                what = f"fusion (on {len(chunk)} masked subsets stacked along the batch)"
                out = self._eval_apply(self._call_fusion, self._fusion_roots(), feats)
                out = self._check_out(out, len(chunk) * B, C, what)
                rows.append(out.view(len(chunk), B, C))
            F_masked = torch.cat(rows)
        return torch.cat([F_masked, full.unsqueeze(0)])

    def _encode_full(self, xs: List[Tensor], zero_for: int):
        """The full pass's features, and the muted (zero-input) features ``[1, ...]`` of the encoders in the bitmask
        ``zero_for`` that can compute them in the same call: an encoder that reuses its full pass for the masked
        subsets (it computes the same in both modes) and computes each row alone runs on its batch with one zero row
        appended, so the zero sample costs no pass of its own, forward or backward.

        Returns:
            ``(h, zero, stacked)``: M features ``[B, ...]``, M zero-sample features ``[1, ...]`` or None, and M
            outputs ``[B + 1, ...]`` of the stacked calls or None.
        """
        encoders = self._parts[1]
        B = xs[0].shape[0]
        stack = [
            bool((zero_for >> m) & 1) and not self._batch_stats[m] and not self.checkpoint_masked
            and (not enc.training or self._modes.reuse(m) is True)
            for m, enc in enumerate(encoders)
        ]
        inputs = [torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))]) if stack[m] else x for m, x in enumerate(xs)]
        out = encode(encoders, inputs)
        h: List[Tensor] = []
        zero: List[Optional[Tensor]] = []
        for m, o in enumerate(out):
            if not stack[m]:
                h.append(o)
                zero.append(None)
                out[m] = None
                continue
            if o.dim() == 0 or o.shape[0] != B + 1:
                raise ValueError(
                    f"encoders[{m}]: expected features [B, ...] with one row per input row ({B + 1} for the batch "
                    f"and the zero sample), got shape {tuple(o.shape)}"
                )
            h.append(o[:B])
            zero.append(o[B:])
        return h, zero, out

    def _split_evaluate(self, h: List[Tensor], real: List[Tensor], muted: List[Tensor], masks: List[int],
                        B: int, stacked: List[Optional[Tensor]]) -> Tensor:
        """``F [S, B, C]`` through the head's split: the first layer once per modality on the full pass's features,
        the real masked features where they differ and the muted sample; the tail once for the full pass (current
        mode) and once per chunk of masked subsets (eval mode)."""
        fusion = self._parts[2]
        own_real = any(r is not f for r, f in zip(real, h))
        if not own_real and all(o is not None for o in stacked):
            # Every encoder ran its batch and its zero sample in one call: one call of the first layer on those rows.
            pieces, bias, tail, layout = head_split(fusion, stacked)
            P_full = P = [p[:B] for p in pieces]
            Q = [p[B:] for p in pieces]
        else:
            # Three calls (full pass, real masked features, muted sample): real features equal to the full pass's
            # then give bitwise the same pieces, reused or recomputed.
            P_full, bias, tail, layout = head_split(fusion, h)
            P = head_split(fusion, real).pieces if own_real else P_full
            Q = head_split(fusion, [z[:1] for z in muted]).pieces
        masked = masks[:-1]
        S = len(masks)
        if not self._fusion_roots() and (self.max_batch is None or self.max_batch >= S * B):
            # A fusion that computes the same in both modes: every subset's pre-activation in one table (the full
            # set's too, from the same pieces when the masked features are the full pass's), its tail once on all rows.
            if P_full is P:
                z_all = subset_preactivations(P, Q, bias, layout, masks, self._selection(masks, P[0].device,
                                                                                         P[0].dtype))
            else:
                z_masked = subset_preactivations(P, Q, bias, layout, masked, self._selection(masked, P[0].device,
                                                                                             P[0].dtype))
                z_all = torch.cat([z_masked, full_preactivation(P_full, bias, layout).unsqueeze(0)])
            out = tail(z_all.reshape(S * B, z_all.shape[-1]))
            return self._check_out(out, S * B, None, "fusion (its split head's tail)").view(S, B, -1)
        z_full = full_preactivation(P_full, bias, layout)
        z_masked = subset_preactivations(P, Q, bias, layout, masked, self._selection(masked, P[0].device, P[0].dtype))
        full = self._check_out(tail(z_full), B, None, "fusion (its split head's tail)")
        C = full.shape[1]
        out = []
        H = z_masked.shape[-1]
        for start, chunk in self._chunk_spans(len(masks) - 1, B):
            what = f"fusion (its split head's tail on {chunk} masked subsets stacked along the batch)"
            zc = z_masked[start : start + chunk].reshape(chunk * B, H)
            res = self._eval_apply(lambda zs: tail(zs[0]), self._fusion_roots(), [zc])
            res = self._check_out(res, chunk * B, C, what)
            out.append(res.view(chunk, B, C))
        return torch.cat(out + [full.unsqueeze(0)])

    def _chunk_spans(self, count: int, batch: int) -> List[Tuple[int, int]]:
        k = count if self.max_batch is None else max(1, self.max_batch // batch)
        return [(i, min(k, count - i)) for i in range(0, count, k)]

    def _contributions(self, features: List[Tensor], rows: int) -> Tuple[List[Tensor], Optional[Tensor]]:
        return contributions(self._parts[2], features, rows, self.num_modalities, self._check_out)

    def _closed_form(self, real: List[Tensor], muted: List[Tensor], masked: List[int], B: int, C: int) -> Tensor:
        """``f(S) = bias + sum_m (piece_m(real) if m in S else piece_m(muted))`` for every masked S: ``[k, B, C]``."""
        with _eval_mode(self._fusion_roots()):
            P, bias = self._contributions(real, B)
            Q, _ = self._contributions(muted, 1)
        for m, p in enumerate(P):
            if p.shape[1] != C:
                raise ValueError(f"fusion.contributions piece {m} has {p.shape[1]} classes, the fusion output {C}")
        return self._assemble(P, Q, bias, masked, B)

    def _closed_form_stacked(self, stacked: List[Tensor], masks: List[int], B: int) -> Tensor:
        """``F [S, B, C]`` for every subset of ``masks`` (the full set included) from the pieces of the stacked rows
        ``[B + 1, d_m]`` (each encoder's batch and its zero sample)."""
        pieces, bias = self._contributions(stacked, B + 1)
        C = pieces[0].shape[1]
        for m, p in enumerate(pieces):
            if p.shape[1] != C:
                raise ValueError(f"fusion.contributions piece {m} has {p.shape[1]} classes, piece 0 has {C}")
        return self._assemble([p[:B] for p in pieces], [p[B:] for p in pieces], bias, masks, B)

    def _assemble(self, P: List[Tensor], Q: List[Tensor], bias: Optional[Tensor], masks: List[int], B: int) -> Tensor:
        return assemble(P, Q, bias, self._selection(masks, P[0].device, P[0].dtype), B)
