"""What ``agm-fast train`` reports: evaluation on a split, competition strength, metrics.csv, curves.png and the
one-line epoch summary."""

from __future__ import annotations

import argparse
import csv
import os
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MultiViewModel, mlp_encoder
from ..validation import modality_metrics
from .data import batches

__all__ = ["TIME_COLUMNS", "columns", "competition_strength_of", "evaluate", "format_line", "plot", "write_csv"]

TIME_COLUMNS = ("step_ms", "epoch_s")


def evaluate(model: MultiViewModel, xs: Sequence[Tensor], y: Tensor, chunk: int = 32768, predict=None,
             modules: Sequence[nn.Module] = ()) -> dict:
    """Fused and mono-modal (Shapley) accuracy and loss of ``model`` in eval mode: :func:`agm_fast.validation.
    modality_metrics` (every non-empty subset of the views with the muted views' inputs set to zero, after
    standardisation the average training sample), whatever the method; ``predict`` (a method's own prediction rule)
    replaces the model's head, and ``modules`` are put in eval mode too.

    Args:
        model: the model.
        xs: M tensors ``[N, d_m]``.
        y: ``[N]`` labels.
        chunk: at most this many rows (subsets x samples) per model call.
        predict: a method's own prediction rule, ``predict(inputs) -> [B, C]`` (``Method.predict``), called once per
            subset on the chunk's rows; None: the model.
        modules: the method's own modules that ``predict`` uses (put in eval mode too, then restored).

    Returns:
        dict with ``acc``, ``loss`` (floats) and ``mono_acc``, ``mono_loss`` (lists of M floats).
    """
    r = modality_metrics(model, (list(xs), y), chunk=chunk, predict=predict, modules=modules)
    return {"acc": r["accuracy"], "loss": r["loss"], "mono_acc": r["modality_accuracy"],
            "mono_loss": r["modality_loss"]}


def unimodal_concepts(splits, num_classes: int, args: argparse.Namespace, device: torch.device, epochs: int = 8):
    """Train one small unimodal model per view (own seed, own RNG stream) and return its encoder's features.

    The concept is the encoder output before its last ReLU: dense, so that ``cov(Y_test)`` is well conditioned
    (dead ReLU units would make it singular).

    Returns:
        per view ``(concept_val [N_val, feature_dim], concept_test [N_test, feature_dim], unimodal_test_acc)``.
    """
    train_s, val_s, test_s = splits
    out = []
    fork_devices = [device] if device.type == "cuda" else []
    for m in range(len(train_s.xs)):
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(args.seed * 1000 + 17 + m)
            enc = mlp_encoder(train_s.xs[m].shape[1], args.hidden, args.feature_dim).to(device)
            head = nn.Linear(args.feature_dim, num_classes).to(device)
            params = list(enc.parameters()) + list(head.parameters())
            opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
            gen = torch.Generator().manual_seed(args.seed * 1000 + 17 + m)
            x, y = train_s.xs[m].to(device), train_s.y.to(device)
            for _ in range(epochs):
                for idx in batches(len(y), 128, gen):
                    idx = idx.to(device)
                    loss = F.cross_entropy(head(enc(x[idx])), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            enc.eval()
            with torch.no_grad():
                pre_relu = enc[:-1]
                c_val = pre_relu(val_s.xs[m].to(device))
                c_test = pre_relu(test_s.xs[m].to(device))
                logits = head(torch.relu(c_test))
                acc = float((logits.argmax(-1) == test_s.y.to(device)).double().mean())
        out.append((c_val, c_test, acc))
    return out


def competition_strength_of(model, splits, num_classes, args, device):
    """Competition strength per view (:func:`agm_fast.competition_strength`, docs/methods.md section 1.6).

    The fused feature is the concatenation of the encoder outputs (what the fusion head reads); the ridge is
    fitted on the validation split (held out from training) and evaluated on the test split.

    Returns:
        ``(strengths, unimodal_test_acc, note)``: M floats (or None when the test split is too small for the
        concept's covariance), the unimodal models' test accuracies, and why the strengths are missing (or None).
    """
    from ..metrics import competition_strength

    _, val_s, test_s = splits
    concepts = unimodal_concepts(splits, num_classes, args, device)
    unimodal_acc = [acc for _, _, acc in concepts]
    if len(test_s.y) <= args.feature_dim:
        note = f"the test split has {len(test_s.y)} rows, not more than the concept's {args.feature_dim} dims"
        return None, unimodal_acc, note
    model.eval()
    with torch.no_grad():
        f_val = torch.cat(model.features(*[x.to(device) for x in val_s.xs]), dim=1)
        f_test = torch.cat(model.features(*[x.to(device) for x in test_s.xs]), dim=1)
    d = competition_strength(f_val, [c for c, _, _ in concepts], f_test, [c for _, c, _ in concepts])
    return d.tolist(), unimodal_acc, None


def columns(names: Sequence[str], probe: bool = False, passes: bool = False) -> List[str]:
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    cols += [f"val_acc_{n}" for n in names] + [f"val_loss_{n}" for n in names] + [f"coeff_{n}" for n in names]
    cols += [f"coeff_mean_{n}" for n in names]
    if probe:
        cols += [f"probe_acc_{n}" for n in names]
    return cols + list(TIME_COLUMNS) + (["pass_s", "pass_frac"] if passes else [])


def write_csv(path: str, names: Sequence[str], history: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        probe = bool(history) and f"probe_acc_{names[0]}" in history[0]
        passes = bool(history) and "pass_s" in history[0]
        writer = csv.DictWriter(fh, fieldnames=columns(names, probe, passes))
        writer.writeheader()
        for row in history:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def plot(path: str, names: Sequence[str], history: List[dict], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(15, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_coef, ax_loss = fig.subplots(1, 3)
    ax_acc.plot(epochs, [r["val_acc"] for r in history], color="black", linewidth=2.2, label="fused")
    for n in names:
        line = ax_acc.plot(epochs, [r[f"val_acc_{n}"] for r in history], marker="o", markersize=3,
                           label=f"{n} (Shapley)")[0]
        if f"probe_acc_{n}" in history[0]:
            ax_acc.plot(epochs, [r[f"probe_acc_{n}"] for r in history], linestyle="--", color=line.get_color(),
                        label=f"{n} (linear probe)")
    ax_acc.set_title("Validation accuracy: fused and per modality")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(loc="best", fontsize=8, ncol=2 if len(names) > 3 else 1)
    for n in names:
        ax_coef.plot(epochs, [r[f"coeff_{n}"] for r in history], marker="o", markersize=3, label=n)
    ax_coef.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax_coef.set_title("Modulation coefficient per modality (epoch median)")
    ax_coef.set_xlabel("epoch")
    ax_coef.set_ylabel("coefficient")
    ax_coef.legend(loc="best", fontsize=8, ncol=2 if len(names) > 3 else 1)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train (fused)")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="validation (fused)")
    ax_loss.set_title("Loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend(loc="best", fontsize=8)
    for ax in (ax_acc, ax_coef, ax_loss):
        ax.grid(alpha=0.3)
    for ax in (ax_acc, ax_coef, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    # Fixed margins: tight_layout would cost as much as drawing the figure.
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.85, wspace=0.22)
    fig.savefig(path)


def format_line(row: dict, names: Sequence[str], epochs: int) -> str:
    mono = " ".join(f"{n} {row[f'val_acc_{n}']:.3f}" for n in names)
    if f"probe_acc_{names[0]}" in row:
        mono += " | probe " + " ".join(f"{n} {row[f'probe_acc_{n}']:.3f}" for n in names)
    coef = " ".join(f"{n} {row[f'coeff_{n}']:.3f}" for n in names)
    width = len(str(epochs))
    return (
        f"epoch {row['epoch']:>{width}}/{epochs} | loss {row['train_loss']:.4f} | val acc {row['val_acc']:.3f} | "
        f"mono {mono} | coeff {coef} | {row['step_ms']:.2f} ms/step"
    )
