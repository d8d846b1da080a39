"""Compare balancing methods on the embedded UCI Multiple Features data with ``agm-fast train``.

Runs every method on every view set for several seeds through the command line's own code path
(:func:`agm_fast.cli.main`), then writes a Markdown report: mean ± std of the test accuracy, the mean per-view
(Shapley mono-modal) test accuracies, the per-view competition strength and the median time per training step, plus
the differences to joint training with a plain reading of them. Hand-written notes below the line
``<!-- notes -->`` of an existing report are kept when it is rewritten.

Usage::

    python scripts/compare_methods.py                      # the committed report (about 10 minutes on 2 CPU cores)
    python scripts/compare_methods.py --epochs 5 --seeds 0 --out /tmp/quick.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES_MARKER = "<!-- notes -->"

DEFAULT_SETS = [
    ("strong + weak", "fac,zer"),
    ("balanced", "fou,zer"),
    ("all six", "fac,fou,kar,pix,zer,mor"),
]


def run_one(views: str, method: str, seed: int, epochs: int, device: str, extra: List[str]) -> Dict:
    from agm_fast import cli

    with tempfile.TemporaryDirectory() as out:
        argv = ["train", "--views", views, "--method", method, "--seed", str(seed), "--epochs", str(epochs),
                "--out", out, "--no-plot", "--device", device, *extra]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            rc = cli.main(argv)
        if rc != 0:
            raise RuntimeError(f"agm-fast {' '.join(argv)} failed with status {rc}:\n{log.getvalue()}")
        with open(os.path.join(out, "summary.json")) as fh:
            return json.load(fh)


def fmt(values, scale: float = 100.0, digits: int = 1) -> str:
    a = np.asarray(values, dtype=np.float64) * scale
    if len(a) == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def report(results: Dict, sets, methods, seeds, epochs: int, machine: str, command: str, notes: str) -> str:
    lines = [
        "# Balancing methods on UCI Multiple Features",
        "",
        f"`{command}`",
        "",
        f"{machine}. Each cell: mean ± std over seeds {', '.join(map(str, seeds))} (the seed sets the split, the "
        f"initialisation and the data order), {epochs} epochs, the `agm-fast train` defaults otherwise (per-view MLP "
        "encoders, concat fusion, SGD lr 0.05 momentum 0.9, batch 64, 1 CPU thread).",
        "",
        "- **test acc**: fused test accuracy (%), last epoch's model.",
        "- **mono <view>**: test accuracy (%) of the view's Shapley mono-modal output psi_m (muted views' inputs set "
        "to zero), the same evaluation for every method.",
        "- **d <view>**: competition strength (lower = the fused features linearly hold more of that view's "
        "unimodal concept; about 1 = nothing).",
        "- **ms/step**: per run the median over epochs of the mean training-step time, then the median over seeds. "
        "Measured on a shared machine whose load changed during the runs: only differences of 2x or more mean "
        "anything, and only within one table.",
        "",
    ]
    findings = []
    for label, views in sets:
        names = views.split(",")
        lines += [f"## {label}: {views.replace(',', ' + ')}", ""]
        head = ["method", "test acc"] + [f"mono {n}" for n in names] + [f"d {n}" for n in names] + ["ms/step"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in methods:
            runs = results[(views, method)]
            row = [method, fmt([r["test_acc"] for r in runs])]
            row += [fmt([r["test_acc_per_modality"][n] for r in runs]) for n in names]
            row += [fmt([r["competition_strength"][n] for r in runs], scale=1.0, digits=3) for n in names]
            row += [f"{np.median([r['time_per_step_ms_median'] for r in runs]):.2f}"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        base = results[(views, "joint")]
        base_acc = np.array([r["test_acc"] for r in base]) * 100
        weakest = min(names, key=lambda n: np.mean([r["test_acc_per_modality"][n] for r in base]))
        base_weak = np.array([r["test_acc_per_modality"][weakest] for r in base]) * 100
        base_ms = np.median([r["time_per_step_ms_median"] for r in base])
        for method in methods:
            if method == "joint":
                continue
            runs = results[(views, method)]
            acc = np.array([r["test_acc"] for r in runs]) * 100
            weak = np.array([r["test_acc_per_modality"][weakest] for r in runs]) * 100
            delta = acc.mean() - base_acc.mean()
            # Paired by seed (same split and initialisation): the spread of the per-seed differences. A difference
            # of two test samples or less is not called an effect either, however steady.
            spread = (acc - base_acc).std(ddof=1) if len(acc) > 1 else float("nan")
            two_samples = 200.0 / runs[0]["rows"]["test"]
            if len(acc) < 2:
                verdict = "one seed: no spread to judge it by"
            elif abs(delta) <= max(spread, two_samples):
                verdict = "within the seed-to-seed spread or two test samples: no clear effect"
            elif delta > 0:
                verdict = "a gain larger than the seed-to-seed spread"
            else:
                verdict = "a loss larger than the seed-to-seed spread"
            ms = np.median([r["time_per_step_ms_median"] for r in runs])
            findings.append(
                f"- {views.replace(',', ' + ')}, {method} vs joint: test accuracy {delta:+.2f} points "
                f"(per-seed differences: {', '.join(f'{d:+.2f}' for d in acc - base_acc)}; {verdict}); weakest "
                f"view {weakest}'s mono-modal accuracy {base_weak.mean():.1f} -> {weak.mean():.1f}; "
                f"step time x{ms / base_ms:.2f}."
            )
    lines += ["## What the numbers say", "", *findings, "", NOTES_MARKER, notes.strip(), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="joint,agm,ogm_ge,cggm", help="comma-separated methods (joint first)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30, the CLI default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sets", default=None,
                        help="view sets as label=views;label=views (default: fac,zer; fou,zer; all six)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mfeat-methods.md"))
    parser.add_argument("--json", default=None, help="also write every run's summary to this JSON file")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more agm-fast train options for every run")
    args = parser.parse_args(argv)

    sys.path.insert(0, ROOT)
    from benchmarks.harness import machine_line

    methods = args.methods.split(",")
    if methods[0] != "joint":
        parser.error("--methods must start with joint (the baseline every method is compared with)")
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = DEFAULT_SETS if args.sets is None else [tuple(s.split("=", 1)) for s in args.sets.split(";")]
    extra = [a for a in args.extra if a != "--"]

    results: Dict = {}
    t0 = time.perf_counter()
    for label, views in sets:
        for method in methods:
            for seed in seeds:
                t = time.perf_counter()
                summary = run_one(views, method, seed, args.epochs, args.device, extra)
                results.setdefault((views, method), []).append(summary)
                print(f"{views:>24} {method:>7} seed {seed}: test acc {summary['test_acc']:.4f} "
                      f"({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")

    notes = ""
    if os.path.exists(args.out):
        with open(args.out) as fh:
            text = fh.read()
        if NOTES_MARKER in text:
            notes = text.split(NOTES_MARKER, 1)[1]
    given = list(sys.argv[1:] if argv is None else argv)
    shown = [a for i, a in enumerate(given) if not (a.startswith("--out") or (i and given[i - 1] == "--out"))]
    command = " ".join(["python scripts/compare_methods.py"] + shown)
    torch.set_num_threads(1)
    text = report(results, sets, methods, seeds, args.epochs, machine_line(torch.device(args.device)), command, notes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({f"{v}|{m}": runs for (v, m), runs in results.items()}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
