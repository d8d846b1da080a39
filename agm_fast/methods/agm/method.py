"""AGM behind the method interface: the method owns the forward, which evaluates every needed subset."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import Tensor, nn

from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS
from .core import AGM

__all__ = ["AGMMethod"]


@declare(HPARAMS)
class AGMMethod(Method):
    """AGM (docs/methods.md, section 1): the loss logits come from :class:`agm_fast.AGM`, whose value is f(A) and
    whose gradient is already modulated by this step's coefficients; :meth:`before_optimizer_step` changes nothing.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        baselines, process_group, mode_invariant: as :class:`agm_fast.AGM`.
        **hparams: AGM's hyper-parameters (``agm_fast.methods.agm.config.HPARAMS``).

    Example::

        method = agm_fast.methods.create("agm", encoders=[enc_a, enc_v], fusion=head, alpha=1.5, window=(0, 70))
    """

    accumulation = "exact"

    def __init__(
        self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification", baselines=None,
        process_group=None, mode_invariant=None,
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        if "num_permutations" in self.hparams_given and self.shapley != "sampled":
            raise ValueError(f"num_permutations: applies to shapley='sampled', got shapley={self.shapley!r}")
        if "rounds" in self.hparams_given and self.shapley != "stratified":
            raise ValueError(f"rounds: applies to shapley='stratified', got shapley={self.shapley!r}")
        self.agm = AGM(
            encoders=list(self.encoders), fusion=fusion, window=window, seed=seed, task=task, baselines=baselines,
            process_group=process_group, mode_invariant=mode_invariant, **self.hparams_values,
        )
        self.window = self.agm.coefficients.window

    def forward(self, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int]) -> StepOutput:
        """Every subset output, the scores and the coefficients, in the AGM module; returns its loss logits."""
        res = self.agm(*inputs, target=target, epoch=epoch)
        out = StepOutput(res.logits, None, None, res.coeffs, epoch)
        self._set_last(out, target)
        return out

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """The learned baselines of ``mute="feature"``, if any."""
        params = [p for p in self.agm.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    def modules(self) -> List[nn.Module]:
        return [self.agm]

    def method_state(self) -> Dict[str, Any]:
        return self.agm.state_dict()

    def load_method_state(self, state) -> None:
        self.agm.load_state_dict(state)
