"""A reference-style InfoReg step, written from docs/methods.md, section 10: the baseline of ``bench_method_step``.

It computes what the reference training loop computes, the way that loop computes it:

- a logging block that back-propagates the fused loss and each modality's loss one at a time (``retain_graph``),
  copies every gradient and zeroes them again; it changes nothing in the step's result;
- the step's gradient from M + 1 backward passes that accumulate (each modality's loss, then the fused loss);
- the scores, the leader, ``k`` and ``beta`` as Python floats (host reads);
- the proximal pull and the Fisher accumulation in Python loops over named parameters and modules.

The redundant work against :class:`agm_fast.methods.inforeg.InfoRegMethod` is the logging block (M + 1 backward
passes and copies), M further backward passes (one backward of the summed loss gives the same gradient) and the host
round trips. A test checks that both give the same parameter gradients, step after step.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

__all__ = ["ReferenceStyleInfoReg"]

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


class ReferenceStyleInfoReg:
    """InfoReg as the reference trains it, with a concatenation head (``fusion.fc`` on the concatenated features).

    Args:
        encoders: M modules ``x_m -> [B, d_m]``.
        fusion: a concatenation head with an ``fc`` ``nn.Linear``.
        beta_bases: the leader's base strength per modality (the reference: 0.95, then 0.1).
        threshold: regulate only while ``k`` exceeds it.
        trace_window: the epochs ``k`` averages over (and its zero padding).
    """

    def __init__(self, encoders: Sequence[nn.Module], fusion: nn.Module, beta_bases: Sequence[float],
                 threshold: float = 0.05, trace_window: int = 10):
        self.encoders = list(encoders)
        self.fusion = fusion
        self.beta_bases = list(beta_bases)
        self.threshold = threshold
        self.window = trace_window
        self.traces: List[float] = [0.0] * trace_window  # modality 0's, padded with zeros
        self.k = 1.0
        self.anchor: List[Dict[str, Tensor]] = []
        self.fisher: List[Dict[str, Tensor]] = []
        self.logged: List[Tensor] = []
        self.beta: List[float] = []

    def begin_epoch(self) -> None:
        """The epoch's anchor (a copy of every encoder parameter), ``k``, and zeroed Fisher accumulators."""
        if len(self.traces) > self.window:
            last = self.traces[-self.window:]
            self.k = (self.traces[-1] - self.traces[-self.window - 1]) / sum(last) if sum(last) != 0 else 0.0
        self.anchor = [{n: p.detach().clone() for n, p in enc.named_parameters()} for enc in self.encoders]
        self.fisher = [{n: torch.zeros_like(mod.weight) for n, mod in enc.named_modules() if isinstance(mod, _LAYERS)}
                       for enc in self.encoders]

    def end_epoch(self) -> None:
        """Modality 0's trace: the sum over its layers of the mean accumulated squared gradient."""
        self.traces.append(sum(acc.mean().item() for acc in self.fisher[0].values()))

    def backward(self, optimizer: torch.optim.Optimizer, inputs: Sequence[Tensor], labels: Tensor) -> None:
        """Forward, the logging block, the accumulated backward passes, the decision, the pull and the Fisher sums."""
        M = len(self.encoders)
        optimizer.zero_grad()
        feats = [enc(x) for enc, x in zip(self.encoders, inputs)]
        out = self.fusion(*feats)
        weight, bias = self.fusion.fc.weight, self.fusion.fc.bias
        outs, start = [], 0
        for f in feats:
            outs.append(f @ weight[:, start:start + f.shape[1]].t() + bias / M)
            start += f.shape[1]
        loss = Fn.cross_entropy(out, labels)
        losses = [Fn.cross_entropy(o, labels) for o in outs]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.logged = []
        for term in [loss, *losses]:
            term.backward(retain_graph=True)
            self.logged += [p.grad.clone() for p in params if p.grad is not None]
            optimizer.zero_grad()
        for term in [*losses[::-1], loss]:
            term.backward(retain_graph=term is not loss)
        scores = [torch.softmax(o, dim=1).gather(1, labels.view(-1, 1)).sum().item() for o in outs]
        lead = max(range(M), key=lambda m: scores[m])
        runner_up = max(scores[m] for m in range(M) if m != lead)
        self.beta = [0.0] * M
        if scores[lead] > runner_up and self.k > self.threshold:
            gap = torch.tensor(scores[lead] - runner_up)
            self.beta[lead] = self.beta_bases[lead] * torch.exp(torch.tanh(gap)).item()
        with torch.no_grad():
            for m, enc in enumerate(self.encoders):
                for name, p in enc.named_parameters():
                    p.grad += self.beta[m] * (p - self.anchor[m][name])
                for name, mod in enc.named_modules():
                    if isinstance(mod, _LAYERS):
                        self.fisher[m][name] += mod.weight.grad * mod.weight.grad

    def step(self, optimizer: torch.optim.Optimizer, inputs: Sequence[Tensor], labels: Tensor) -> None:
        """One training step: :meth:`backward`, then the optimizer step."""
        self.backward(optimizer, inputs, labels)
        optimizer.step()
