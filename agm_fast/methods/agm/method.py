"""AGM behind the method interface: the method owns the forward, which evaluates every needed subset."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import Tensor, nn

from .._subsets import MASKED_MODES, SHAPLEY, STRATEGIES
from ..agm import AGM
from ._parse import cap_or_none
from .base import Method, Option, StepOutput

__all__ = ["AGMMethod"]


class AGMMethod(Method):
    """AGM (docs/methods.md, section 1): the loss logits come from :class:`agm_fast.AGM`, whose value is f(A) and
    whose gradient is already modulated by this step's coefficients; :meth:`before_optimizer_step` changes nothing.

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        **kwargs: the arguments of :class:`agm_fast.AGM` (``alpha``, ``cap``, ``hold_last``, ``strategy``,
            ``masked_mode``, ``shapley``, ``num_permutations``, ``mute``, ``baselines``, ``max_batch``,
            ``process_group``), with its defaults.
    """

    core = AGM
    options = (
        Option("alpha", "modulation strength (published: AV-MNIST 2.5, CREMA-D 1.5, UR-Funny 4.0 / 6.0)"),
        Option("cap", "upper bound on rbar - r, or 'none'", type=cap_or_none),
        Option("hold_last", "keep the last coefficients outside the window (the reference) instead of 1", type=bool),
        Option("strategy", "how the subset outputs f(S) are evaluated", type=str, choices=STRATEGIES),
        Option("masked_mode", "mode of the masked passes (eval: the reference)", type=str, choices=MASKED_MODES),
        Option("shapley", "mono-modal outputs psi (reference), exact phi, or permutation-sampled", type=str,
               choices=SHAPLEY),
        Option("num_permutations", "permutations per step for --shapley sampled", type=int, flag="--permutations"),
    )

    def __init__(
        self, encoders, fusion, *, window=None, seed: int = 0, task: str = "classification", **kwargs: Any
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        kwargs = self._core_kwargs(kwargs)
        if "num_permutations" in kwargs and kwargs.get("shapley", "reference") != "sampled":
            raise ValueError(
                f"num_permutations: applies to shapley='sampled', got shapley={kwargs.get('shapley', 'reference')!r}"
            )
        for key in ("encoders", "fusion", "model", "num_modalities"):
            kwargs.pop(key, None)
        self.agm = AGM(encoders=list(self.encoders), fusion=fusion, window=window, seed=seed, task=task, **kwargs)
        self.window = self.agm.coefficients.window

    def forward(self, inputs: Sequence[Tensor], target: Tensor, epoch: Optional[int]) -> StepOutput:
        """Every subset output, the scores and the coefficients, in the AGM module; returns its loss logits."""
        res = self.agm(*inputs, target=target, epoch=epoch)
        out = StepOutput(res.logits, None, None, res.coeffs, epoch)
        self._last = (out, target)
        return out

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """The learned baselines of ``mute="feature"``, if any."""
        params = [p for p in self.agm.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    def modules(self) -> List[nn.Module]:
        return [self.agm]

    def state_dict(self) -> Dict[str, Any]:
        return self.agm.state_dict()

    def load_state_dict(self, state) -> None:
        self.agm.load_state_dict(state)
