"""A method written the way a new one is added to agm_fast: one file with a Method subclass (the registry entry is
one call, made by the test that uses it)."""

import torch

from agm_fast import methods


def _factor(name, value):
    if not 0 < value <= 1:
        raise ValueError(f"{name}: expected a number in (0, 1], got {value}")
    return float(value)


@methods.declare(methods.HParams(
    methods.HParam("factor", 0.5, "gradient factor of the strongest encoder", _factor, parse=float),
))
class DampStrongest(methods.Method):
    """Inside the window, multiply the gradients of the encoder with the largest gradient norm by ``factor``."""

    def __init__(self, encoders, fusion, *, window=None, seed=0, task="classification"):
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)

    def before_optimizer_step(self, out=None, target=None):
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        norms = torch.stack([
            torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in enc.parameters() if p.grad is not None]))
            for enc in self.encoders
        ])
        coeffs = torch.where(norms == norms.max(), torch.full_like(norms, self.factor), torch.ones_like(norms))
        for m, enc in enumerate(self.encoders):
            torch._foreach_mul_([p.grad for p in enc.parameters() if p.grad is not None], coeffs[m])
        return coeffs.to(torch.float32)
