"""AMSS / AMSS+ behind the method interface: after backward, each masked weight keeps a share c_m of its output
channels (drawn by gradient energy) and the others' gradients are zeroed."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ...fusion import per_modality_logits
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import channel_energy, keep_ratios, kept_count, mask_channels

__all__ = ["AMSSMethod", "masked_weights"]

_SEED_STRIDE = 0x9E3779B97F4A7C15
_MASKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def masked_weights(encoder: nn.Module, layers: str) -> List[Tuple[str, nn.Parameter]]:
    """The (name, weight) pairs of ``encoder`` whose output channels (dim 0) are masked under rule ``layers``."""
    if layers == "reference":
        return [(n, p) for n, p in encoder.named_parameters() if "layer" in n and "conv" in n and p.dim() == 4]
    seen, out = set(), []
    for mn, mod in encoder.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, _MASKED_TYPES) and isinstance(w, nn.Parameter) and w.dim() >= 2 and id(w) not in seen:
            seen.add(id(w))
            out.append((f"{mn}.weight" if mn else "weight", w))
    return out


@declare(HPARAMS)
class AMSSMethod(Method):
    """AMSS and AMSS+ (docs/methods.md, section 13): only the fused loss trains; from the fusion head's
    per-modality logits each modality gets a keep ratio ``c_m``, and after backward every masked weight of encoder m
    keeps ``ceil(C * c_m)`` of its C output channels, drawn without replacement in proportion to their gradient
    energy; the other channels' gradients are zeroed (AMSS+: kept channels scaled by ``1 / (q_o + 1 / C)``).

    One host read per step (the M ratios and the layers' non-zero channel counts): the kept count must be a Python
    int for ``torch.multinomial``. Draws use a generator seeded from ``(seed, step)``.

    Args:
        encoders, fusion, window, seed: as :class:`agm_fast.methods.Method` (classification only).
        **hparams: AMSS's hyper-parameters (``agm_fast.methods.amss.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("amss_plus", encoders=[enc_a, enc_v], fusion=head, layers="reference")
    """

    def __init__(self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification") -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: AMSS scores class probabilities, expected 'classification', got {task!r}")
        self._layers = [masked_weights(enc, self.layers) for enc in self.encoders]
        if not any(self._layers):
            raise ValueError(f"layers: expected a rule that selects some encoder weight, got {self.layers!r} "
                             "(it selects none in these encoders)")
        self._step = 0
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._decisions: Dict[str, Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed((self.seed + self._step * _SEED_STRIDE) % (1 << 64))
        return g

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Keep ratios from the detached head, then the in-place channel masking of the selected weights."""
        out, target = self._resolve(out, target)
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        if not self.in_window(out.epoch):
            self._decisions = {}
            return self.ones(target.device)
        with torch.no_grad():
            feats = [h.detach() for h in out.features]
            logits = per_modality_logits(self.fusion, feats)
            c, _ = keep_ratios(logits, feats, target, self.temperature, self.offset)
            work = []
            for m, layers in enumerate(self._layers):
                for _, p in layers:
                    if p.grad is not None:
                        mu = channel_energy(p.grad, p, self.energy)
                        work.append((m, p.grad, mu))
            stats = [c] + [torch.stack([(mu > 0).sum().float(), torch.isfinite(mu).all().float()])
                           for _, _, mu in work]
            host = torch.cat(stats).tolist()            # the step's one host read
            cs, rest = host[:self.num_modalities], host[self.num_modalities:]
            sample = self.selection == "sample"
            kept = torch.zeros(self.num_modalities, dtype=torch.int64, device=c.device)
            gens: Dict[torch.device, torch.Generator] = {}
            for i, (m, grad, mu) in enumerate(work):
                nonzero, finite = int(rest[2 * i]), rest[2 * i + 1] > 0
                if not finite:
                    continue                             # non-finite gradients stay as they are (the scaler skips)
                g = None
                if sample:
                    g = gens.get(mu.device)
                    if g is None:
                        g = gens[mu.device] = self._generator(mu.device)
                k = min(kept_count(mu.numel(), cs[m]), mu.numel())
                mask = mask_channels(grad, mu, k, nonzero, sample=sample, plus=self.plus, generator=g)
                kept[m] += (mask != 0).sum().to(kept.device)
        self._step += 1
        self._decisions = {"c": c.detach(), "kept": kept}
        return c

    def decisions(self) -> Dict[str, Tensor]:
        """``"c"``: ``[M]`` float32 keep ratios; ``"kept"``: ``[M]`` int64 output channels kept per modality (over its
        masked weights). Empty outside the window."""
        return dict(self._decisions)

    def method_state(self) -> Dict[str, Any]:
        return {"step": self._step}

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        step = state.get("step") if isinstance(state, Mapping) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"state: expected {{'step': int >= 0}}, got {state!r}")
        self._step = step
