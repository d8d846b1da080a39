"""The HF Trainer on two CPU processes (gloo) with gradient accumulation; each rank saves its parameters (run by
tests/integrations/test_trainer_exactness.py: ``torchrun --nproc_per_node=2 tests/integrations/hf_ddp.py OUT K
METHOD...``). Each rank trains on 16 rows per micro-batch, so one optimizer step sees 2 * 16 * K rows. MLA and
ReconBoost (K = 1) own their step: their sub-steps run outside DDP's reducer, and each rank saves the method state too.
"""

import os
import sys

import torch
from torch.utils.data import TensorDataset
from transformers import TrainingArguments

from agm_fast import methods
from agm_fast.data import load_mfeat, split_and_standardize
from agm_fast.integrations.hf import BalancedTrainer, collate
from agm_fast.models import MultiViewModel

LR, MOMENTUM, LOCAL = 0.05, 0.9, 16
# As CASES in test_trainer_exactness.py (GDL: HF_DDP_OPTIONS there, a clip that binds).
OPTIONS = {"agm": {"alpha": 1.5}, "ogm": {"alpha": 0.8}, "ogm_ge": {"alpha": 0.8}, "gdl": {"clip_grad_norm": 0.5},
           # As OWNED in test_trainer_exactness.py: MLA's projection reads the global batch's features; ReconBoost
           # boosts, rectifies and boosts again (with its gradient-assist term) in three epochs.
           "mla": {"projection": True}, "reconboost": {"epochs_per_stage": 1, "correct_epochs": 1}}
EPOCHS = {"reconboost": 3}


def main(out: str, k: int, names) -> None:
    torch.set_num_threads(1)
    full = load_mfeat(["fac", "zer"])
    train, _, _ = split_and_standardize(full, 0)
    rows = 2 * LOCAL * k * 2
    xs, y = [x[:rows] for x in train.xs], train.y[:rows]
    for name in names:
        args = TrainingArguments(
            output_dir=os.path.join(out, name), num_train_epochs=EPOCHS.get(name, 2), per_device_train_batch_size=LOCAL,
            gradient_accumulation_steps=k, learning_rate=LR, max_grad_norm=0.0, train_sampling_strategy="sequential",
            use_cpu=True, ddp_backend="gloo", report_to=[], seed=0, save_strategy="no", logging_strategy="no",
            disable_tqdm=True,
        )
        torch.manual_seed(0)
        model = MultiViewModel([x.shape[1] for x in xs], full.num_classes, "concat", hidden=16, feature_dim=8)
        for encoder in model.encoders:  # no BatchNorm: a rank's rows normalised alone would differ from one process
            encoder[1] = torch.nn.Identity()
        method = methods.create(name, list(model.encoders), model.fusion, seed=0, **OPTIONS.get(name, {}))
        groups = [{"params": list(model.parameters())}] + method.param_groups(LR)
        opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        trainer = BalancedTrainer(method=method, args=args, train_dataset=TensorDataset(*xs, y),
                                  data_collator=collate, optimizers=(opt, sched))
        trainer.train()
        torch.save(
            {
                "world_size": args.world_size,
                "steps": trainer.state.global_step,
                "model": {n: p.detach().clone() for n, p in model.named_parameters()},
                "method": method.method_state(),
                "coeffs": torch.stack(trainer.balancing.coefficients).cpu(),
            },
            os.path.join(out, f"{name}-rank{args.process_index}.pt"),
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
