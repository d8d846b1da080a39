"""Another library's training step on agm_fast's functional ops: the caller owns the model, its forward pass, the
balancing state and the checkpoint; agm_fast only computes (docs/backend.md).

Run on one process, or under DDP (gloo on CPU, NCCL with one GPU per rank when CUDA is available):

    python examples/backend_step.py --method agm
    torchrun --nproc_per_node=2 examples/backend_step.py --method ogm_ge --checkpoint /tmp/ck
    torchrun --nproc_per_node=2 examples/backend_step.py --method ogm_ge --resume /tmp/ck/epoch-2.pt
    torchrun --nproc_per_node=2 examples/backend_step.py --method agm --compare

- AGM: the model's forward evaluates every masked-modality subset itself (inputs of the absent modalities set to zero,
  in eval mode; the full pass last), ``shapley_scores`` turns the subset logits into scores, running means and
  coefficients of the global batch, and ``shapley_combine`` gives the loss logits whose gradient is modulated.
- OGM-GE: after ``backward()`` (DDP's all-reduce is done), ``ogm_scores`` gives the global coefficients from the
  head's per-modality logits and ``ogm_ge_`` scales the encoders' gradients and adds noise keyed on (seed, offset),
  the same on every rank.

The state (AGM: running means, step count, last coefficients; OGM-GE: seed and noise offset) lives in the caller's
checkpoint beside the model and the optimizer; a resumed run prints the same last line as a straight one.
``--compare`` then trains the same model through ``agm_fast.methods`` (lines starting with ``library``): the two
agree to float32 rounding (tests/scale/test_backend_example.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import agm_fast
from agm_fast import functional as fn
from agm_fast.distributed import broadcast_seed


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=("agm", "ogm_ge"), default="agm")
    p.add_argument("--modalities", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=24, help="global batch size, divisible by the world size")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="folder: epoch-N.pt is written after every epoch")
    p.add_argument("--resume", default=None, help="a checkpoint file to continue from")
    p.add_argument("--compare", action="store_true", help="then train through agm_fast.methods, to compare")
    return p.parse_args(argv)


ALPHA = {"agm": 1.5, "ogm_ge": 0.8}
CAP = 10.0
NUM_CLASSES = 4


class Head(nn.Module):
    """A linear head on the concatenated features, with the per-modality logits OGM scores (its own rule)."""

    def __init__(self, dims: Sequence[int], num_classes: int):
        super().__init__()
        self.dims = list(dims)
        self.fc = nn.Linear(sum(dims), num_classes)

    def forward(self, *features: Tensor) -> Tensor:
        return self.fc(torch.cat(features, dim=1))

    def per_modality_logits(self, *features: Tensor) -> Tensor:
        """``[M, B, C]``: ``h_m W[:, slice_m]^T + b / M``."""
        weights = self.fc.weight.split(self.dims, dim=1)
        return torch.stack([h @ w.t() for h, w in zip(features, weights)]) + self.fc.bias / len(features)


class Net(nn.Module):
    """The caller's model: one MLP encoder per modality and a head. ``forward(*xs)`` returns the logits and the
    features; ``forward(*xs, masks=masks)`` the subset logits ``[S, B, C]`` AGM needs, one row per mask."""

    def __init__(self, dims: Sequence[int], hidden: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for d in dims)
        self.head = Head([hidden] * len(dims), num_classes)

    def logits(self, xs: Sequence[Tensor]):
        features = [enc(x) for enc, x in zip(self.encoders, xs)]
        return self.head(*features), features

    def forward(self, *xs: Tensor, masks: Sequence[int] = ()):
        if not masks:
            return self.logits(xs)
        full, _ = self.logits(xs)
        rows = []
        # The masked passes run in eval mode with the absent modalities' inputs set to zero (AGM's reference); each
        # submodule gets its own mode back after.
        modes = [(mod, mod.training) for mod in self.modules()]
        self.train(False)
        for mask in masks[:-1]:
            rows.append(self.logits([x if (mask >> m) & 1 else torch.zeros_like(x) for m, x in enumerate(xs)])[0])
        for mod, mode in modes:
            mod.training = mode
        return torch.stack(rows + [full])


def make_data(M: int, seed: int, n: int = 192):
    """M Gaussian views of NUM_CLASSES classes, view 0 the clearest; the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    xs = []
    for m in range(M):
        centres = torch.randn(NUM_CLASSES, 8 + 4 * m, generator=gen) * (1.0 / (m + 1))
        xs.append(centres[y] + torch.randn(n, centres.shape[1], generator=gen))
    return xs, y


def batches(xs: List[Tensor], y: Tensor, batch: int, epoch: int, seed: int, rank: int, world: int):
    """This rank's share of each global batch: rows ``[r b, (r + 1) b)`` of a permutation drawn from (seed, epoch)."""
    order = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    local = batch // world
    for start in range(0, y.shape[0] - batch + 1, batch):
        rows = order[start + rank * local : start + (rank + 1) * local]
        yield [x[rows] for x in xs], y[rows]


class BackendAGM:
    """AGM as a caller runs it: its own subset passes, its own state, the functional ops."""

    def __init__(self, model: nn.Module, M: int, group, device: torch.device):
        self.model, self.group = model, group
        self.masks, W = fn.shapley_subsets(M)                        # bitmasks, the full set last; W [M, S]
        self.W = W.to(device)
        zeros = torch.zeros(M, device=device)
        self.state: Dict[str, Tensor] = {"running": zeros, "count": zeros.new_zeros(()), "last_coeffs": zeros + 1}

    def step(self, xs, y, epoch, optimizer) -> Tensor:
        Fs = self.model(*xs, masks=self.masks)                       # [S, B, C], through DDP's forward
        s = self.state
        psi, scores, running, count, coeffs = fn.shapley_scores(
            Fs, self.W, y, s["running"], s["count"], s["last_coeffs"], ALPHA["agm"], CAP,
            in_window=True, process_group=self.group,
        )
        loss = F.cross_entropy(fn.shapley_combine(Fs, self.W, coeffs, -1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # The caller keeps the state: a step with non-finite scores (NaN coefficients) keeps the last coefficients.
        s["running"], s["count"] = running, count
        s["last_coeffs"] = torch.where(torch.isfinite(coeffs).all(), coeffs, s["last_coeffs"])
        self.coeffs = coeffs
        return loss.detach()


class BackendOGMGE:
    """OGM-GE as a caller runs it: scores from its head, its own seed and noise offset, the functional ops."""

    def __init__(self, net: Net, model: nn.Module, seed: int, group):
        self.net, self.model, self.group = net, model, group
        # Every rank must draw the same noise: rank 0's seed, once.
        self.state = {"seed": broadcast_seed(seed, group), "offset": 0}
        self.params = [(m, p) for m, enc in enumerate(net.encoders) for p in enc.parameters()]

    def step(self, xs, y, epoch, optimizer) -> Tensor:
        logits, features = self.model(*xs)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()                                              # DDP's all-reduce is done when this returns
        with torch.no_grad():
            per_modality = self.net.head.per_modality_logits(*(h.detach() for h in features))
        _, coeffs = fn.ogm_scores(per_modality, y, ALPHA["ogm_ge"], process_group=self.group)
        fn.ogm_ge_([p.grad for _, p in self.params], [m for m, _ in self.params], coeffs,
                   seed=self.state["seed"], offset=self.state["offset"])
        self.state["offset"] += 1
        optimizer.step()
        self.coeffs = coeffs
        return loss.detach()


class LibraryStep(nn.Module):
    """The library's method behind DDP's forward, so that DDP reduces the gradients of the backward that follows."""

    def __init__(self, net: Net, method):
        super().__init__()
        self.net, self.method = net, method

    def forward(self, xs, y, epoch):
        return self.method.forward(xs, y, epoch)


class Library:
    """The same training through ``agm_fast.methods`` (AGM with ``strategy="sequential"``, as the caller's passes)."""

    def __init__(self, net: Net, method_name: str, seed: int, group, ddp):
        extra = {"strategy": "sequential", "cap": CAP} if method_name == "agm" else {}
        self.method = agm_fast.methods.create(method_name, list(net.encoders), net.head, alpha=ALPHA[method_name],
                                              seed=seed, process_group=group, **extra)
        self.step_module = ddp(LibraryStep(net, self.method)) if ddp else None

    def step(self, xs, y, epoch, optimizer) -> Tensor:
        if self.step_module is None:
            res = agm_fast.methods.training_step(self.method, xs, y, epoch, optimizer)
            self.coeffs = res.coeffs
            return res.loss
        out = self.step_module(xs, y, epoch)
        loss = self.method.loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.coeffs = self.method.before_optimizer_step(out, y)
        optimizer.step()
        return loss.detach()


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    distributed = "RANK" in os.environ
    if distributed:
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        train(args, distributed, library=False)
        if args.compare:
            train(args, distributed, library=True)
    finally:
        if distributed:
            dist.destroy_process_group()


def train(args: argparse.Namespace, distributed: bool, library: bool) -> None:
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    group = dist.group.WORLD if distributed else None
    xs, y = make_data(args.modalities, args.seed)
    torch.manual_seed(args.seed)
    net = Net([x.shape[1] for x in xs]).to(device)

    def ddp(module: nn.Module) -> nn.Module:
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    model = ddp(net) if distributed else net
    if library:
        runner = Library(net, args.method, args.seed, group, ddp if distributed else None)
    elif args.method == "agm":
        runner = BackendAGM(model, args.modalities, group, device)
    else:
        runner = BackendOGMGE(net, model, args.seed, group)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)

    first, checkpoint = 0, None if library else args.checkpoint
    if args.resume and not library:
        ck = torch.load(args.resume, map_location=device, weights_only=True)
        net.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        runner.state = ck["balance"]
        first = ck["epoch"]
        if rank == 0:
            print(f"resumed from {args.resume} at epoch {first}", flush=True)
    for epoch in range(first, args.epochs):
        total, steps = torch.zeros((), device=device), 0
        for bx, by in batches(xs, y, args.batch_size, epoch, args.seed, rank, world):
            total += runner.step([x.to(device) for x in bx], by.to(device), epoch, optimizer)
            steps += 1
        if distributed:
            dist.all_reduce(total)
        if checkpoint:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "balance": runner.state,
                     "epoch": epoch + 1}
            if rank == 0:
                Path(checkpoint).mkdir(parents=True, exist_ok=True)
                torch.save(state, Path(checkpoint) / f"epoch-{epoch + 1}.pt")
            if distributed:
                dist.barrier()
        norm = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).norm()
        if rank == 0:
            coeffs = " ".join(f"{c:.7g}" for c in runner.coeffs.tolist())
            print(f"{'library ' if library else ''}epoch {epoch + 1}/{args.epochs}: loss "
                  f"{float(total) / (steps * world):.7g} coeffs {coeffs} |params| {float(norm):.7g}", flush=True)
    if distributed:
        flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(flat, ref):
            raise RuntimeError(f"rank {rank}: the replicas diverged")


if __name__ == "__main__":
    main(sys.argv[1:])
