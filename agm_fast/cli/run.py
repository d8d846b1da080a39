"""``agm-fast train``: the training run, a thin client of the public method interface.

The loop is :func:`agm_fast.methods.training_step` over the batches of each epoch, then
:meth:`~agm_fast.methods.Method.end_epoch` with the validation metrics; checkpoints hold the model, the optimizer,
the method's state and every random stream, so ``--resume`` ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from .. import data as data_mod
from .. import methods
from ..models import MultiViewModel
from .args import CLIError, config_of, flag_message, method_kwargs, one_line, resolve, restorable
from .data import batches, load_data, prepare_out
from .report import competition_strength_of, evaluate, format_line, plot, write_csv

__all__ = ["train", "device_of"]

CHECKPOINT_FORMAT = "agm_fast.cli.checkpoint/2"


def device_of(name: Optional[str]) -> torch.device:
    """The device ``--device`` names (default: CUDA when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _save_checkpoint(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CLIError(f"--resume: no checkpoint at {path!r} (train without --resume first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"--resume: checkpoint {path!r} is corrupt or unreadable ({type(exc).__name__})") from None
    required = ("format", "epoch", "args", "config", "model", "optimizer", "method", "torch_rng", "data_rng", "history")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or any(k not in ckpt for k in required):
        raise CLIError(f"--resume: {path!r} is not an agm-fast training checkpoint (corrupt or another format)")
    return ckpt


def _check_resume(ckpt: dict, config: dict, epochs: int) -> None:
    for key in dict.fromkeys(list(ckpt["config"]) + list(config)):
        if ckpt["config"].get(key) != config.get(key):
            raise CLIError(
                f"--resume: the checkpoint was trained with {key}={ckpt['config'].get(key)!r}, "
                f"this run asks for {config.get(key)!r}"
            )
    if ckpt["epoch"] > epochs:
        raise CLIError(f"--resume: the checkpoint is at epoch {ckpt['epoch']}, past --epochs {epochs}")


def _restore_args(args: argparse.Namespace, ckpt: dict) -> None:
    """Every option not given again on the command line continues as the checkpoint's run had it."""
    explicit = set(getattr(args, "_explicit", ()))
    saved = ckpt["args"]
    if "method" in explicit and args.method != saved.get("method"):
        raise CLIError(
            f"--resume: the checkpoint was trained with method={saved.get('method')!r}, this run asks for "
            f"{args.method!r}"
        )
    for key, value in saved.items():
        if key not in explicit:
            setattr(args, key, value)


def _build_method(args: argparse.Namespace, model: MultiViewModel, num_views: int) -> methods.Method:
    try:
        return methods.create(
            args.method, list(model.encoders), model.fusion, seed=args.seed, **method_kwargs(args)
        )
    except (ValueError, TypeError) as exc:
        detail = flag_message(one_line(exc), args.method)
        raise CLIError(f"--method {args.method} with --fusion {args.fusion} and {num_views} views: {detail}") from None


def train(args: argparse.Namespace) -> dict:
    """Run ``agm-fast train`` with parsed arguments; returns the summary it writes to ``summary.json``."""
    from tqdm import tqdm

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    ckpt = None
    if args.resume:
        ckpt = _read_checkpoint(ckpt_path)
        _restore_args(args, ckpt)
    resolve(args)
    device = device_of(args.device)
    torch.set_num_threads(args.threads)
    data = load_data(args)
    prepare_out(args.out)
    names = data.names
    try:
        splits = data_mod.split_and_standardize(data, args.seed)
    except ValueError as exc:
        raise CLIError(f"--data: {exc}") from None
    train_s, val_s, test_s = splits

    torch.manual_seed(args.seed)
    dims = [int(x.shape[1]) for x in data.xs]
    model = MultiViewModel(dims, data.num_classes, args.fusion, args.hidden, args.feature_dim).to(device)
    method = _build_method(args, model, len(names))
    config = config_of(args, method.hyperparameters())
    config["data_signature"] = {
        "source": "mfeat" if args.data is None else "npz",
        "views": list(names),
        "dims": dims,
        "rows": int(len(data.y)),
        "classes": int(data.num_classes),
    }
    run_args = {key: getattr(args, key) for key in restorable(args) if hasattr(args, key)}
    run_args["views"] = ",".join(names)
    run_args["data"] = None if args.data is None else os.path.abspath(args.data)

    groups = [{"params": list(model.parameters())}] + method.param_groups(args.lr)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)

    history: List[dict] = []
    if ckpt is not None:
        _check_resume(ckpt, config, args.epochs)
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            method.load_state_dict(ckpt["method"])
            torch.set_rng_state(ckpt["torch_rng"])
            gen.set_state(ckpt["data_rng"])
            if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CLIError(f"--resume: checkpoint {ckpt_path!r} does not fit this model ({one_line(exc)})") from None
        history = list(ckpt["history"])
        print(f"resuming from {ckpt_path} at epoch {ckpt['epoch']}/{args.epochs}")

    xs_train = [x.to(device) for x in train_s.xs]
    y_train = train_s.y.to(device)
    xs_val = [x.to(device) for x in val_s.xs]
    y_val = val_s.y.to(device)
    source = "UCI Multiple Features" if args.data is None else os.path.basename(args.data)
    print(
        f"{args.method} | fusion {args.fusion} | views {','.join(names)} ({source}: {len(train_s.y)} train, "
        f"{len(val_s.y)} val, {len(test_s.y)} test, {data.num_classes} classes) | device {device.type}"
    )
    interactive = sys.stderr.isatty()
    for epoch in range(len(history), args.epochs):
        model.train()
        steps = batches(len(y_train), args.batch_size, gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen_rows = torch.zeros((), device=device)
        coeff_steps = []
        bar = tqdm(total=len(steps), desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, leave=False,
                   disable=not interactive, unit="step")
        t0 = time.perf_counter()
        for idx in steps:
            idx = idx.to(device)
            res = methods.training_step(method, [x[idx] for x in xs_train], y_train[idx], epoch, opt)
            loss_sum += res.loss * res.rows
            correct += res.correct
            seen_rows += res.rows
            coeff_steps.append(res.coeffs)
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        bar.close()
        val = evaluate(model, xs_val, y_val)
        method.end_epoch(epoch, {"modality_accuracy": val["mono_acc"], "modality_loss": val["mono_loss"]})
        coeff_all = torch.stack(coeff_steps).float()
        row = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / max(float(seen_rows), 1.0),
            "train_acc": float(correct) / max(float(seen_rows), 1.0),
            "val_loss": val["loss"],
            "val_acc": val["acc"],
        }
        row.update({f"val_acc_{n}": a for n, a in zip(names, val["mono_acc"])})
        row.update({f"val_loss_{n}": v for n, v in zip(names, val["mono_loss"])})
        row.update({f"coeff_{n}": c for n, c in zip(names, coeff_all.median(dim=0).values.tolist())})
        row.update({f"coeff_mean_{n}": c for n, c in zip(names, coeff_all.mean(dim=0).tolist())})
        row.update({"step_ms": 1e3 * elapsed / len(steps), "epoch_s": elapsed})
        history.append(row)
        print(format_line(row, names, args.epochs), flush=True)
        write_csv(os.path.join(args.out, "metrics.csv"), names, history)
        _save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "args": run_args,
                "config": config,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "method": method.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "data_rng": gen.get_state(),
                "history": history,
            },
        )

    write_csv(os.path.join(args.out, "metrics.csv"), names, history)
    test = evaluate(model, [x.to(device) for x in test_s.xs], test_s.y.to(device))
    strengths, unimodal_acc, strength_note = competition_strength_of(model, splits, data.num_classes, args, device)
    step_ms = [row["step_ms"] for row in history]
    summary = {
        "method": args.method,
        "fusion": args.fusion,
        "views": list(names),
        "data": source,
        "epochs": args.epochs,
        "rows": {"train": len(train_s.y), "val": len(val_s.y), "test": len(test_s.y)},
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_acc_per_modality": dict(zip(names, test["mono_acc"])),
        "val_acc": history[-1]["val_acc"],
        "val_acc_per_modality": {n: history[-1][f"val_acc_{n}"] for n in names},
        "competition_strength": None if strengths is None else dict(zip(names, strengths)),
        "competition_concept": strength_note
        or (
            "features (before the last ReLU) of a unimodal model per view, same encoder, trained 8 epochs "
            "(batch 128) on the train split with its own seed; ridge (alpha 120) from the concatenated encoder "
            "features, fitted on the validation split and evaluated on the test split; lower = the fused features "
            "hold more of that view"
        ),
        "unimodal_test_acc": dict(zip(names, unimodal_acc)),
        "time_per_step_ms": float(np.mean(step_ms)),
        "time_per_step_ms_median": float(np.median(step_ms)),
        "device": device.type,
        "config": {k: v for k, v in config.items() if k != "data_signature"},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    if not args.no_plot:
        title = f"{args.method} | {args.fusion} fusion | views {', '.join(names)} | test acc {test['acc']:.3f}"
        plot(os.path.join(args.out, "curves.png"), names, history, title)
    mono = " ".join(f"{n} {a:.3f}" for n, a in zip(names, test["mono_acc"]))
    if strengths is None:
        strength = f"n/a ({strength_note})"
    else:
        strength = " ".join(f"{n} {s:.3f}" for n, s in zip(names, strengths))
    print(f"test acc {test['acc']:.3f} | mono {mono} | competition strength {strength}")
    written = "metrics.csv, summary.json, checkpoint.pt" + ("" if args.no_plot else ", curves.png")
    print(f"wrote {written} to {args.out}")
    return summary
