"""``agm-fast compare``: every method on every seed against joint training and two unimodal baselines.

Each (method, seed) run is an ``agm-fast train`` run (:func:`agm_fast.cli.run.train` with the options of the
comparison), in ``--out/runs/<method>-seed<k>``. Per seed the baselines train each view alone (the same encoder,
a linear head, the same split, epochs and optimiser): its accuracy and its encoder's linear-probe accuracy are that
view's unimodal ceiling, and the average of those models' logits is the unimodal ensemble (Du et al., ICML 2023).
Every method's encoders are linear-probed the same way, and the step time of each method relative to joint is
measured interleaved (rounds that time every method in turn on the same batches). A finished run leaves
``result.json`` in its folder, so a rerun with ``--resume`` skips it. Outputs: ``compare.md``, ``compare.csv``,
``compare.png`` in ``--out``. docs/compare.md says how to read them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import csv
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as data_mod
from .. import methods
from ..models import MultiViewModel
from ..probe import probe_encoders
from .args import CLIError, method_kwargs, one_line, option_table, resolve
from .compare_args import add_parser
from .data import batches, load_data, prepare_out

__all__ = [
    "add_parser",
    "compare",
    "findings",
    "interleaved_timing",
    "markdown_table",
    "run_method",
    "run_unimodal",
    "summarize",
    "write_report",
]

CONFIG = "compare.json"
RESULT = "result.json"
TIMING = "timing.json"
FORMAT = "agm_fast.cli.compare/1"
def _ints(text: str, flag: str) -> List[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{flag}: expected at least one value, got {text!r}")
    if len(set(values)) != len(values):
        raise CLIError(f"{flag}: expected distinct values, got {text!r}")
    return values


def _method_list(text: Optional[str]) -> List[str]:
    known = methods.available()
    if text is None:
        chosen = list(known)
    else:
        chosen = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [m for m in chosen if m not in known]
        if unknown:
            raise CLIError(f"--methods: unknown method {unknown[0]!r}; choose from {','.join(known)}")
        if len(set(chosen)) != len(chosen):
            raise CLIError(f"--methods: expected distinct methods, got {text!r}")
    # Every difference is measured against joint training, so it always runs, first.
    return ["joint"] + [m for m in chosen if m != "joint"]


def _train_namespace(args: argparse.Namespace, method: str) -> argparse.Namespace:
    """The ``agm-fast train`` arguments of one method's runs (seed and folder are set per run)."""
    table = option_table()
    ns = argparse.Namespace()
    for dest in args._shared:
        if not hasattr(args, dest):
            continue
        entry = table.get(dest)
        if entry is not None and method not in entry["methods"]:
            continue
        setattr(ns, dest, getattr(args, dest))
    if not methods.get(method)[0].windowed:
        ns.modulation_starts = ns.modulation_ends = None
    ns.method, ns.modulation, ns.seed, ns.out = method, None, 0, None
    ns.resume, ns.overwrite, ns.no_plot, ns.probe, ns.threads = False, True, True, False, args.threads
    try:
        resolve(ns)
    except CLIError as exc:
        raise CLIError(f"--methods {method}: {exc}") from None
    ns._explicit = set(vars(ns))
    return ns


def _check(args: argparse.Namespace, names: Sequence[str]) -> None:
    for key in ("jobs", "threads", "timing_steps"):
        if getattr(args, key) < 1:
            raise CLIError(f"--{key.replace('_', '-')}: expected an int >= 1, got {getattr(args, key)}")
    if args.timing_rounds < 0:
        raise CLIError(f"--timing-rounds: expected an int >= 0, got {args.timing_rounds}")
    if args.resume and args.overwrite:
        raise CLIError("--resume finishes the comparison in --out and --overwrite replaces it: choose one")
    for dest, entry in option_table().items():
        if hasattr(args, dest) and not set(entry["methods"]) & set(names):
            raise CLIError(f"{entry['flag']} applies to --methods {'/'.join(entry['methods'])}, none of which runs")


def _config(args, names, seeds, data, namespaces) -> dict:
    keys = ("fusion", "epochs", "batch_size", "lr", "momentum", "weight_decay", "hidden", "feature_dim", "device")
    first = namespaces[names[0]]
    config = {"format": FORMAT, "methods": list(names), "seeds": list(seeds)}
    config.update({k: getattr(first, k) for k in keys})
    config["method_options"] = {
        name: {k: v for k, v in sorted(method_kwargs(namespaces[name]).items())} for name in names
    }
    config["timing"] = {"rounds": args.timing_rounds, "steps": args.timing_steps}
    config["data"] = {
        "source": "mfeat" if args.data is None else ("synthetic" if args.data == "synthetic" else "npz"),
        # Where the file is may change between a run and its resume; what it holds may not (sha256).
        "file": None if args.data in (None, "synthetic") else os.path.basename(args.data),
        "views": list(data.names),
        "dims": [int(x.shape[1]) for x in data.xs],
        "rows": int(len(data.y)),
        "sha256": data_mod.content_hash(data),
    }
    # JSON round trip: tuples become lists, so that a config read back compares equal.
    return json.loads(json.dumps(config))


def _difference(old: dict, new: dict, prefix: str = "") -> Optional[str]:
    for key in dict.fromkeys(list(old) + list(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b and key != "file":
            if key == "sha256":
                return "the data differ (same views and shapes, other values: their sha256 differs)"
            return f"{prefix}{key}: the comparison in --out has {a!r}, this run asks for {b!r}"
    return None


def _prepare(out: str, config: dict, resume: bool, overwrite: bool):
    lock = prepare_out(out, resume=True, overwrite=False)
    path = os.path.join(out, CONFIG)
    if os.path.exists(path):
        if not resume and not overwrite:
            lock.close()
            raise CLIError(f"--out {out!r} already holds a comparison; finish it with --resume, or replace it with "
                           "--overwrite")
        if resume:
            try:
                with open(path) as fh:
                    old = json.load(fh)
            except (OSError, ValueError) as exc:
                lock.close()
                raise CLIError(f"--resume: {path!r} is unreadable ({one_line(exc)})") from None
            diff = _difference(old, config)
            if diff:
                lock.close()
                raise CLIError(f"--resume: {diff}; resume with the same options, or use another --out")
            return lock
        for name in ("runs", CONFIG, TIMING, "compare.md", "compare.csv", "compare.png"):
            target = os.path.join(out, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
    elif resume:
        lock.close()
        raise CLIError(f"--resume: --out {out!r} holds no comparison to finish (start one without --resume)")
    _write_json(path, config)
    return lock


def _write_json(path: str, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _run_dir(out: str, name: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{name}-seed{seed}")


def _test_rows(data, seed: int) -> dict:
    train_s, val_s, test_s = data_mod.split_and_standardize(data, seed)
    return {"train": len(train_s.y), "val": len(val_s.y), "test": len(test_s.y)}


def run_method(ns: argparse.Namespace, seed: int, run_dir: str) -> dict:
    """One ``agm-fast train`` run, then a linear probe of its encoders on the test split; returns the record."""
    from .run import Diverged, train

    os.makedirs(run_dir, exist_ok=True)
    ns = argparse.Namespace(**vars(ns))
    ns.seed, ns.out = seed, run_dir
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    # A run that an interruption cut short continues from its last checkpoint.
    ns.resume = os.path.exists(ckpt_path)
    ns.overwrite = not ns.resume
    t0 = time.perf_counter()
    record = {"kind": "method", "name": ns.method, "seed": seed}
    with open(os.path.join(run_dir, "log.txt"), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            summary = train(ns)
        except Diverged as exc:
            record.update(status="diverged", error=one_line(exc), seconds=time.perf_counter() - t0)
            _write_json(os.path.join(run_dir, RESULT), record)
            return record
    data = load_data(ns)
    train_s, _, test_s = data_mod.split_and_standardize(data, seed)
    model = MultiViewModel([int(x.shape[1]) for x in data.xs], data.num_classes, ns.fusion, ns.hidden, ns.feature_dim)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    probe = probe_encoders(list(model.encoders), train_s.xs, train_s.y, test_s.xs, test_s.y,
                           num_classes=data.num_classes)
    record.update(
        status="completed",
        test_acc=summary["test_acc"],
        train_acc=ckpt["history"][-1]["train_acc"],
        probe=dict(zip(data.names, probe.tolist())),
        rows=summary["rows"],
        step_ms=summary["time_per_step_ms_median"],
        seconds=time.perf_counter() - t0,
    )
    _write_json(os.path.join(run_dir, RESULT), record)
    return record


def run_unimodal(ns: argparse.Namespace, seed: int, run_dir: str) -> dict:
    """Train each view alone (its encoder and a linear head, the run's split, epochs and optimiser), probe its
    encoder, and score the ensemble of the unimodal models (their averaged logits); returns the record."""
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(ns.threads)
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_data(ns)
    train_s, _, test_s = data_mod.split_and_standardize(data, seed)
    C = data.num_classes
    y_train, y_test = train_s.y.to(device), test_s.y.to(device)
    logits, accs, probes = [], {}, {}
    for m, name in enumerate(data.names):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = MultiViewModel([int(train_s.xs[m].shape[1])], C, "concat", ns.hidden, ns.feature_dim).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=ns.lr, momentum=ns.momentum, weight_decay=ns.weight_decay)
            gen = torch.Generator().manual_seed(seed)
            x, x_test = train_s.xs[m].to(device), test_s.xs[m].to(device)
            for _ in range(ns.epochs):
                model.train()
                for idx in batches(len(y_train), ns.batch_size, gen):
                    idx = idx.to(device)
                    loss = F.cross_entropy(model(x[idx]), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            model.eval()
            with torch.no_grad():
                out = model(x_test).float()
        if not bool(torch.isfinite(out).all()):
            record = {"kind": "unimodal", "name": "unimodal", "seed": seed, "status": "diverged",
                      "error": f"view {name} trained alone went non-finite", "seconds": time.perf_counter() - t0}
            _write_json(os.path.join(run_dir, RESULT), record)
            return record
        logits.append(out)
        accs[name] = float((out.argmax(-1) == y_test).double().mean())
        probes[name] = float(probe_encoders([model.encoders[0]], [x], y_train, [x_test], y_test, num_classes=C)[0])
    ensemble = torch.stack(logits).mean(0)
    record = {
        "kind": "unimodal",
        "name": "unimodal",
        "seed": seed,
        "status": "completed",
        "test_acc": accs,
        "probe": probes,
        "ensemble_acc": float((ensemble.argmax(-1) == y_test).double().mean()),
        "rows": {"train": len(train_s.y), "val": len(data.y) - len(train_s.y) - len(test_s.y),
                 "test": len(test_s.y)},
        "seconds": time.perf_counter() - t0,
    }
    _write_json(os.path.join(run_dir, RESULT), record)
    return record


def _run_item(item) -> dict:
    kind, ns, seed, run_dir = item
    torch.set_num_threads(ns.threads)
    if kind == "unimodal":
        return run_unimodal(ns, seed, run_dir)
    return run_method(ns, seed, run_dir)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def interleaved_timing(namespaces: Dict[str, argparse.Namespace], data, seed: int, rounds: int, steps: int) -> dict:
    """Per-step time of every method relative to joint, measured in rounds that time each method in turn.

    Every method trains ``steps`` steps per round on the same batches of the training split (epoch: the run's last
    one, so that warm-ups are over); the order rotates from round to round. The ratio of a round is the method's
    time over joint's time in that round; the result is the median over rounds, so that load that changes
    between rounds cancels out.

    Returns:
        ``{"ratio": {method: float}, "ms": {method: [per-round ms per step]}}``.
    """
    names = list(namespaces)
    first = namespaces[names[0]]
    device = torch.device(first.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_s = data_mod.split_and_standardize(data, seed)[0]
    xs = [x.to(device) for x in train_s.xs]
    y = train_s.y.to(device)
    idx = batches(len(y), first.batch_size, torch.Generator().manual_seed(seed))
    idx = [idx[i % len(idx)].to(device) for i in range(steps)]
    setups = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for name in names:
            ns = namespaces[name]
            torch.manual_seed(seed)
            model = MultiViewModel([int(x.shape[1]) for x in xs], data.num_classes, ns.fusion, ns.hidden,
                                   ns.feature_dim).to(device)
            method = methods.create(name, list(model.encoders), model.fusion, seed=seed, **method_kwargs(ns))
            groups = [{"params": list(model.parameters())}] + method.param_groups(ns.lr)
            opt = torch.optim.SGD(groups, lr=ns.lr, momentum=ns.momentum, weight_decay=ns.weight_decay)
            setups[name] = (method, opt, ns.epochs - 1)

        def timed(name: str, count: int) -> float:
            method, opt, epoch = setups[name]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for i in range(count):
                res = methods.training_step(method, [x[idx[i]] for x in xs], y[idx[i]], epoch, opt)
            float(res.loss)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return 1e3 * (time.perf_counter() - t0) / count

        for name in names:
            timed(name, min(3, steps))
        ms: Dict[str, List[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                ms[name].append(timed(name, steps))
    ratio = {name: float(np.median(np.array(ms[name]) / np.array(ms["joint"]))) for name in names}
    return {"ratio": ratio, "ms": ms}


def compare(args: argparse.Namespace) -> dict:
    """Run ``agm-fast compare`` with parsed arguments; returns the summary of :func:`summarize`.

    Raises:
        CLIError: a bad argument, unusable data, a resume whose configuration differs, or a failed write.
        Interrupted: SIGINT or SIGTERM (finished runs are kept; ``--resume`` continues).
    """
    from tqdm import tqdm

    from .run import Interrupted, Terminate, device_of

    names = _method_list(args.methods)
    seeds = _ints(args.seeds, "--seeds")
    _check(args, names)
    namespaces = {name: _train_namespace(args, name) for name in names}
    first = namespaces["joint"]
    device_of(first.device)
    data = load_data(first)
    for seed in seeds:
        if not 0 <= seed < 1 << 32:
            raise CLIError(f"--seeds: expected ints in [0, 2**32), got {seed}")
    try:
        _test_rows(data, seeds[0])
    except ValueError as exc:
        raise CLIError(f"--data: {exc}") from None
    config = _config(args, names, seeds, data, namespaces)
    lock = _prepare(args.out, config, args.resume, args.overwrite)
    try:
        items = []
        for seed in seeds:
            items.append(("unimodal", first, seed, _run_dir(args.out, "unimodal", seed)))
            items += [("method", namespaces[n], seed, _run_dir(args.out, n, seed)) for n in names]
        records = {}
        todo = []
        for item in items:
            found = _read_json(os.path.join(item[3], RESULT))
            if found is None:
                todo.append(item)
            else:
                records[item[3]] = found
        timing_path = os.path.join(args.out, TIMING)
        timing = _read_json(timing_path) if args.timing_rounds else {"ratio": {}, "ms": {}}
        total = len(items) + (1 if args.timing_rounds else 0)
        done = total - len(todo) - (1 if timing is None else 0)
        if done:
            print(f"resuming: {done} of {total} runs are finished in {args.out}")
        interactive = sys.stderr.isatty()
        bar = tqdm(total=total, initial=done, desc="compare", unit="run", file=sys.stderr, disable=not interactive)
        count = [done]

        def report(record: dict, t: float) -> None:
            what = f"{record['name']} seed {record['seed']}"
            if record["status"] != "completed":
                text = f"{what}: {record['status']} ({record.get('error', '')})"
            elif record["kind"] == "timing":
                text = f"{what}: {record['text']}"
            elif record["kind"] == "unimodal":
                accs = " ".join(f"{n} {a:.3f}" for n, a in record["test_acc"].items())
                text = f"{what}: test acc {accs} | ensemble {record['ensemble_acc']:.3f}"
            else:
                text = f"{what}: test acc {record['test_acc']:.3f}"
            count[0] += 1
            line = f"[{count[0]}/{total}] {text} ({t:.1f} s)"
            if interactive:
                bar.write(line)
            else:
                print(line, flush=True)
            bar.update(1)

        try:
            if args.jobs == 1 or len(todo) <= 1:
                for item in todo:
                    record = _run_item(item)
                    records[item[3]] = record
                    report(record, record["seconds"])
            else:
                ctx = multiprocessing.get_context("spawn")
                with futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker,
                                                 initargs=(args.threads,)) as pool:
                    pending = {pool.submit(_run_item, item): item for item in todo}
                    try:
                        for fut in futures.as_completed(pending):
                            record = fut.result()
                            records[pending[fut][3]] = record
                            report(record, record["seconds"])
                    except BaseException:
                        for fut in pending:
                            fut.cancel()
                        raise
            if timing is None:
                t0 = time.perf_counter()
                torch.set_num_threads(args.threads)
                timing = interleaved_timing(namespaces, data, seeds[0], args.timing_rounds, args.timing_steps)
                _write_json(timing_path, timing)
                ratios = " ".join(f"{n} {r:.2f}" for n, r in timing["ratio"].items() if n != "joint")
                report({"kind": "timing", "name": "step time / joint", "seed": seeds[0], "status": "completed",
                        "text": ratios}, time.perf_counter() - t0)
        except (KeyboardInterrupt, Terminate, Interrupted) as exc:
            signal_name = "SIGTERM" if isinstance(exc, Terminate) or getattr(exc, "status", 130) == 143 else "SIGINT"
            finished = sum(1 for item in items if os.path.exists(os.path.join(item[3], RESULT)))
            raise Interrupted(
                f"interrupted by {signal_name}; {finished} of {len(items)} runs are finished and kept in "
                f"{args.out!r}: continue with --resume", 143 if signal_name == "SIGTERM" else 130
            ) from None
        finally:
            bar.close()
        ordered = [records[item[3]] for item in items]
        summary = summarize(ordered, names, seeds, list(data.names), timing["ratio"])
        command = "agm-fast " + " ".join(_shown(getattr(args, "_argv", ["compare"])))
        write_report(args.out, summary, config, command, plot=not args.no_plot, threads=args.threads)
        print(markdown_table(summary))
        written = "compare.md, compare.csv" + ("" if args.no_plot else ", compare.png")
        print(f"wrote {written} to {args.out}")
        return summary
    finally:
        lock.close()


def _shown(argv: Sequence[str]) -> List[str]:
    """The command line without what does not change the numbers (where the outputs go, resume, jobs)."""
    out, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip:
            skip = False
        elif name in ("--resume", "--overwrite", "--no-plot"):
            continue
        elif name in ("--out", "--jobs", "--threads"):
            skip = "=" not in token
        else:
            out.append(token)
    return out


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


def _verdict(deltas: Sequence[float], test_rows: Optional[int]) -> str:
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
        verdict = _verdict(deltas, summary["test_rows"])
        text = f"- **{r['name']}**: {100 * np.mean(deltas):+.1f} points vs joint ({verdict})"
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

