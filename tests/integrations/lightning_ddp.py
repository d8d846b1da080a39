"""Lightning DDP on two CPU processes (gloo) with an agm_fast method; each rank saves its parameters and
coefficients (run by tests/integrations/test_integrations.py: ``python lightning_ddp.py METHOD OUT_DIR``).

``python lightning_ddp.py owned OUT_DIR METHOD...`` trains methods that own their step (MLA, ReconBoost) one after the
other, 16 rows per rank and batch, without BatchNorm, as hf_ddp.py does; each rank saves its parameters and the method
state (run by tests/integrations/test_trainer_exactness.py)."""

import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

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


class InOrder(pl.LightningDataModule):
    """Rank r reads rows r, r + 2, ... in order (Lightning's own sampler would shuffle), so that step i's two local
    batches of 16 are rows 32 i to 32 i + 31: one process's batch i of 32."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=16, sampler=DistributedSampler(self.dataset, shuffle=False))


# As hf_ddp.py (and OWNED in test_trainer_exactness.py).
OWNED = {"mla": ({"projection": True}, 2), "reconboost": ({"epochs_per_stage": 1, "correct_epochs": 1}, 3)}


def owned(out: str, names) -> None:
    torch.set_num_threads(1)
    full = load_mfeat(["fac", "zer"])
    train, _, _ = split_and_standardize(full, 0)
    xs, y = [x[:64] for x in train.xs], train.y[:64]
    for name in names:
        options, epochs = OWNED[name]
        torch.manual_seed(0)
        model = MultiViewModel([x.shape[1] for x in xs], full.num_classes, "concat", hidden=16, feature_dim=8)
        for encoder in model.encoders:  # no BatchNorm: a rank's rows normalised alone would differ from one process
            encoder[1] = torch.nn.Identity()
        method = methods.create(name, list(model.encoders), model.fusion, seed=0, **options)
        module = BalancedModule(method, lr=0.05, momentum=0.9)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             use_distributed_sampler=False)
        trainer.fit(module, datamodule=InOrder(TensorDataset(*xs, y)))
        torch.save(
            {
                "world_size": trainer.world_size,
                "steps": trainer.global_step,
                "model": {k: v.detach().clone() for k, v in model.named_parameters()},
                "method": method.method_state(),
                "coeffs": torch.stack(module.callback.coefficients).cpu(),
            },
            os.path.join(out, f"{name}-rank{trainer.global_rank}.pt"),
        )


if __name__ == "__main__":
    if sys.argv[1] == "owned":
        owned(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1], sys.argv[2])
