"""examples/backend_step.py, as CI runs it: a caller that owns the forward pass, the balancing state and the checkpoint,
on one process and under torchrun with 2 gloo ranks. A run resumed from its epoch-2 checkpoint ends on the same line as
the straight run, and the straight run agrees with the same training through ``agm_fast.methods``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "backend_step.py"
# Printed with 7 significant digits; the two paths run the same float32 arithmetic in the same order, so they agree
# to the last printed digit today. The tolerance allows float32 rounding, never a different modulation.
RTOL = 1e-5


def _run(*args: str, cwd: Path, ranks: int = 1) -> str:
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([*launch, str(EXAMPLE), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def _last(stdout: str, prefix: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert lines, stdout
    return lines[-1]


def _numbers(line: str) -> list:
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", line.split(":", 1)[1])]


def _check(method: str, tmp_path: Path, ranks: int, *extra: str) -> None:
    ck = tmp_path / "ck"
    straight = _run("--method", method, "--epochs", "3", "--checkpoint", str(ck), "--compare", *extra,
                    cwd=tmp_path, ranks=ranks)
    line = _last(straight, "epoch 3/3")
    library = _last(straight, "library epoch 3/3")
    mine, theirs = _numbers(line), _numbers(library)
    assert len(mine) == len(theirs) >= 4
    for a, b in zip(mine, theirs):
        assert abs(a - b) <= RTOL * max(abs(b), 1.0), (line, library)
    assert sorted(p.name for p in ck.iterdir()) == ["epoch-1.pt", "epoch-2.pt", "epoch-3.pt"]
    resumed = _run("--method", method, "--epochs", "3", "--resume", str(ck / "epoch-2.pt"), *extra,
                   cwd=tmp_path, ranks=ranks)
    assert "resumed from" in resumed and "epoch 1/3" not in resumed and "epoch 2/3" not in resumed
    assert _last(resumed, "epoch 3/3") == line


@pytest.mark.parametrize("method,extra", [("agm", ("--modalities", "3")), ("ogm_ge", ())])
def test_backend_example_one_process_matches_the_library_and_resumes_exactly(method, extra, tmp_path):
    _check(method, tmp_path, 1, *extra)


@pytest.mark.parametrize("method", ["agm", "ogm_ge"])
def test_backend_example_under_torchrun_matches_the_library_and_resumes_exactly(method, tmp_path):
    _check(method, tmp_path, 2)
