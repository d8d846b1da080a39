"""Shared benchmark harness: machine line, timing, tables and JSON lines.

GPU timing uses ``triton.testing.do_bench`` (median, p20, p80); CPU timing runs the function repeatedly with
``time.perf_counter`` and reports the same quantiles. Every provider is checked against the baseline before it is
timed (:func:`check_close`); a provider that is wrong is reported as such and not timed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_sha() -> str:
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


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 20) -> Dict[str, float]:
    """Time ``fn``; returns ``{"median_ms", "p20_ms", "p80_ms"}``."""
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
    t = torch.tensor(times)
    return {
        "median_ms": float(t.median()),
        "p20_ms": float(t.quantile(0.2)),
        "p80_ms": float(t.quantile(0.8)),
    }


def check_close(name: str, got, want, rtol: float = 1e-4, atol: float = 1e-5) -> Optional[str]:
    """None when ``got`` matches ``want`` (tensors or sequences of tensors), else a message."""
    if isinstance(got, torch.Tensor):
        got, want = [got], [want]
    for i, (g, w) in enumerate(zip(got, want)):
        try:
            torch.testing.assert_close(g.float().cpu(), w.float().cpu(), rtol=rtol, atol=atol)
        except AssertionError as exc:
            return f"{name}: output {i} differs from the baseline: {str(exc).splitlines()[0]}"
    return None


def print_table(title: str, rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    """Print (and return) a markdown table of ``rows`` restricted to ``columns``."""

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


def append_jsonl(name: str, records: List[Dict[str, object]], machine: str) -> str:
    """Append ``records`` (with the machine line and a timestamp) to ``benchmarks/results/<name>.jsonl``."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.jsonl")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps({"machine": machine, "time": stamp, **r}) + "\n")
    return path
