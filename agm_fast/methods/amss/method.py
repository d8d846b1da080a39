"""AMSS / AMSS+ behind the method interface: after backward, each masked weight keeps a share c_m of its output
channels (drawn by gradient energy) and the others' gradients are zeroed. Under data parallelism every rank takes
one process's decisions on the global batch; under gradient accumulation each micro-batch is masked as its own step."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ... import distributed, sharding
from ...fusion import per_modality_logits
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import channel_energy, channel_mask, keep_ratio_sums, keep_ratios, keep_ratios_from_sums, kept_count

__all__ = ["AMSSMethod", "masked_weights"]

_SEED_STRIDE = 0x9E3779B97F4A7C15
_MASKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _local(t: Tensor) -> Tensor:
    # This rank's shard of an FSDP2 tensor (a view of its storage: writing into it writes the gradient); else itself.
    return t.to_local() if sharding.is_sharded(t) else t


def _rows(t: Tensor) -> Tuple[int, int, int]:
    """``(first row, rows per shard, world)`` of this rank's dim-0 shard of an FSDP2 gradient (``(0, C, 1)`` plain)."""
    if not sharding.is_sharded(t):
        return 0, t.shape[0], 1
    sharding.shard_start(t, "grad")            # checks the layout: Shard(0) over a 1-D mesh
    world, rank = t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-t.shape[0] // world)
    return min(rank * chunk, t.shape[0]), chunk, world


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
    int for ``torch.multinomial``. Draws use a generator seeded from ``(seed, step)``. Under gradient accumulation
    (``set_accumulation(k)``, one process) each micro-batch is a step: its own ratios and draw, masked at the end of
    its backward (its masked weights' gradients are held until then), one host read per micro-batch.

    Args:
        encoders, fusion, window, seed: as :class:`agm_fast.methods.Method` (classification only).
        process_group: the data-parallel group (None: the default group when ``torch.distributed`` is initialised).
            Every rank takes the decisions of one process on the global batch: the ratios come from label counts
            and loss / entropy sums of every rank, and the channel energies of FSDP2-sharded weights (rows =
            output channels) from every rank's rows; both travel in **one all-gather per step** (rank 0's seed is
            broadcast once, at construction). Each rank then draws the same channels and masks its own rows.
        **hparams: AMSS's hyper-parameters (``agm_fast.methods.amss.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("amss_plus", encoders=[enc_a, enc_v], fusion=head, layers="reference")
    """

    accumulation = "hooks"

    def __init__(self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification",
                 process_group=None) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: AMSS scores class probabilities, expected 'classification', got {task!r}")
        self.process_group = process_group
        # Every rank draws the same channels: rank 0's seed, read once here (not per step).
        self.seed = distributed.broadcast_seed(self.seed, process_group)
        self._meshes: Dict[int, bool] = {}
        self._layers = [masked_weights(enc, self.layers) for enc in self.encoders]
        if not any(self._layers):
            raise ValueError(f"layers: expected a rule that selects some encoder weight, got {self.layers!r} "
                             "(it selects none in these encoders)")
        self._step = 0
        self._micro: Optional[Tuple[Tensor, Dict[int, Tuple[int, Tensor]]]] = None
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._decisions: Dict[str, Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed((self.seed + self._step * _SEED_STRIDE) % (1 << 64))
        return g

    def _check_mesh(self, grad: Tensor, world: int) -> None:
        # The energies of a sharded weight are gathered over the data-parallel group: it must be the shards' group.
        mesh = grad.device_mesh
        if id(mesh) in self._meshes:
            return
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        active = distributed.is_active(self.process_group)
        if not active or dist.get_process_group_ranks(mesh.get_group()) != dist.get_process_group_ranks(group):
            got = "another group" if active else "a group with nothing to reduce (one rank, or not a member)"
            raise ValueError(f"process_group: expected the group the encoders' weights are sharded over "
                             f"(fully_shard's 1-D mesh of {world} ranks), got {got}")
        self._meshes[id(mesh)] = True

    def _ratios_and_energies(self, logits: Tensor, feats: List[Tensor], target: Tensor,
                             work: List[Tuple[int, nn.Parameter]]) -> Tuple[Tensor, List[Tensor]]:
        """The keep ratios and each weight's whole ``[C]`` channel energies, as one process on the global batch."""
        local = [channel_energy(_local(p.grad), _local(p.detach()), self.energy) for _, p in work]
        rows = [_rows(p.grad) for _, p in work]
        if not distributed.is_active(self.process_group) and all(w == 1 for _, _, w in rows):
            c, _ = keep_ratios(logits, feats, target, self.temperature, self.offset)
            return c, local
        sums = keep_ratio_sums(logits, feats, target)
        packed, sharded = [sums], []
        for i, ((_, p), mu, (_, chunk, world)) in enumerate(zip(work, local, rows)):
            if world > 1:
                self._check_mesh(p.grad, world)
                packed.append(torch.cat([mu, mu.new_zeros(chunk - mu.numel())]).to(sums.device))
                sharded.append(i)
        gathered = distributed.all_gather(torch.cat(packed), self.process_group)      # the step's one collective
        c, _ = keep_ratios_from_sums(gathered[:, :sums.numel()].sum(0), self.num_modalities, self.temperature,
                                     self.offset)
        at = sums.numel()
        for i in sharded:
            C, chunk = work[i][1].shape[0], rows[i][1]
            local[i] = gathered[:, at:at + chunk].reshape(-1)[:C].to(local[i].device)
            at += chunk
        return c, local

    def _mask(self, c: Tensor, work: List[Tuple[int, Tensor]], mus: List[Tensor]) -> None:
        """Mask each ``(m, gradient)`` of ``work`` (its whole energies ``mus[i]``) with modality m's ratio, one host
        read in all, the draws from this step's generator; then count the step."""
        stats = [c] + [torch.stack([(mu > 0).sum().float(), torch.isfinite(mu).all().float()]).to(c.device)
                       for mu in mus]
        host = torch.cat(stats).tolist()            # the step's one host read
        cs, rest = host[:self.num_modalities], host[self.num_modalities:]
        sample = self.selection == "sample"
        kept = torch.zeros(self.num_modalities, dtype=torch.int64, device=c.device)
        gens: Dict[torch.device, torch.Generator] = {}
        for i, ((m, grad), mu) in enumerate(zip(work, mus)):
            nonzero, finite = int(rest[2 * i]), rest[2 * i + 1] > 0
            if not finite:
                continue                             # non-finite gradients stay as they are (the scaler skips)
            g = None
            if sample:
                g = gens.get(mu.device)
                if g is None:
                    g = gens[mu.device] = self._generator(mu.device)
            k = min(kept_count(mu.numel(), cs[m]), mu.numel())
            mask = channel_mask(mu, k, nonzero, sample=sample, plus=self.plus, generator=g)
            rows, row0 = _local(grad), _rows(grad)[0]
            rows.mul_(mask[row0:row0 + rows.shape[0]].to(rows.device, rows.dtype).view(-1, *([1] * (rows.dim() - 1))))
            kept[m] += (mask != 0).sum().to(kept.device)
        self._step += 1
        self._decisions = {"c": c.detach(), "kept": kept}

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Keep ratios from the detached head, then the in-place channel masking of the selected weights (under
        accumulation, the mean of the micro-batches' ratios: each was masked at the end of its backward)."""
        out, target = self._resolve(out, target)
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        if self.accumulating:
            coeffs = self.finish_accumulated_step()
            return self.ones(target.device) if coeffs is None else coeffs
        if not self.in_window(out.epoch):
            self._decisions = {}
            return self.ones(target.device)
        with torch.no_grad():
            feats = [h.detach() for h in out.features]
            logits = per_modality_logits(self.fusion, feats)
            work = [(m, p) for m, layers in enumerate(self._layers) for _, p in layers if p.grad is not None]
            c, mus = self._ratios_and_energies(logits, feats, target, work)
            self._mask(c, [(m, p.grad) for m, p in work], mus)
        return c

    # -- gradient accumulation: each micro-batch masked as its own step ------------------------------------------
    def modulated_parameters(self) -> List[List[Tensor]]:
        return [[p for _, p in layers] for layers in self._layers]

    def micro_batch_decision(self, out: StepOutput, target: Tensor) -> Tensor:
        """This micro-batch's keep ratios, from the detached head on its features (its masking waits for the
        energies of its gradient, at the end of its backward)."""
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        if distributed.is_active(self.process_group) or any(sharding.is_sharded(p) for ps in
                                                            self.modulated_parameters() for p in ps):
            raise ValueError(
                "steps: AMSS draws each micro-batch's channels from the energies of that micro-batch's gradient "
                "averaged over the ranks, which data-parallel accumulation (DDP's no_sync, FSDP) never forms; use "
                "no gradient accumulation under data parallelism")
        self._micro = None
        if not self.in_window(out.epoch):
            self._decisions = {}
            return self.ones(target.device)
        with torch.no_grad():
            feats = [h.detach() for h in out.features]
            c, _ = keep_ratios(per_modality_logits(self.fusion, feats), feats, target, self.temperature, self.offset)
        self._micro = (c, {})
        return c

    def modulate_micro_gradient(self, m: int, index: int, grad: Tensor, coeffs: Tensor) -> Tensor:
        # The micro-batch's gradient is kept aside and zeros are accumulated; at the end of the backward the kept
        # gradients are masked in the order of a step (so the draws are a step's) and added to .grad.
        if self._micro is None:
            return grad
        pending = self._micro[1]
        if not pending:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_micro_batch)
        pending[index] = (m, grad)
        return torch.zeros_like(grad)

    def _finish_micro_batch(self) -> None:
        c, pending = self._micro
        self._micro = (c, {})
        if not pending:
            return
        params = [p for ps in self.modulated_parameters() for p in ps]
        order = sorted(pending)
        work = [pending[i] for i in order]
        with torch.no_grad():
            grads = [g.clone() if g.requires_grad else g for _, g in work]
            mus = [channel_energy(g, params[i], self.energy) for g, i in zip(grads, order)]
            self._mask(c, [(m, g) for (m, _), g in zip(work, grads)], mus)
            for g, i in zip(grads, order):
                params[i].grad.add_(g)

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
