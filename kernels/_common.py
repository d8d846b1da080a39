"""Triton device functions shared by the score kernels of :mod:`.shapley` and :mod:`.ogm_scores`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(x, offs_c, C, labels, row_max, row_sum, at_label):
    """Fold one chunk of classes into a streaming log-sum-exp and the logit at each row's label.

    Classes lie along the last axis of ``x``; the running state has x's shape without that axis, whatever the
    rank (``[BLOCK_B]`` rows for one modality, ``[BLOCK_M, BLOCK_B]`` for all of them). After the last chunk,
    ``log(sum_c exp(x_c)) = row_max + log(row_sum)`` and ``at_label`` is the logit at the label.

    Args:
        x: ``[..., BLOCK_C]`` float32 logits of the chunk; padding columns may hold anything.
        offs_c: ``[BLOCK_C]`` class index of each column; columns with ``offs_c >= C`` are padding.
        C: number of classes.
        labels: class index of each row, broadcastable to ``row_max``. It is only compared with class indices;
            an out-of-range label may match a padding column, and the caller must discard that row's result.
        row_max: running maximum of the row (``-inf`` before the first chunk).
        row_sum: running ``sum exp(x - row_max)`` (0 before the first chunk).
        at_label: running sum of the logit at the label (0 before the first chunk).

    Returns:
        ``(row_max, row_sum, at_label)`` including this chunk.
    """
    xm = tl.where(offs_c < C, x, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(xm, axis=-1))
    # A row whose maximum is still -inf has nothing to rescale; keep the exponentials finite.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(xm - tl.expand_dims(safe_max, -1)), axis=-1)
    hit = offs_c == tl.expand_dims(labels, -1)
    at_label = at_label + tl.sum(tl.where(hit, xm, 0.0), axis=-1)
    return new_max, row_sum, at_label


# The compile gate's shape axes (tests/gates/triton_gate.py), shared by the kernel modules' gate_cases(): batch B,
# classes C, modalities M, feature size D and dtype reach the edges the launchers must handle.
GATE_BS = (1, 7, 64, 1000, 8192)
GATE_CS = (1, 10, 101, 1030, 4096)
GATE_MS = (2, 3, 5, 8)
GATE_DS = (1, 5, 1000, 1_000_000)
GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gate_meta(shape, dtype=torch.float32):
    """A ``meta`` tensor: the launchers choose their configuration from metadata alone."""
    return torch.empty(shape, dtype=dtype, device="meta")
