"""Shared benchmark harness: command line, machine line, timing, the provider loop, tables and result files.

GPU timing uses ``triton.testing.do_bench`` (median, p20, p80); CPU timing runs the function repeatedly with
``time.perf_counter`` and reports the same quantiles. Every provider is checked against the baseline before it is
timed (:func:`check_close`, :func:`run_providers`); a provider that is wrong is reported as such and not timed.

A benchmark module builds its parser with :func:`bench_parser` and hands it, with a function that runs the
benchmark, to :func:`bench_main`, which checks the device and the output folder before anything runs and writes
the results afterwards: JSON lines appended to ``<out>/<name>.jsonl`` and, for a full run, a markdown table under
``<out>`` (``--out``, default ``benchmarks/results`` under the current directory; ``--no-save`` writes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

DEFAULT_OUT = os.path.join("benchmarks", "results")
# dtypes of the logits in the benchmarks of the score kernels (--dtype).
KERNEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def git_sha() -> str:
    """The short commit of the checkout holding this file, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def machine_line(device: torch.device) -> str:
    """One line naming the device, torch, triton and the git commit."""
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    return f"device: {device_name(device)} | torch {torch.__version__} | triton {tv} | git {git_sha()}"


def _quantiles(times_ms: Sequence[float]) -> Dict[str, float]:
    t = torch.tensor(times_ms, dtype=torch.float64)
    return {"median_ms": float(t.median()), "p20_ms": float(t.quantile(0.2)), "p80_ms": float(t.quantile(0.8))}


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 20) -> Dict[str, float]:
    """Time ``fn``.

    Args:
        fn: the call to time.
        device: on CUDA ``do_bench`` times it (its own warm-up and repetitions); elsewhere ``perf_counter``.
        warmup: untimed calls first (CPU).
        rep: timed calls (CPU).

    Returns:
        ``{"median_ms", "p20_ms", "p80_ms"}``.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def time_interleaved(
    fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int, rep: int
) -> Dict[str, Dict[str, float]]:
    """Time several functions; on CPU they take turns, one call each per round.

    Other processes change a CPU's load while a benchmark runs; taking turns makes a load change hit every function
    alike, so that their ratios stay meaningful. On a GPU each is timed on its own with :func:`time_fn`.

    Args:
        fns: name -> the call to time.
        device: the device they run on.
        warmup: untimed calls of each before the rounds (CPU).
        rep: rounds (CPU).

    Returns:
        name -> ``{"median_ms", "p20_ms", "p80_ms"}`` over the rounds.
    """
    if device.type != "cpu":
        return {k: time_fn(fn, device, warmup=warmup, rep=rep) for k, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rep):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _quantiles(v) for k, v in samples.items()}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes that one call of ``fn`` allocates on top of what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the profiler's memory view (``profile_memory``): the
    largest rise of the running total of torch's own allocations during the call; it sees every tensor torch
    allocates, which RSS does not resolve.

    Args:
        fn: the call (one training step).
        device: its device.

    Returns:
        Bytes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    # The profiler's backend writes a line to the stderr file descriptor at every start and stop.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    # The running total starts at 0 and also falls when tensors allocated before the call are freed; the peak is
    # the largest rise above the lowest level reached before it.
    peak, low = 0, 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        total = e["args"]["Total Allocated"]
        low = min(low, total)
        peak = max(peak, total - low)
    return int(peak)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth, measured with ``copy_``.

    Args:
        device: the device to measure.
        nbytes: size of the copied buffer.

    Returns:
        Bytes per second, the read and the write both counted.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (t["median_ms"] * 1e-3)


def check_close(name: str, got, want, rtol: float = 1e-4, atol: float = 1e-5) -> Optional[str]:
    """Compare a provider's outputs with the baseline's.

    Args:
        name: the provider, for the message.
        got: a tensor or number, or a sequence of them.
        want: the same structure from the baseline.
        rtol: relative tolerance of ``torch.testing.assert_close``.
        atol: absolute tolerance.

    Returns:
        None when they match, else a one-line message.
    """
    if not isinstance(got, (list, tuple)):
        got, want = [got], [want]
    if len(got) != len(want):
        return f"{name}: {len(got)} outputs, the baseline has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        try:
            g, w = torch.as_tensor(g).float().cpu(), torch.as_tensor(w).float().cpu()
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
        except AssertionError as exc:
            return f"{name}: output {i} differs from the baseline: {str(exc).splitlines()[0]}"
    return None


def run_providers(
    baseline: Tuple[str, Callable[..., object]],
    providers: Sequence[Tuple[str, Callable[..., object]]],
    inputs: Sequence[object] = (),
    *,
    device: torch.device,
    fields: Optional[Dict[str, object]] = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    check: Optional[Callable[[str, object, object], Optional[str]]] = None,
    collect: Optional[Callable[[object], object]] = None,
    prepare: Optional[Callable[[], None]] = None,
    timer: Optional[Dict[str, int]] = None,
) -> List[Dict[str, object]]:
    """Run the baseline, check every provider against it, and time the baseline and the providers that agree.

    A provider that raises or whose output differs is not timed: its row has the message in ``check`` and no
    timing columns.

    Args:
        baseline: ``(name, fn)``; its output is what the providers must reproduce.
        providers: ``(name, fn)`` pairs, in table order.
        inputs: positional arguments of every call.
        device: the device everything runs on (for :func:`time_fn`).
        fields: columns put first in every row (the shape, the stage...).
        rtol: relative tolerance of the default check.
        atol: absolute tolerance of the default check.
        check: ``check(name, got, want) -> None or message``; default :func:`check_close` with ``rtol``, ``atol``.
        collect: turns a call's return value into what is compared (for functions that work in place); default
            the return value itself. It is applied to the checked calls only, never to the timed ones.
        prepare: called before each checked call and before each timing (to restore state changed in place).
        timer: keyword arguments of :func:`time_fn` (``warmup``, ``rep``).

    Returns:
        One row per function, baseline first: ``fields``, ``provider``, ``check`` (``"ok"`` or the message) and,
        when timed, ``median_ms``, ``p20_ms``, ``p80_ms`` and ``speedup`` (baseline median / its median).
    """
    if check is None:

        def check(name, got, want):
            return check_close(name, got, want, rtol=rtol, atol=atol)

    fields = fields or {}
    timer = timer or {}

    def call(fn):
        if prepare is not None:
            prepare()
        out = fn(*inputs)
        return out if collect is None else collect(out)

    def timed(fn):
        if prepare is not None:
            prepare()
        return time_fn(lambda: fn(*inputs), device, **timer)

    base_name, base_fn = baseline
    want = call(base_fn)
    t_base = timed(base_fn)
    rows = [dict(fields, provider=base_name, check="ok", **t_base, speedup=1.0)]
    for name, fn in providers:
        try:
            err = check(name, call(fn), want)
        except Exception as exc:  # a provider that cannot run is reported, not timed
            err = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if err is not None:
            rows.append(dict(fields, provider=name, check=err))
            continue
        t = timed(fn)
        rows.append(dict(fields, provider=name, check="ok", **t, speedup=t_base["median_ms"] / t["median_ms"]))
    return rows


def add_traffic(rows: List[Dict[str, object]], nbytes: int, bandwidth: Optional[float] = None) -> None:
    """Add the memory-traffic columns to every timed row, in place.

    Columns: ``MB`` (``nbytes`` / 1e6), ``GB/s`` (``nbytes`` / median) and, given a copy bandwidth, ``floor_ms``
    (the time ``nbytes`` take at that bandwidth) and ``x_floor`` (median / floor).

    Args:
        rows: rows from :func:`run_providers`; those without ``median_ms`` are left alone.
        nbytes: the bytes one call has to move.
        bandwidth: bytes per second from :func:`copy_bandwidth`, or None.
    """
    for row in rows:
        if "median_ms" not in row:
            continue
        row["MB"] = nbytes / 1e6
        row["GB/s"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
        if bandwidth:
            row["floor_ms"] = nbytes / bandwidth * 1e3
            row["x_floor"] = row["median_ms"] / row["floor_ms"]


def print_table(title: str, rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    """Print (and return) a markdown table of ``rows`` restricted to ``columns``.

    Args:
        title: the heading.
        rows: the table rows; a missing column is left empty.
        columns: the columns, in order.

    Returns:
        The printed text.
    """

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def append_jsonl(out: str, name: str, records: List[Dict[str, object]], machine: str) -> str:
    """Append ``records``, each with the machine line and a timestamp, to ``<out>/<name>.jsonl``.

    Args:
        out: the results folder.
        name: the file's stem.
        records: the rows to append.
        machine: the :func:`machine_line` of the run.

    Returns:
        The file's path.
    """
    path = os.path.join(out, f"{name}.jsonl")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps({"machine": machine, "time": stamp, **r}) + "\n")
    return path


def prepare_out(out: str, jsonl: Optional[str] = None) -> Optional[str]:
    """Create the results folder and check that files can be written in it.

    Args:
        out: the folder.
        jsonl: stem of a JSON-lines file that will be appended to; when it exists, it must open for appending.

    Returns:
        None when the folder is usable, else the reason it is not.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        return "Not a directory"
    try:
        os.makedirs(out, exist_ok=True)
        # Creating a file is the only check that holds on every file system (permission bits, read-only mounts).
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check-")
        os.close(fd)
        os.remove(probe)
        path = os.path.join(out, f"{jsonl}.jsonl") if jsonl else None
        if path is not None and os.path.exists(path):
            with open(path, "a"):
                pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    return device


def bench_parser(
    name: str, doc: str, *, device: str = "cpu", quick: str = "small sizes, few repetitions"
) -> argparse.ArgumentParser:
    """The argument parser of a benchmark, with the options every benchmark has.

    Options: ``--device``, ``--quick``, ``--threads N``, ``--no-save`` and ``--out DIR``. The benchmark adds its
    own before handing the parser to :func:`bench_main`.

    Args:
        name: the module's name (``bench_ogm_ge``).
        doc: the module's docstring; its first line describes the command.
        device: the default device (``cuda`` for a benchmark of GPU kernels).
        quick: what ``--quick`` does.

    Returns:
        The ``argparse.ArgumentParser``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m agm_fast.benchmarks.{name}", description=doc.splitlines()[0])
    parser.add_argument("--device", type=_device, default=device, help=f"cpu or cuda (default {device})")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-save", action="store_true", help="write no result files")
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"folder of the result files (default {DEFAULT_OUT} under the current directory)",
    )
    return parser


@dataclass
class Outcome:
    """What a benchmark run returns to :func:`bench_main`.

    Attributes:
        records: rows appended as JSON lines to ``<out>/<name>.jsonl``.
        failed: whether a provider failed its check (the exit status is then 1).
        markdown: ``(file name, text)`` written under ``<out>``, or None.
    """

    records: List[Dict[str, object]]
    failed: bool
    markdown: Optional[Tuple[str, str]] = None


def bench_main(
    name: str,
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]],
    body: Callable[[argparse.Namespace, torch.device, str], Outcome],
    *,
    needs_cuda: bool = False,
) -> int:
    """Parse the command line, check the device and the output folder, run the benchmark, write its results.

    Nothing runs when the output folder cannot be written: that is reported in one line on stderr.

    Args:
        name: the module's name (``bench_ogm_ge``); the JSON lines go to ``<out>/<name without bench_>.jsonl``.
        parser: from :func:`bench_parser`, with the benchmark's own options added.
        argv: command-line arguments (default ``sys.argv[1:]``).
        body: ``body(args, device, machine_line) -> Outcome`` runs the benchmark and prints its tables;
            ``args.command`` holds the command line, for the markdown.
        needs_cuda: the benchmark times GPU kernels: without a CUDA device it says so and returns 0.

    Returns:
        The exit status: 0, 1 when a provider failed its check, 2 when ``--out`` cannot be written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    device = args.device
    if needs_cuda and (device.type != "cuda" or not torch.cuda.is_available()):
        print(f"{name} needs a CUDA GPU (it times the Triton kernels); none is available, nothing to do.")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected a positive count, got {args.threads}")
        torch.set_num_threads(args.threads)
    stem = name[len("bench_") :] if name.startswith("bench_") else name
    if not args.no_save:
        reason = prepare_out(args.out, stem)
        if reason is not None:
            print(f"{name}: error: --out {args.out} is not writable ({reason})", file=sys.stderr)
            return 2
    args.command = " ".join([f"python -m agm_fast.benchmarks.{name}"] + argv)

    machine = machine_line(device)
    print(machine)
    outcome = body(args, device, machine)
    if not args.no_save:
        path = append_jsonl(args.out, stem, outcome.records, machine)
        print(f"appended {len(outcome.records)} records to {path}")
        if outcome.markdown is not None:
            path = os.path.join(args.out, outcome.markdown[0])
            with open(path, "w") as f:
                f.write(outcome.markdown[1])
            print(f"wrote {path}")
    return 1 if outcome.failed else 0


def kernel_sizes(quick: bool) -> List[Tuple[int, int, int]]:
    """The ``(B, C, M)`` shapes of the score-kernel benchmarks.

    Args:
        quick: only B 512, C 101, M in {2, 4}.

    Returns:
        B in {64, 512, 4096} x C in {6, 101, 309} x M in {2, 3, 4, 6}, or the two quick shapes.
    """
    if quick:
        return [(512, 101, 2), (512, 101, 4)]
    return [(B, C, M) for B in (64, 512, 4096) for C in (6, 101, 309) for M in (2, 3, 4, 6)]


def kernel_bench_main(
    name: str,
    doc: str,
    argv: Optional[Sequence[str]],
    *,
    op: str,
    run: Callable[[torch.device, List[Tuple[int, int, int]], torch.dtype, float], List[Dict[str, object]]],
    title: Callable[[str], str],
    columns: Sequence[str],
    markdown: str,
) -> int:
    """The ``main`` of a benchmark of one op's Triton kernels over :func:`kernel_sizes` (needs a CUDA GPU).

    Adds ``--dtype`` (float32, bfloat16 or float16 logits) to :func:`bench_parser`'s options, measures the copy
    bandwidth for the ``floor_ms`` column, prints the op's backend and one table.

    Args:
        name: the module's name (``bench_shapley``).
        doc: the module's docstring.
        argv: command-line arguments (default ``sys.argv[1:]``).
        op: the op's name in the printed backend line.
        run: ``run(device, sizes, dtype, bandwidth) -> rows`` checks and times the providers.
        title: the table's title for a ``--dtype`` name.
        columns: the table's columns.
        markdown: stem of the markdown file of a full run (``<markdown>-<dtype>.md``).

    Returns:
        The exit status of :func:`bench_main`.
    """
    parser = bench_parser(name, doc, device="cuda", quick="B 512, C 101, M in {2, 4} only")
    parser.add_argument("--dtype", choices=sorted(KERNEL_DTYPES), default="float32", help="dtype of the logits")

    def body(args: argparse.Namespace, device: torch.device, machine: str) -> Outcome:
        from agm_fast import _backend

        backend = _backend.select(device)
        bandwidth = copy_bandwidth(device)
        print(f"{op} backend: {backend} | logits {args.dtype} | copy bandwidth {bandwidth / 1e9:.0f} GB/s")
        rows = run(device, kernel_sizes(args.quick), KERNEL_DTYPES[args.dtype], bandwidth)
        table = print_table(title(args.dtype), rows, columns)
        text = f"{machine}\n\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; command: {args.command}\n\n{table}"
        return Outcome(
            records=[dict(r, backend=backend, dtype=args.dtype) for r in rows],
            failed=any(r["check"] != "ok" for r in rows),
            markdown=None if args.quick else (f"{markdown}-{args.dtype}.md", text),
        )

    return bench_main(name, parser, argv, body, needs_cuda=True)
