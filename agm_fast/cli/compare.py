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
import json
import multiprocessing
import os
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
from .compare_report import findings, markdown_table, summarize, write_report
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
            # A method's first epoch pass (PMR's prototypes), untimed: the steps need what it computes.
            methods.run_epoch_passes(method, 0, "start", lambda: [([x[i] for x in xs], y[i]) for i in idx])
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

