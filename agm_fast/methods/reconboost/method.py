"""ReconBoost behind the method interface: a method that owns its step (a schedule of boosting and rectification
phases over epochs) and its prediction rule (the boosted ensemble)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...fusion import output_layer
from ..base import Method, StepResult
from ..hparams import declare
from .config import HPARAMS

__all__ = ["ReconBoostMethod"]

#: The hidden width of the default shared head (the released ``Head``: Linear(d, 256), ReLU, Linear(256, C)).
HIDDEN = 256


@declare(HPARAMS)
class ReconBoostMethod(Method):
    """ReconBoost (Hua et al., ICML 2024; docs/methods.md, section 17) with the released schedule.

    Training runs in stages of ``epochs_per_stage + correct_epochs`` epochs; stage s boosts modality ``s % M`` (its
    encoder and the shared head learn what the ensemble of the other trained modalities misses), then rectifies the
    ensemble ``boost_rate * sum_m head(enc_m(x_m))`` of every modality trained so far with its cross-entropy. Each
    phase restarts the optimizer's momentum of its parameters (the released code builds a new optimizer per phase).
    One optimizer step per batch. :meth:`predict` is the ensemble. No window: the schedule is the method.

    Args:
        encoders, fusion, seed: as :class:`agm_fast.methods.Method` (``fusion`` only gives the number of classes and
            the device of the default head); ``window`` must stay None.
        task: ``"classification"``.
        head: the shared head (every modality's features go through it); default ``Linear(d, 256), ReLU,
            Linear(256, C)``, which needs M equal feature sizes.
        feature_dims: the M feature sizes (default: ``fusion.dims``, else the first forward's).
        **hparams: ReconBoost's hyper-parameters (``agm_fast.methods.reconboost.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("reconboost", encoders=[enc_a, enc_v], fusion=head, epochs_per_stage=4)
    """

    owns_step = True
    windowed = False
    accumulation_refusal = "it owns its step (one optimizer step per batch, on phase-dependent parameters)"

    def __init__(self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification",
                 head: Optional[nn.Module] = None, feature_dims: Optional[Sequence[int]] = None) -> None:
        if window is not None:
            raise ValueError(f"window: ReconBoost's stages are its schedule and it has no window, expected None, got "
                             f"{window!r}")
        super().__init__(encoders, fusion, window=None, seed=seed, task=task)
        if self.task != "classification":
            raise ValueError(f"task: ReconBoost's boosting loss reads class probabilities, expected 'classification', "
                             f"got {task!r}")
        w = output_layer(fusion).weight
        self._default_head = head is None
        if head is None:
            dims = self.feature_dims(feature_dims, required=False)
            if dims is not None and len(set(dims)) != 1:
                raise ValueError(f"feature_dims: ReconBoost's shared head reads every modality's features, expected M "
                                 f"equal sizes (or a head= of your own), got {dims}")
            kw = dict(device=w.device, dtype=w.dtype)
            # Without the sizes, the head takes them from the first features (all modalities' must be equal).
            first = nn.LazyLinear(HIDDEN, **kw) if dims is None else nn.Linear(dims[0], HIDDEN, **kw)
            head = nn.Sequential(first, nn.ReLU(), nn.Linear(HIDDEN, w.shape[0], **kw))
        elif not isinstance(head, nn.Module):
            raise TypeError(f"head: expected an nn.Module (features -> [B, C]), got {type(head).__name__}")
        self.shared = head
        # The boost rate in a module of its own (modules()), so that a checkpoint of the model and the method's modules
        # (torch.distributed.checkpoint.state_dict.get_state_dict) names it with the optimizer's state.
        self._rate = nn.Module()
        self._rate.boost_rate = nn.Parameter(torch.tensor(float(self.boost_rate), dtype=torch.float32,
                                                          device=w.device))
        self.rate = self._rate.boost_rate
        self._phase: Optional[Tuple[int, bool]] = None
        self._ga: Optional[Tensor] = None

    def schedule(self, epoch: Optional[int]) -> Tuple[int, int, bool]:
        """``(stage, modality, boosting)`` of ``epoch``: stage ``epoch // (epochs_per_stage + correct_epochs)``
        boosts modality ``stage % M`` in its first ``epochs_per_stage`` epochs, then rectifies."""
        stage, within = divmod(0 if epoch is None else int(epoch), self.epochs_per_stage + self.correct_epochs)
        return stage, stage % self.num_modalities, within < self.epochs_per_stage

    def _trained(self, stage: int, boosting: bool) -> List[int]:
        # The modalities in the ensemble: those boosted in the earlier stages (and this one's, once it rectifies).
        return list(range(min(self.num_modalities, stage + (0 if boosting else 1))))

    def _out(self, m: int, x: Tensor) -> Tensor:
        h = self.encoders[m](x)
        return self.shared(self.check_shared_width(m, h) if self._default_head else h)

    def _sum(self, members: Sequence[int], inputs: Sequence[Tensor]) -> Tensor:
        total = self._out(members[0], inputs[members[0]])
        for m in members[1:]:
            total = total + self._out(m, inputs[m])
        return total

    def predict(self, inputs: Sequence[Tensor]) -> Tensor:
        """The ensemble's logits ``boost_rate * sum_m head(enc_m(x_m))`` over the modalities trained so far (all of
        them before any step)."""
        if len(inputs) != self.num_modalities:
            self.encode(inputs)  # raises the usual error
        if self._phase is None:
            members = list(range(self.num_modalities))
        else:
            members = self._trained(self._phase[0], False)
        out = self._sum(members, inputs)
        return self.rate.to(out.dtype) * out

    def _params(self, members: Sequence[int], rate: bool) -> List[Tensor]:
        params = [p for m in members for p in self.encoders[m].parameters()] + list(self.shared.parameters())
        return params + [self.rate] if rate else params

    def train_step(self, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int], steps: Any, *,
                   progress: Optional[float] = None) -> StepResult:
        """One optimizer step of the phase ``epoch`` falls in (see the class). The result's ``loss`` is the boosting
        loss (boosting phase) or the ensemble's cross-entropy (rectification); ``coeffs`` are the modalities' weights
        in that loss (one-hot on the boosted modality; the boost rate on every trained modality)."""
        if len(inputs) != self.num_modalities:
            self.encode(inputs)  # raises the usual error
        stage, k, boosting = self.schedule(epoch)
        M, device = self.num_modalities, target.device
        if self._phase != (stage, boosting):
            # A new phase: the released code builds a new optimizer, so momentum restarts.
            steps.reset_state(self._params([k], False) if boosting else self._params(self._trained(stage, False),
                                                                                       True))
            self._phase = (stage, boosting)
        if boosting:
            loss, report, hits, ga = self._boost(inputs, target, stage, k)
            coeffs = self.constant([float(m == k) for m in range(M)], device)
        else:
            members = self._trained(stage, False)
            out = self.rate * self._sum(members, inputs)
            loss = F.cross_entropy(out, target)
            report, hits, ga = loss.detach(), (out.detach().argmax(-1) == target).sum(), None
            mask = self.constant([float(m in members) for m in range(M)], device)
            coeffs = mask * self.rate.detach().to(torch.float32)
        # Under data parallelism the loss (a mean over this rank's rows) is scaled by the rank's share of the global
        # batch (SubSteps.share).
        share = steps.share(target.shape[0], device)
        steps.run(loss if share is None else loss * share)
        self._ga = ga
        return StepResult(report, hits, torch.full((), float(target.shape[0]), device=device), coeffs)

    def _boost(self, inputs: Sequence[Tensor], target: Tensor, stage: int, k: int):
        out = self._out(k, inputs[k])
        others = [m for m in self._trained(stage, True) if m != k]
        logp = out.log_softmax(1)
        t = F.one_hot(target, out.shape[1]).to(logp.dtype)
        if others:
            with torch.no_grad():
                join = self.rate * self._sum(others, inputs)
            q = join.softmax(1)
        else:  # the released initial ensemble: one constant logit, whose softmax is 1
            q = torch.ones_like(logp[:, :1])
        boosting = -self.weight1 * (t * logp).mean(-1) + self.weight2 * (t * q * logp).mean(-1)
        loss, ga = boosting.mean(), None
        if stage > 0:
            # The gradient-assist term against the previous stage's modality (for M = 2, the other one): its forward
            # runs in training mode as in the released loop (batch-norm statistics move).
            prev = (stage - 1) % self.num_modalities
            with torch.set_grad_enabled(self.ga_gradient):
                pre = self._out(prev, inputs[prev]).detach().softmax(1)
                mine = out.softmax(1) if self.ga_gradient else out.detach().softmax(1)
                ga = F.mse_loss(mine, pre)
            loss = loss + self.ga_weight * ga
            ga = ga.detach()
        hits = (out.detach().argmax(-1) == target).sum()
        return loss, boosting.detach().mean(), hits, ga

    def decisions(self) -> Dict[str, Tensor]:
        """``boost_rate``: ``[]`` after the last step; ``ga_loss``: ``[]`` the gradient-assist term of the last
        step (a boosting step from stage 1 on; absent otherwise)."""
        out = {"boost_rate": self.rate.detach().clone()}
        if self._ga is not None:
            out["ga_loss"] = self._ga
        return out

    def modules(self) -> List[nn.Module]:
        """The shared head, and a module that holds the boost rate."""
        return [self.shared, self._rate]

    def to(self, device) -> "ReconBoostMethod":
        super().to(device)
        self.rate.data = self.rate.data.to(device)
        return self

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """The shared head's parameters and the boost rate, at the main learning rate."""
        return [{"params": [p for p in self.shared.parameters() if p.requires_grad] + [self.rate]}]

    def method_state(self) -> Dict[str, Any]:
        return {"head": self.shared.state_dict(), "boost_rate": self.rate.detach().clone(),
                "phase": None if self._phase is None else list(self._phase)}

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        self.shared.load_state_dict(state["head"])
        with torch.no_grad():
            self.rate.copy_(state["boost_rate"])
        self._phase = None if state["phase"] is None else (int(state["phase"][0]), bool(state["phase"][1]))
