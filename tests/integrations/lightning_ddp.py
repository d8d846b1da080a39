"""Lightning DDP on two CPU processes (gloo) with an agm_fast method; each rank saves its parameters and
coefficients (run by tests/test_integrations.py: ``python tests/lightning_ddp.py METHOD OUT_DIR``)."""

import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from agm_fast import methods
from agm_fast.data import load_mfeat, split_and_standardize
from agm_fast.integrations.lightning import BalancedModule
from agm_fast.models import MultiViewModel


def main(name: str, out: str) -> None:
    full = load_mfeat(["fac", "zer"])
    train, _, _ = split_and_standardize(full, 0)
    xs, y = [x[:256] for x in train.xs], train.y[:256]
    torch.manual_seed(0)
    model = MultiViewModel([x.shape[1] for x in xs], full.num_classes, "concat", hidden=32, feature_dim=16)
    method = methods.create(name, list(model.encoders), model.fusion, seed=0)
    module = BalancedModule(method, lr=0.05, momentum=0.9)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # Lightning's DDP gives each rank its own half of every batch through a DistributedSampler.
    trainer.fit(module, DataLoader(TensorDataset(*xs, y), batch_size=32, shuffle=False))
    torch.save(
        {
            "world_size": trainer.world_size,
            # Parameters: BatchNorm's running statistics are each rank's own between DDP's buffer broadcasts.
            "model": {k: v.detach().clone() for k, v in model.named_parameters()},
            "coeffs": torch.stack(module.callback.coefficients).cpu(),
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
