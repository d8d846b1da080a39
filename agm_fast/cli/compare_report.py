"""``agm-fast compare``'s report: the per-method summary over seeds, the Markdown table and its reading, the CSV and
the plot (:mod:`agm_fast.cli.compare` runs the grid)."""

from __future__ import annotations

import csv
import math
import os
import platform
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["findings", "markdown_table", "summarize", "verdict", "write_report"]


def _mean_std(values: Sequence[float]):
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(a) == 0:
        return None, None
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None


def summarize(records: Sequence[dict], names: Sequence[str], seeds: Sequence[int], views: Sequence[str],
              ratio: Dict[str, float]) -> dict:
    """The comparison's rows from the run records (the ``result.json`` of each run).

    Returns:
        ``{"views", "seeds", "test_rows", "rows": [...]}``; each row has ``name``, ``kind`` (``method`` or
        ``baseline``), ``acc`` (seed -> fused test accuracy or None), ``delta`` (seed -> accuracy minus joint's on
        that seed), ``probe`` and ``ceiling`` (view -> seed -> accuracy), ``ratio`` (step time over joint's) and
        ``status`` (seed -> status).
    """
    by = {(r["name"], r["seed"]): r for r in records}
    uni = {s: by.get(("unimodal", s)) for s in seeds}
    ceiling = {v: {s: (u["probe"][v] if u and u["status"] == "completed" else None) for s, u in uni.items()}
               for v in views}

    def acc_of(name: str, seed: int):
        r = by.get((name, seed))
        return r["test_acc"] if r and r["status"] == "completed" else None

    joint = {s: acc_of("joint", s) for s in seeds}

    def row(name, kind, acc, status, probe=None, step=None):
        delta = {s: (None if acc[s] is None or joint[s] is None else acc[s] - joint[s]) for s in seeds}
        return {"name": name, "kind": kind, "acc": acc, "delta": delta, "status": status,
                "probe": probe or {}, "ceiling": ceiling, "ratio": step}

    rows = []
    for name in names:
        rs = {s: by.get((name, s)) for s in seeds}
        probe = {v: {s: (r["probe"][v] if r and r["status"] == "completed" else None) for s, r in rs.items()}
                 for v in views}
        rows.append(row(name, "method", {s: acc_of(name, s) for s in seeds},
                        {s: (r["status"] if r else "missing") for s, r in rs.items()}, probe, ratio.get(name)))
    status = {s: (u["status"] if u else "missing") for s, u in uni.items()}
    ok = {s: u is not None and u["status"] == "completed" for s, u in uni.items()}
    for v in views:
        rows.append(row(f"{v} alone", "baseline", {s: uni[s]["test_acc"][v] if ok[s] else None for s in seeds},
                        status, {v: ceiling[v]}))
    rows.append(row("unimodal ensemble", "baseline",
                    {s: uni[s]["ensemble_acc"] if ok[s] else None for s in seeds}, status))
    tests = [r["rows"]["test"] for r in records if r.get("rows")]
    return {"views": list(views), "seeds": list(seeds), "test_rows": tests[0] if tests else None, "rows": rows}


def _pct(values, digits: int = 1) -> str:
    mean, std = _mean_std([v for v in values if v is not None])
    if mean is None:
        return "n/a"
    return f"{100 * mean:.{digits}f}" + ("" if std is None else f" ± {100 * std:.{digits}f}")


def markdown_table(summary: dict) -> str:
    views, seeds = summary["views"], summary["seeds"]
    head = ["method", "test acc (%)", "Δ vs joint per seed (points)", "mean Δ"]
    head += [f"probe {v} / ceiling" for v in views] + ["step time / joint"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        acc = [r["acc"][s] for s in seeds]
        deltas = [r["delta"][s] for s in seeds]
        failed = sorted({st for st in r["status"].values() if st != "completed"})
        cells = [r["name"], _pct(acc) + (f" ({', '.join(failed)})" if failed else "")]
        if r["name"] == "joint":
            cells += ["—", "—"]
        else:
            cells.append(" ".join("n/a" if d is None else f"{100 * d:+.1f}" for d in deltas))
            mean, _ = _mean_std(deltas)
            cells.append("n/a" if mean is None else f"{100 * mean:+.1f}")
        for v in views:
            if v in r["probe"]:
                cells.append(f"{_pct(r['probe'][v].values())} / {_pct(r['ceiling'][v].values(), 1).split(' ±')[0]}")
            else:
                cells.append("—")
        cells.append("—" if r["ratio"] is None else f"{r['ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(deltas: Sequence[float], test_rows: Optional[int]) -> str:
    d = np.asarray(deltas, dtype=np.float64)
    if len(d) < 2:
        return "one seed: no spread to judge it by"
    # A difference of two test samples or less is not called an effect, however steady.
    floor = 2.0 / test_rows if test_rows else 0.0
    if (d > floor).all():
        return "better than joint on every seed"
    if (d < -floor).all():
        return "worse than joint on every seed"
    if abs(d.mean()) <= max(d.std(ddof=1), floor):
        return "within the seed-to-seed spread: no clear effect"
    return f"{'better' if d.mean() > 0 else 'worse'} on average, not on every seed"


def findings(summary: dict) -> List[str]:
    """One plain sentence per row: the mean difference to joint, its verdict, the probes and the cost."""
    views, seeds = summary["views"], summary["seeds"]
    joint = next(r for r in summary["rows"] if r["name"] == "joint")
    out = []
    for r in summary["rows"]:
        if r["name"] == "joint":
            continue
        deltas = [r["delta"][s] for s in seeds if r["delta"][s] is not None]
        if not deltas:
            out.append(f"- **{r['name']}**: no completed run to compare.")
            continue
        judged = verdict(deltas, summary["test_rows"])
        text = f"- **{r['name']}**: {100 * np.mean(deltas):+.1f} points vs joint ({judged})"
        if r["kind"] == "method":
            probes = []
            for v in views:
                a, b = _mean_std(joint["probe"][v].values())[0], _mean_std(r["probe"][v].values())[0]
                c = _mean_std(r["ceiling"][v].values())[0]
                if None not in (a, b, c):
                    probes.append(f"{v} {100 * a:.1f} -> {100 * b:.1f} (ceiling {100 * c:.1f})")
            if probes:
                text += "; probe " + ", ".join(probes)
            if r["ratio"] is not None:
                text += f"; step time x{r['ratio']:.2f} of joint"
        out.append(text + ".")
    return out


def write_report(out: str, summary: dict, config: dict, command: str, plot: bool = True, threads: int = 1) -> None:
    """Write ``compare.md``, ``compare.csv`` and (with ``plot``) ``compare.png`` to ``out``.

    Args:
        out: the folder.
        summary: :func:`summarize`'s result.
        config: the comparison's configuration (``compare.json``).
        command: the command line shown at the top of ``compare.md``.
        plot: draw ``compare.png``.
        threads: torch threads per run, for the machine line.
    """
    views, seeds = summary["views"], summary["seeds"]
    data = config["data"]
    name = data.get("file") or data["source"]
    source = {"mfeat": "the embedded UCI Multiple Features", "synthetic": "agm_fast.synthetic (docs/compare.md)"}.get(
        name, name)
    lines = [
        f"# agm-fast compare: {name} ({', '.join(views)})",
        "",
        f"`{command}`",
        "",
        f"Data: {source}, views {', '.join(f'{v} ({d})' for v, d in zip(views, data['dims']))}, {data['rows']} rows "
        f"(split 60/20/20 per seed, {summary['test_rows']} test rows). {len(seeds)} seeds ({', '.join(map(str, seeds))}"
        f"; a seed sets the split, the initialisation and the data order), {config['epochs']} epochs, fusion "
        f"{config['fusion']}, batch {config['batch_size']}, SGD lr {config['lr']} momentum {config['momentum']}, "
        f"hidden {config['hidden']}, features {config['feature_dim']}; the methods' default hyper-parameters unless "
        f"the command says otherwise. torch {torch.__version__}, device {config['device'] or 'default'} "
        f"({platform.machine()}), {threads} torch thread(s) per run.",
        "",
        "- **test acc**: fused test accuracy of the last epoch's model, mean ± std over seeds. Baselines: each view "
        "trained alone (its encoder and a linear head, same split, epochs and optimiser) and the unimodal ensemble "
        "(the average of those models' logits).",
        "- **Δ vs joint**: per seed, the accuracy minus joint training's on the same seed (same split and data order).",
        "- **probe v / ceiling**: accuracy of a linear probe on the frozen encoder of view v (fitted on the training "
        "split, scored on the test split), against the same probe on the encoder trained on v alone (mean over "
        "seeds).",
        f"- **step time / joint**: median over {config['timing']['rounds']} interleaved rounds of the method's "
        "training-step time over joint's in the same round; comparable within this table only.",
        "",
        markdown_table(summary),
        "",
        "## Per row",
        "",
        *findings(summary),
        "",
    ]
    with open(os.path.join(out, "compare.md"), "w") as fh:
        fh.write("\n".join(lines))
    _write_csv(os.path.join(out, "compare.csv"), summary)
    if plot:
        _plot(os.path.join(out, "compare.png"), summary, f"{name}: "
              f"{len(seeds)} seeds, {config['epochs']} epochs")


def _write_csv(path: str, summary: dict) -> None:
    views = summary["views"]
    cols = ["name", "kind", "seed", "status", "test_acc", "delta_vs_joint"]
    cols += [f"probe_{v}" for v in views] + [f"ceiling_{v}" for v in views] + ["step_time_vs_joint"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for r in summary["rows"]:
            for s in summary["seeds"]:
                cells = [r["name"], r["kind"], s, r["status"][s], r["acc"][s], r["delta"][s]]
                cells += [r["probe"][v][s] if v in r["probe"] else None for v in views]
                cells += [r["ceiling"][v][s] for v in views]
                cells.append(r["ratio"])
                writer.writerow(["" if c is None else (repr(c) if isinstance(c, float) else c) for c in cells])


def _plot(path: str, summary: dict, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    views, seeds, rows = summary["views"], summary["seeds"], summary["rows"]
    fig = Figure(figsize=(13, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_probe = fig.subplots(1, 2)
    xs = np.arange(len(rows))
    stats = [_mean_std([r["acc"][s] for s in seeds]) for r in rows]
    means = [100 * (m if m is not None else math.nan) for m, _ in stats]
    errs = [100 * (s or 0.0) for _, s in stats]
    colors = ["tab:blue" if r["kind"] == "method" else "tab:gray" for r in rows]
    ax_acc.bar(xs, means, yerr=errs, color=colors, capsize=3)
    joint = means[0]
    ax_acc.axhline(joint, color="black", linestyle="--", linewidth=0.9, label="joint")
    finite = [m for m in means if math.isfinite(m)]
    if finite:
        ax_acc.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax_acc.set_xticks(xs)
    ax_acc.set_xticklabels([r["name"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax_acc.set_ylabel("fused test accuracy (%)")
    ax_acc.set_title("Test accuracy, mean ± std over seeds (gray: baselines)")
    ax_acc.legend(loc="lower right", fontsize=8)
    method_rows = [r for r in rows if r["kind"] == "method"]
    width = 0.8 / max(1, len(views))
    mx = np.arange(len(method_rows))
    for k, v in enumerate(views):
        st = [_mean_std([r["probe"][v][s] for s in seeds]) for r in method_rows]
        bars = ax_probe.bar(mx + (k - (len(views) - 1) / 2) * width, [100 * (m or math.nan) for m, _ in st],
                            width, yerr=[100 * (s or 0.0) for _, s in st], capsize=2, label=f"{v} (probe)")
        ceiling = _mean_std([rows[0]["ceiling"][v][s] for s in seeds])[0]
        if ceiling is not None:
            ax_probe.axhline(100 * ceiling, color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1.2,
                             label=f"{v} alone (ceiling)")
    ax_probe.set_xticks(mx)
    ax_probe.set_xticklabels([r["name"] for r in method_rows], rotation=35, ha="right", fontsize=8)
    ax_probe.set_ylabel("linear-probe test accuracy (%)")
    ax_probe.set_ylim(0, 100)
    ax_probe.set_title("Per-view linear probe vs the view trained alone")
    ax_probe.legend(loc="lower right", fontsize=8)
    for ax in (ax_acc, ax_probe):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.24, top=0.86, wspace=0.2)
    fig.savefig(path)

