"""A method that asks for epoch passes with data and records what each one received (the epoch-pass contract)."""

import torch
from torch import nn

from agm_fast import methods
from agm_fast.methods import EpochPass

C, D = 3, 4


def models(seed=0, dims=(5, 2)):
    torch.manual_seed(seed)
    encoders = [nn.Sequential(nn.Linear(d, D), nn.BatchNorm1d(D), nn.ReLU()) for d in dims]
    return encoders, nn.Linear(D * len(dims), C)


class Recorder(methods.Method):
    """Asks for ``requests[epoch]`` (or ``default``); records every batch and every finish; sums the rows, the
    class counts and the features of each modality, and at the end of a pass adds ``shift`` to the fusion bias."""

    def __init__(self, encoders, fusion, *, requests=None, default=(), shift=0.0, window=None, seed=0,
                 task="classification"):
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        self.requests = dict(requests or {})
        self.default = tuple(default)
        self.shift = shift
        self.batches = []
        self.finished = []

    def epoch_passes(self, epoch):
        return self.requests.get(epoch, self.default)

    def begin_pass(self, request, epoch, device):
        zeros = {"rows": torch.zeros((), device=device), "classes": torch.zeros(C, device=device)}
        zeros.update({f"feat{m}": torch.zeros(D, device=device) for m in range(self.num_modalities)})
        return zeros

    def pass_batch(self, request, batch):
        self.batches.append({
            "request": request, "index": batch.index, "grad": torch.is_grad_enabled(),
            "training": [enc.training for enc in self.encoders], "features": [h.clone() for h in batch.features],
            "logits": None if batch.logits is None else batch.logits.clone(), "target": batch.target.clone(),
        })
        sums = {"rows": torch.tensor(float(batch.target.shape[0])),
                "classes": torch.bincount(batch.target, minlength=C).float()}
        sums.update({f"feat{m}": h.sum(0) for m, h in enumerate(batch.features)})
        return sums

    def finish_pass(self, request, epoch, sums, process_group=None):
        self.finished.append({"request": request, "epoch": epoch, "sums": {k: v.clone() for k, v in sums.items()},
                              "grad": torch.is_grad_enabled()})
        self.fusion.bias.add_(self.shift)


def recorder(encoders, fusion, **kwargs):
    return Recorder(encoders, fusion, **kwargs)


TRAIN_START = EpochPass("train", "start")
VAL_END = EpochPass("val", "end", outputs=True)
