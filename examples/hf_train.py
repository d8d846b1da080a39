"""Train two encoders on the embedded UCI Multiple Features digits with the Hugging Face Trainer and any agm_fast
method.

    pip install "agm_fast[hf]"
    python examples/hf_train.py --method agm
    python examples/hf_train.py --method ogm_ge --bf16

BalancedTrainer's model runs the method's forward (AGM's subsets, OPM's dropping) and its loss; the gradients are
modulated before the Trainer clips them, and the method's state is saved in every checkpoint-N folder.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import TensorDataset
from transformers import TrainingArguments

from agm_fast import methods
from agm_fast.data import load_mfeat, split_and_standardize
from agm_fast.integrations.hf import BalancedTrainer, collate
from agm_fast.models import MultiViewModel


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="agm", choices=methods.available())
    p.add_argument("--views", nargs=2, default=("fac", "zer"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data = load_mfeat(list(args.views))
    train, val, _ = split_and_standardize(data, args.seed)
    model = MultiViewModel([x.shape[1] for x in data.xs], data.num_classes, "concat")
    method = methods.create(args.method, list(model.encoders), model.fusion, seed=args.seed)
    out = args.out or tempfile.mkdtemp(prefix="agm-fast-hf-")
    targs = TrainingArguments(
        output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, optim="sgd", weight_decay=1e-4, max_grad_norm=0.0, bf16=args.bf16, use_cpu=True,
        save_strategy="epoch", report_to=[], seed=args.seed, logging_strategy="epoch",
    )
    trainer = BalancedTrainer(method=method, args=targs, train_dataset=TensorDataset(*train.xs, train.y),
                              data_collator=collate)
    trainer.train()
    model.eval()
    with torch.no_grad():
        acc = (model(*val.xs).argmax(-1) == val.y).double().mean().item()
    coeffs = torch.stack(trainer.balancing.coefficients[-5:]).median(0).values
    print(f"{args.method}: val acc {acc:.3f} | last coefficients {[round(c, 3) for c in coeffs.tolist()]} | "
          f"checkpoints in {out}")


if __name__ == "__main__":
    main()
