"""Fully sharded training (FSDP2) with any agm_fast method, with a sharded checkpoint that resumes exactly.

Launch (gloo on CPU by default, NCCL with one GPU per rank when CUDA is available):

    torchrun --nproc_per_node=2 examples/fsdp_train.py --method ogm_ge
    torchrun --nproc_per_node=2 examples/fsdp_train.py --method agm --epochs 4 --checkpoint /tmp/agm-fsdp
    torchrun --nproc_per_node=2 examples/fsdp_train.py --method agm --epochs 6 --checkpoint /tmp/agm-fsdp --resume

The recipe (docs/training-at-scale.md, "FSDP"):

1. ``fully_shard`` each encoder and the fusion head (not a parent module: the methods call the encoders and the head
   themselves, so a parent's forward, where FSDP would gather the parent's own parameters, never runs);
2. build the method after sharding (it selects the sharded parameters), with the default process group;
3. call ``agm_fast.methods.training_step`` as on one process: between ``backward()`` (FSDP has reduce-scattered the
   gradients) and ``optimizer.step()`` the method modulates the local gradient shards;
4. save and load the model, the optimizer and ``method.state_dict()`` together with ``torch.distributed.checkpoint``;
5. run the epoch passes a method asks for (PMR's prototypes, Re-learning's diagnosis) on this rank's shards of the
   training and validation data, at every epoch's start and end (``agm_fast.methods.run_epoch_passes``).

Every rank's batch must have the same size (the DistributedSampler below drops the last uneven batch), as OPM's
per-sample decisions are drawn for the global batch. ``--batch-size`` is the global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from agm_fast import methods
from agm_fast.data import load_mfeat, split_and_standardize
from agm_fast.models import MultiViewModel


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=methods.available(), default="ogm_ge")
    p.add_argument("--views", nargs=2, default=("pix", "mor"), help="two mfeat views (default: a strong and a weak)")
    p.add_argument("--fusion", default="concat", choices=("concat", "sum", "mlp", "gated", "film"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size, divisible by the world size")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="folder of the sharded checkpoint, written after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl with CUDA, else gloo")
    args = p.parse_args(argv)
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint")
    return args


class Holder(nn.Module):
    """Everything the optimizer steps, under one module for torch.distributed.checkpoint's state-dict helpers."""

    def __init__(self, model: nn.Module, method: methods.Method):
        super().__init__()
        self.model = model
        self.method_modules = nn.ModuleList(
            m for m in method.modules() if not any(p is q for p in m.parameters() for q in model.parameters())
        )


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("error: launch with torchrun, e.g. `torchrun --nproc_per_node=2 examples/fsdp_train.py`")
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        sys.exit("error: --backend nccl needs CUDA")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # Checked before any process group exists, so that every rank stops with one line and nothing is written.
    latest = latest_checkpoint(args.checkpoint) if args.checkpoint else None
    problem = None
    if args.resume and latest is None:
        problem = f"error: --resume: no complete checkpoint (epoch-N with .metadata) in {args.checkpoint}"
    elif not args.resume and latest is not None:
        problem = f"error: {args.checkpoint} holds checkpoints (newest {latest}); pass --resume or use another folder"
    if problem:
        sys.exit(problem if os.environ.get("RANK") == "0" else 1)  # rank 0 says why
    dist.init_process_group(backend)
    try:
        train(args, device, latest)
    finally:
        dist.destroy_process_group()


def latest_checkpoint(folder: str):
    """The newest complete ``epoch-N`` checkpoint in ``folder`` (one with DCP's .metadata), or None."""
    if not os.path.isdir(folder):
        return None
    done = [
        int(name.split("-", 1)[1])
        for name in os.listdir(folder)
        if name.startswith("epoch-") and name.split("-", 1)[1].isdigit()
        and os.path.exists(os.path.join(folder, name, ".metadata"))
    ]
    return os.path.join(folder, f"epoch-{max(done)}") if done else None


def average_buffers(model: nn.Module, world: int) -> None:
    """Average the BatchNorm running statistics over the ranks. FSDP shards parameters, not buffers: each rank's
    running statistics follow its own batches. Averaged at every epoch end, they are the same on every rank, so the
    evaluation and the checkpoint (which stores one copy of an unsharded tensor) do not depend on the rank."""
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= world


def train(args: argparse.Namespace, device: torch.device, latest) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the world size {world}")
    mesh = init_device_mesh(device.type, (world,))
    data = load_mfeat(list(args.views))
    train_set, val, _ = split_and_standardize(data, args.seed)

    torch.manual_seed(args.seed)  # the same initial weights on every rank before sharding
    model = MultiViewModel([x.shape[1] for x in data.xs], data.num_classes, args.fusion).to(device)
    for encoder in model.encoders:
        fully_shard(encoder, mesh=mesh)
    fully_shard(model.fusion, mesh=mesh)
    method = methods.create(args.method, list(model.encoders), model.fusion, seed=args.seed).to(device)
    holder = Holder(model, method)
    extra = method.param_groups(args.lr)
    optimizer = torch.optim.SGD(
        [{"params": list(model.parameters())}] + extra, lr=args.lr, momentum=0.9, weight_decay=1e-4
    )

    start_epoch = 0
    if args.resume:
        model_sd, optim_sd = get_state_dict(holder, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "method": method.state_dict(), "epoch": 0}
        # A fresh optimizer's state dict has momentum for every parameter; a saved one lacks the parameters that had no
        # gradient yet (MLA's and ReconBoost's unused fusion head, ReconBoost's later modalities): those stay zero,
        # which SGD steps as it steps a missing buffer.
        dcp.load(state, checkpoint_id=latest, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(holder, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        method.load_state_dict(state["method"])
        start_epoch = int(state["epoch"])
        if rank == 0:
            print(f"resumed from {latest} at epoch {start_epoch}", flush=True)

    dataset = TensorDataset(*train_set.xs, train_set.y)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    if rank == 0:
        print(f"world {world} ({dist.get_backend()}, {device}), method {args.method}, {len(loader)} steps per epoch",
              flush=True)
    val_set = TensorDataset(*val.xs, val.y)
    val_loader = DataLoader(val_set, batch_size=args.batch_size // world,
                            sampler=DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False))
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        methods.run_epoch_passes(method, epoch, "start", loader, val_loader, device=device)
        model.train()
        loss_sum = torch.zeros((), device=device)
        for *xs, y in loader:
            res = methods.training_step(method, [x.to(device) for x in xs], y.to(device), epoch, optimizer)
            loss_sum += res.loss
        average_buffers(model, world)
        acc, per_view = evaluate(model, method, val.xs, val.y, device)
        if method.needs_epoch_metrics:
            method.end_epoch(epoch, {"modality_accuracy": per_view, "modality_loss": [1.0 - a for a in per_view]})
        methods.run_epoch_passes(method, epoch, "end", loader, val_loader, device=device)
        if args.checkpoint:
            # A new folder per epoch: an interrupted save never damages the checkpoint before it.
            model_sd, optim_sd = get_state_dict(holder, optimizer)
            state = {"model": model_sd, "optim": optim_sd, "method": method.state_dict(), "epoch": epoch + 1}
            dcp.save(state, checkpoint_id=os.path.join(args.checkpoint, f"epoch-{epoch + 1}"))
        dist.all_reduce(loss_sum)
        if rank == 0:
            coeffs = " ".join(f"{c:.3f}" for c in res.coeffs.tolist())
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum.item() / world / len(loader):.4f} val acc "
                  f"{acc:.4f} per view {[round(a, 3) for a in per_view]} coeffs {coeffs}", flush=True)


@torch.no_grad()
def evaluate(model: MultiViewModel, method: methods.Method, xs, y, device):
    """Validation accuracy of the method's prediction (the fusion head, or the method's own rule: MLA, ReconBoost) and
    of each view alone through the fusion head (the others zeroed), the same on every rank: every rank runs the whole
    (small) validation set, as FSDP needs every rank in each forward."""
    model.eval()
    for module in method.modules():
        module.eval()
    xs, y = [x.to(device) for x in xs], y.to(device)
    feats = [enc(x) for enc, x in zip(model.encoders, xs)]
    acc = (method.predict(xs).argmax(-1) == y).double().mean().item()
    per_view = []
    for m in range(len(feats)):
        muted = [h if j == m else torch.zeros_like(h) for j, h in enumerate(feats)]
        per_view.append((model.fusion(*muted).argmax(-1) == y).double().mean().item())
    model.train()
    for module in method.modules():
        module.train()
    return acc, per_view


if __name__ == "__main__":
    main(sys.argv[1:])
