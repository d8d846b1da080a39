"""``agm-fast train``: the training run, a thin client of the public method interface.

The loop is :func:`agm_fast.methods.training_step` over the batches of each epoch, then
:meth:`~agm_fast.methods.Method.end_epoch` with the validation metrics; checkpoints hold the model, the optimizer,
the method's state and every random stream, so ``--resume`` ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Iterator, List, Optional

import numpy as np
import torch

from .. import data as data_mod
from .. import methods
from ..methods.epoch_data import run_epoch_passes
from ..models import MultiViewModel
from ..probe import probe_encoders
from .args import CLIError, config_of, flag_message, method_kwargs, one_line, resolve, restorable
from .data import RUN_FILES, batches, load_data, prepare_out
from .report import competition_strength_of, evaluate, format_line, plot, write_csv

__all__ = ["Diverged", "Interrupted", "train", "device_of"]

CHECKPOINT_FORMAT = "agm_fast.cli.checkpoint/2"


class Diverged(CLIError):
    """The loss went non-finite; the metrics and the last finite checkpoint are kept (``main`` exits with 3)."""


class Interrupted(CLIError):
    """SIGINT or SIGTERM stopped the run; ``main`` prints the message and exits with 130 or 143."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Terminate(BaseException):
    """Raised by the SIGTERM handler, so that a terminated run unwinds like an interrupted one."""


@contextlib.contextmanager
def _writing(what: str, path: str) -> Iterator[None]:
    """Turn a failed write (disk full, folder gone or read-only) into one line that says what is kept."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        if "enforce fail" in reason or "No space" in reason or "file write failed" in reason:
            reason = f"the disk may be full ({reason[:120]})"
        raise CLIError(f"could not write {what} to {path!r}: {reason}; what was written before is kept") from None


def device_of(name: Optional[str]) -> torch.device:
    """The device ``--device`` names (default: CUDA when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _save_checkpoint(path: str, payload: dict) -> None:
    # Written next to the old one and renamed over it: a failed or killed write leaves the old checkpoint whole.
    tmp = path + ".tmp"
    try:
        with _writing("the checkpoint", path):
            torch.save(payload, tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


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
        if key == "data_signature" and ckpt["config"].get(key) != config.get(key):
            raise CLIError(
                "--resume: the data differ from those the checkpoint was trained on (views, shapes or values: "
                "their sha256 differs); resume with the same --data and --views, or start a new run"
            )
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


def _summary_base(args, names, source, splits, config, history) -> dict:
    train_s, val_s, test_s = splits
    return {
        "method": args.method,
        "fusion": args.fusion,
        "views": list(names),
        "data": source,
        "epochs": args.epochs,
        "epochs_completed": len(history),
        "rows": {"train": len(train_s.y), "val": len(val_s.y), "test": len(test_s.y)},
        "config": {k: v for k, v in config.items() if k != "data_signature"},
    }


def _write_summary(out: str, summary: dict) -> None:
    path = os.path.join(out, "summary.json")
    with _writing("summary.json", path):
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=2)
        os.replace(tmp, path)


def train(args: argparse.Namespace) -> dict:
    """Run ``agm-fast train`` with parsed arguments; returns the summary it writes to ``summary.json``.

    Raises:
        CLIError: a bad argument, unusable data, or a failed write (one line, what was written before is kept).
        Diverged: the loss went non-finite (the metrics and the last finite checkpoint are kept).
        Interrupted: SIGINT or SIGTERM (the checkpoint of the last finished epoch is kept).
    """
    if args.resume and getattr(args, "overwrite", False):
        raise CLIError("--resume continues the run in --out and --overwrite replaces it: choose one")
    lock = None
    ckpt = None
    try:
        if args.resume:
            lock = prepare_out(args.out, resume=True, overwrite=False)
            ckpt = _read_checkpoint(os.path.join(args.out, "checkpoint.pt"))
            _restore_args(args, ckpt)
        resolve(args)
        device = device_of(args.device)
        torch.set_num_threads(args.threads)
        data = load_data(args)
        if lock is None:
            lock = prepare_out(args.out, resume=False, overwrite=getattr(args, "overwrite", False))
            if getattr(args, "overwrite", False):
                for name in RUN_FILES + ("curves.png",):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(args.out, name))
        progress = {"epoch": 0, "finished": 0}
        try:
            return _train(args, device, data, ckpt, progress)
        except (KeyboardInterrupt, Terminate) as exc:
            # Wherever the signal lands (a step, an evaluation, a write), the run ends with what is on disk.
            name, status = ("SIGTERM", 143) if isinstance(exc, Terminate) else ("SIGINT", 130)
            if progress["finished"]:
                kept = f"the checkpoint of epoch {progress['finished']} is in {args.out!r}: continue with --resume"
            else:
                kept = "no epoch had finished, so there is no checkpoint: start again without --resume"
            raise Interrupted(f"interrupted by {name} during epoch {progress['epoch'] + 1}; {kept}", status) from None
    finally:
        if lock is not None:
            lock.close()


def _train(
    args: argparse.Namespace,
    device: torch.device,
    data: data_mod.MultiViewData,
    ckpt: Optional[dict],
    progress: dict,
):
    from tqdm import tqdm

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
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
        "source": "mfeat" if args.data is None else ("synthetic" if args.data == "synthetic" else "npz"),
        "views": list(names),
        "dims": dims,
        "rows": int(len(data.y)),
        "classes": int(data.num_classes),
        "sha256": data_mod.content_hash(data),
    }
    run_args = {key: getattr(args, key) for key in restorable(args) if hasattr(args, key)}
    run_args["views"] = ",".join(names)
    run_args["data"] = args.data if args.data in (None, "synthetic") else os.path.abspath(args.data)

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
        progress.update(epoch=len(history), finished=len(history))
        print(f"resuming from {ckpt_path} at epoch {ckpt['epoch']}/{args.epochs}")

    xs_train = [x.to(device) for x in train_s.xs]
    y_train = train_s.y.to(device)
    xs_val = [x.to(device) for x in val_s.xs]
    y_val = val_s.y.to(device)
    C = int(data.num_classes)
    source = "UCI Multiple Features" if args.data is None else os.path.basename(args.data)
    print(
        f"{args.method} | fusion {args.fusion} | views {','.join(names)} ({source}: {len(train_s.y)} train, "
        f"{len(val_s.y)} val, {len(test_s.y)} test, {data.num_classes} classes) | device {device.type}"
    )
    starts = method.activity()
    if starts is not None:
        print(starts)
    metrics_path = os.path.join(args.out, "metrics.csv")
    uses_passes = type(method).epoch_passes is not methods.Method.epoch_passes
    # A method with its own prediction rule (MLA) is evaluated through it.
    predict = method.predict if method.owns_step else None
    own = method.modules() if method.owns_step else []
    interactive = sys.stderr.isatty()
    for epoch in range(len(history), args.epochs):
        progress["epoch"] = epoch
        model.train()
        steps = batches(len(y_train), args.batch_size, gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen_rows = torch.zeros((), device=device)
        coeff_steps = []
        bar = tqdm(total=len(steps), desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, leave=False,
                   disable=not interactive, unit="step")
        passes = _epoch_passes(method, epoch, "start", args, (xs_train, y_train), (xs_val, y_val))
        t0 = time.perf_counter()
        for step, idx in enumerate(steps):
            idx = idx.to(device)
            res = methods.training_step(method, [x[idx] for x in xs_train], y_train[idx], epoch, opt,
                                        progress=step / len(steps))
            # One flag per step: a non-finite loss stops the run before a non-finite model is saved.
            if not bool(torch.isfinite(res.loss)):
                _diverged(args, names, source, splits, config, history, epoch, f"step {step + 1}", res.loss)
            loss_sum += res.loss * res.rows
            correct += res.correct
            seen_rows += res.rows
            coeff_steps.append(res.coeffs)
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        bar.close()
        val = evaluate(model, xs_val, y_val, predict=predict, modules=own)
        if not math.isfinite(val["loss"]):
            _diverged(args, names, source, splits, config, history, epoch, "validation", val["loss"])
        method.end_epoch(epoch, {"modality_accuracy": val["mono_acc"], "modality_loss": val["mono_loss"]})
        passes += _epoch_passes(method, epoch, "end", args, (xs_train, y_train), (xs_val, y_val))
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
        if args.probe:
            probe = probe_encoders(list(model.encoders), xs_train, y_train, xs_val, y_val, num_classes=C)
            row.update({f"probe_acc_{n}": a for n, a in zip(names, probe.tolist())})
        row.update({"step_ms": 1e3 * elapsed / len(steps), "epoch_s": elapsed})
        if uses_passes:
            row.update({"pass_s": passes, "pass_frac": passes / (elapsed + passes)})
        history.append(row)
        print(format_line(row, names, args.epochs), flush=True)
        with _writing("metrics.csv", metrics_path):
            write_csv(metrics_path, names, history)
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
        progress["finished"] = len(history)

    with _writing("metrics.csv", metrics_path):
        write_csv(metrics_path, names, history)
    test = evaluate(model, [x.to(device) for x in test_s.xs], test_s.y.to(device), predict=predict,
                    modules=own)
    strengths, unimodal_acc, strength_note = competition_strength_of(model, splits, data.num_classes, args, device)
    step_ms = [row["step_ms"] for row in history]
    summary = _summary_base(args, names, source, splits, config, history)
    summary.update({
        "status": "completed",
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
        "probe_test_acc_per_modality": None if not args.probe else dict(zip(names, probe_encoders(
            list(model.encoders), xs_train, y_train, [x.to(device) for x in test_s.xs], test_s.y.to(device),
            num_classes=C).tolist())),
        "time_per_step_ms": float(np.mean(step_ms)),
        "time_per_step_ms_median": float(np.median(step_ms)),
        "device": device.type,
    })
    _write_summary(args.out, summary)
    if not args.no_plot:
        title = f"{args.method} | {args.fusion} fusion | views {', '.join(names)} | test acc {test['acc']:.3f}"
        with _writing("curves.png", args.out):
            plot(os.path.join(args.out, "curves.png"), names, history, title)
    mono = " ".join(f"{n} {a:.3f}" for n, a in zip(names, test["mono_acc"]))
    if strengths is None:
        strength = f"n/a ({strength_note})"
    else:
        strength = " ".join(f"{n} {s:.3f}" for n, s in zip(names, strengths))
    print(f"test acc {test['acc']:.3f} | mono {mono} | competition strength {strength}")
    written = "metrics.csv, summary.json, checkpoint.pt" + ("" if args.no_plot else ", curves.png")
    print(f"wrote {written} to {args.out}")
    never = method.activity(args.epochs)
    if never is not None:
        print(f"agm-fast: warning: {never}", file=sys.stderr)
    return summary


class _PassData:
    """The batches of one epoch pass over tensors on the device (``([x_0, ...], y)`` each), read as they are used."""

    def __init__(self, xs, y, order) -> None:
        self.xs, self.y, self.order = xs, y, order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for idx in self.order:
            idx = idx.to(self.y.device)
            yield [x[idx] for x in self.xs], self.y[idx]


def _epoch_passes(method, epoch: int, when: str, args, train, val) -> float:
    """The passes the method asks for at ``when`` of ``epoch``; their seconds. The training rows are shuffled by a
    generator of their own (seed, epoch), so the run's data order is the same with or without passes."""

    def loader(split):
        xs, y = train if split == "train" else val
        if split == "val":
            return _PassData(xs, y, list(torch.split(torch.arange(len(y)), args.batch_size)))
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + 2 * epoch + (when == "end"))
        return _PassData(xs, y, batches(len(y), args.batch_size, gen))

    report = run_epoch_passes(method, epoch, when, lambda: loader("train"), lambda: loader("val"))
    return 0.0 if report is None else report.seconds


def _diverged(args, names, source, splits, config, history, epoch, where, value) -> None:
    """Write a summary that says the run diverged, keep everything else as it is, and stop with one line."""
    loss = float(value)
    summary = _summary_base(args, names, source, splits, config, history)
    summary.update({
        "status": "diverged",
        "diverged": {"epoch": epoch + 1, "at": where, "loss": repr(loss)},
        "val_acc": history[-1]["val_acc"] if history else None,
    })
    _write_summary(args.out, summary)
    if history:
        kept = f"metrics.csv and the checkpoint of epoch {len(history)} are kept"
    else:
        kept = "no epoch had finished, so there is no checkpoint"
    raise Diverged(
        f"training diverged at epoch {epoch + 1}, {where}: the loss is {loss}; {kept} in {args.out!r} and "
        f"summary.json says so (a lower --lr, or the method's hyper-parameters, may help)"
    )
