"""Train two encoders on the embedded UCI Multiple Features digits with PyTorch Lightning and any agm_fast method.

    pip install "agm_fast[lightning]"
    python examples/lightning_train.py --method agm
    python examples/lightning_train.py --method ogm_ge --precision bf16-mixed
    python examples/lightning_train.py --method ogm_ge --devices 2 --strategy ddp      # two CPU processes (gloo)

The model is agm_fast's demo model (one MLP encoder per view, a concatenation head); BalancedModule's training step
is the method's, and its callback modulates the gradients after AMP unscaling, before the optimizer step.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from agm_fast import methods
from agm_fast.data import load_mfeat, split_and_standardize
from agm_fast.integrations.lightning import BalancedModule
from agm_fast.models import MultiViewModel


def loaders(views: Sequence[str], batch_size: int, seed: int):
    data = load_mfeat(list(views))
    train, val, _ = split_and_standardize(data, seed)
    make = lambda split, shuffle: DataLoader(  # noqa: E731
        TensorDataset(*split.xs, split.y), batch_size=batch_size, shuffle=shuffle, drop_last=shuffle
    )
    return make(train, True), make(val, False), [x.shape[1] for x in data.xs], data.num_classes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="agm", choices=methods.available())
    p.add_argument("--views", nargs=2, default=("fac", "zer"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--precision", default="32-true", help="e.g. 32-true or bf16-mixed")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="e.g. ddp (with --devices 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed, workers=True)
    train, val, dims, num_classes = loaders(args.views, args.batch_size, args.seed)
    model = MultiViewModel(dims, num_classes, "concat", hidden=128, feature_dim=64)
    method = methods.create(args.method, list(model.encoders), model.fusion, seed=args.seed)
    module = BalancedModule(method, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                        precision=args.precision, logger=False, enable_checkpointing=False)
    trainer.fit(module, train, val)
    if trainer.is_global_zero:
        coeffs = torch.stack(module.callback.coefficients[-len(train):]).median(0).values
        print(f"{args.method}: val acc {float(trainer.callback_metrics['val_acc']):.3f} | last-epoch coefficients "
              f"{[round(c, 3) for c in coeffs.tolist()]} | per-view val acc {module.modality_metrics()}")


if __name__ == "__main__":
    main()
