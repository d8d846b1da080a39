"""Data-parallel training with a balancing method: DistributedDataParallel, a DistributedSampler, and agm_fast's
classes given the process group so that every rank computes the coefficients of the global batch.

Launch (gloo on CPU by default, NCCL with one GPU per rank when CUDA is available):

    torchrun --nproc_per_node=2 examples/ddp_train.py --method agm
    torchrun --nproc_per_node=2 examples/ddp_train.py --method ogm_ge
    torchrun --nproc_per_node=2 examples/ddp_train.py --method joint --data synthetic

The model is one MLP encoder per view and a concatenation head, trained on two views of the embedded UCI Multiple
Features digits (``--data mfeat``, a strong and a weak view) or on synthetic two-modality data. ``--batch-size`` is the
global batch: each of the W ranks gets ``batch_size / W`` samples per step. At the end the script checks that every
replica holds bitwise the same parameters, which OGM-GE's noise would break without a shared seed.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import time
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import agm_fast
from agm_fast.data import load_mfeat, split_and_standardize
from agm_fast.distributed import global_sums


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=("agm", "ogm_ge", "joint"), default="agm")
    p.add_argument("--data", choices=("mfeat", "synthetic"), default="mfeat")
    p.add_argument("--views", nargs=2, default=("pix", "mor"), help="two mfeat views (default: a strong and a weak)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size, divisible by the world size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=None, help="modulation strength (default: 1.5 AGM, 0.8 OGM-GE)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (fp16: GradScaler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl with CUDA, else gloo")
    return p.parse_args(argv)


def require_process_group(name: str):
    """The class ``agm_fast.<name>``, provided that it takes ``process_group=``; otherwise exit with why."""
    cls = getattr(agm_fast, name, None)
    try:
        accepts = cls is not None and "process_group" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts:
        message = (
            f"error: agm_fast.{name} in this installation (agm_fast {agm_fast.__version__}, {agm_fast.__file__}) "
            f"{'does not exist' if cls is None else 'does not accept process_group='}. Without it each rank would "
            "compute its own coefficients from its shard of the batch and DDP would average differently modulated "
            "gradients. Install an agm_fast whose classes take process_group=, or run with --method joint."
        )
        # Every rank fails the same way; rank 0 says why.
        sys.exit(message if os.environ.get("RANK", "0") == "0" else 1)
    return cls


def load_data(args: argparse.Namespace) -> Tuple[List[Tensor], Tensor, List[Tensor], Tensor, int]:
    """``(train_xs, train_y, test_xs, test_y, num_classes)``, the same on every rank."""
    if args.data == "mfeat":
        data = load_mfeat(views=list(args.views))
        train, _, test = split_and_standardize(data, seed=args.seed)
        return train.xs, train.y, test.xs, test.y, data.num_classes
    # Two Gaussian views of 10 classes: view 0 separates them well, view 1 barely.
    gen = torch.Generator().manual_seed(args.seed)
    num_classes, n = 10, 2400
    y = torch.randint(0, num_classes, (n,), generator=gen)
    centres = [torch.randn(num_classes, d, generator=gen) * s for d, s in ((32, 1.0), (16, 0.25))]
    xs = [c[y] + torch.randn(n, c.shape[1], generator=gen) for c in centres]
    cut = n * 4 // 5
    return [x[:cut] for x in xs], y[:cut], [x[cut:] for x in xs], y[cut:], num_classes


class Net(nn.Module):
    """One MLP encoder per view, a concatenation head; forward returns the fused logits and the features."""

    def __init__(self, dims: Sequence[int], hidden: int, num_classes: int):
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()) for d in dims
        )
        self.fusion = agm_fast.ConcatFusion([hidden] * len(dims), num_classes)

    def forward(self, *xs: Tensor) -> Tuple[Tensor, List[Tensor]]:
        features = [enc(x) for enc, x in zip(self.encoders, xs)]
        return self.fusion(*features), features


class AGMStep(nn.Module):
    """What DDP wraps for AGM: the call of the modulator goes through DDP's forward, so DDP prepares its
    gradient reduction for the backward that follows."""

    def __init__(self, net: Net, agm):
        super().__init__()
        self.net = net
        self.agm = agm

    def forward(self, *xs: Tensor, target: Tensor):
        return self.agm(*xs, target=target)


def replicas_identical(module: nn.Module) -> bool:
    """Whether every rank holds bitwise the same parameters as rank 0."""
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([float(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def evaluate(net: Net, xs: List[Tensor], y: Tensor, device: torch.device) -> float:
    """Test accuracy over the whole test set, each rank scoring its shard (one all-reduce of two counts)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = torch.arange(rank, y.shape[0], world)
    net.eval()
    with torch.no_grad():
        logits, _ = net(*(x[rows].to(device) for x in xs))
        correct = (logits.argmax(1) == y[rows].to(device)).sum()
    net.train()
    counts = global_sums(torch.stack([correct, torch.tensor(rows.numel(), device=device)]).double())
    return float(counts[0] / counts[1])


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("error: launch with torchrun, e.g. `torchrun --nproc_per_node=2 examples/ddp_train.py`")
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        sys.exit("error: --backend nccl needs CUDA")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if args.amp == "fp16" and device.type != "cuda":
        sys.exit("error: --amp fp16 needs CUDA; use --amp bf16 on CPU")
    modulator_cls = {"agm": "AGM", "ogm_ge": "OGMGE", "joint": None}[args.method]
    cls = require_process_group(modulator_cls) if modulator_cls else None

    dist.init_process_group(backend)
    try:
        train(args, cls, device)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, cls, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    group = dist.group.WORLD
    train_xs, train_y, test_xs, test_y, num_classes = load_data(args)
    dims = [x.shape[1] for x in train_xs]

    # The same initial weights everywhere (DDP would broadcast rank 0's anyway).
    torch.manual_seed(args.seed)
    net = Net(dims, args.hidden, num_classes).to(device)
    if args.method == "agm":
        agm = cls(
            encoders=list(net.encoders),
            fusion=net.fusion,
            alpha=1.5 if args.alpha is None else args.alpha,
            process_group=group,
        )
        model = DistributedDataParallel(AGMStep(net, agm), device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    ogm = None
    if args.method == "ogm_ge":
        # Given the group, the class broadcasts rank 0's seed once, here, so every rank draws the same noise.
        ogm = cls(
            encoders=list(net.encoders),
            alpha=0.8 if args.alpha is None else args.alpha,
            mode="OGM_GE",
            seed=args.seed,
            process_group=group,
        )
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    dataset = TensorDataset(*train_xs, train_y)
    # Each rank sees its own 1/W of every epoch; drop_last keeps the shards equal.
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    if rank == 0:
        print(
            f"world {world} ({dist.get_backend()}, {device}), method {args.method}, data {args.data} {dims}, "
            f"global batch {args.batch_size}, {len(loader)} steps per epoch, amp {args.amp}",
            flush=True,
        )
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        start, coeffs = time.perf_counter(), None
        for *xs, y in loader:
            xs, y = [x.to(device, non_blocking=True) for x in xs], y.to(device, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with autocast:
                if args.method == "agm":
                    res = model(*xs, target=y)
                    logits, coeffs = res.logits, res.coeffs
                else:
                    logits, features = model(*xs)
                    per_modality = net.fusion.per_modality_logits(*(h.detach() for h in features))
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if ogm is not None:
                # After backward() returned, DDP's all-reduce is done: the gradients are the global average. The
                # noise must be added to the unscaled gradient, so unscale first.
                scaler.unscale_(optimizer)
                coeffs = ogm.step(y, *per_modality.float(), epoch=epoch)
            scaler.step(optimizer)
            scaler.update()
        elapsed = time.perf_counter() - start
        acc = evaluate(net, test_xs, test_y, device)
        if rank == 0:
            shown = "" if not isinstance(coeffs, Tensor) else " coeffs " + " ".join(f"{c:.3f}" for c in coeffs.tolist())
            print(
                f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f} test acc {acc:.4f}{shown} "
                f"({1e3 * elapsed / len(loader):.1f} ms/step)",
                flush=True,
            )
    same = replicas_identical(net)
    if rank == 0:
        print(f"replicas bitwise identical: {same}", flush=True)
    if not same:
        raise RuntimeError("the replicas diverged")


if __name__ == "__main__":
    main(sys.argv[1:])
