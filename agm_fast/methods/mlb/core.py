"""MLB's arithmetic: per-modality scores of the unimodal heads, ratios and gradient coefficients.

``s_m`` is the batch mean of the softmax probability of the true class (regression: the mean squared error);
``r_m`` compares the mean of the other modalities' scores with the own one; ``k_m = 1 + tanh(alpha (r_m - 1))``
(docs/methods.md, section 11). Everything stays on the device; nothing synchronises with the host.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mlb_scores", "mlb_coefficients"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision logits are scored in float32; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def mlb_scores(logits: Sequence[Tensor], target: Tensor, task: str = "classification") -> Tensor:
    """The M scores of one step, treated as constants.

    Args:
        logits: M tensors ``[B, C]``, the unimodal heads' outputs.
        target: ``[B]`` int64 class indices (regression: targets of the logits' shape, or ``[B]`` when C is 1).
        task: ``"classification"``: ``s_m = mean_i softmax(logits_m)[i, y_i]``; ``"regression"``:
            ``s_m = mean((logits_m - y)^2)``.

    Returns:
        ``[M]`` scores in the logits' dtype (at least float32), on their device.
    """
    if len(logits) < 2:
        raise ValueError(f"logits: expected at least two modalities, got {len(logits)}")
    for m, out in enumerate(logits):
        if not isinstance(out, Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"logits[{m}]: expected a [B, C] tensor, got {got}")
        if out.shape != logits[0].shape:
            raise ValueError(f"logits[{m}]: shape {tuple(out.shape)} differs from logits[0]'s {tuple(logits[0].shape)}")
    dtype = _compute_dtype(logits[0].dtype)
    stacked = torch.stack([out.detach().to(dtype) for out in logits])
    if task == "regression":
        y = target.detach().to(dtype).reshape(stacked.shape[1:])
        return (stacked - y).square().mean(dim=(1, 2))
    M, B, _ = stacked.shape
    index = target.reshape(1, B, 1).expand(M, B, 1)
    return F.softmax(stacked, dim=2).gather(2, index).reshape(M, B).mean(dim=1)


def mlb_coefficients(
    scores: Tensor, alpha: float, beta: Optional[float] = None, task: str = "classification"
) -> Tuple[Tensor, Tensor]:
    """Ratios and coefficients from the M scores.

    Classification: ``r_m = mean_{j != m} s_j / s_m`` (for M = 2 the reference computes ``r_1 = 1 / r_0``, and so
    does this); regression (scores are errors): ``r_m = s_m / mean_{j != m} s_j``. Then
    ``k_m = 1 + tanh(alpha (r_m - 1))``, or ``1 + (beta - 1) tanh(alpha (r_m - 1))`` where ``r_m > 1`` when ``beta``
    is given.

    Args:
        scores: ``[M]`` scores from :func:`mlb_scores`.
        alpha: modulation strength >= 0.
        beta: the cap of a weaker modality's coefficient, or None.
        task: ``"classification"`` or ``"regression"``.

    Returns:
        ``(ratios, k)``: two ``[M]`` tensors in the scores' dtype.
    """
    M = scores.shape[0]
    if M == 2 and task != "regression":
        r0 = scores[1] / scores[0]
        ratios = torch.stack([r0, 1 / r0])
    else:
        # Each row adds the other modalities' scores exactly as a plain sum would (the own one enters times 0).
        others = (1 - torch.eye(M, dtype=scores.dtype, device=scores.device)) @ scores / (M - 1)
        ratios = others / scores if task != "regression" else scores / others
    t = torch.tanh(alpha * (ratios - 1))
    k = 1 + t
    if beta is not None:
        k = torch.where(ratios > 1, 1 + (beta - 1) * t, k)
    return ratios, k
