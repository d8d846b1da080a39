"""``agm-fast train`` under bad values, divergence, I/O faults, signals and collisions: one line, the data kept."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from agm_fast import cli
from agm_fast.cli import run as run_mod

SMALL = ["--hidden", "16", "--feature-dim", "8", "--batch-size", "128", "--no-plot"]


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line(err, prefix="agm-fast: "):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def rows_of(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--cap", "-5"], "--cap: expected a finite number > 0.0 or None, got -5.0"),
        (["--cap", "nan"], "--cap: expected a finite number > 0.0 or None, got nan"),
        (["--alpha", "inf"], "--alpha: expected a finite number >= 0.0, got inf"),
        (["--method", "cggm", "--rho", "0"], "--rho: expected a finite number > 0.0, got 0.0"),
        (["--method", "cggm", "--rho", "inf"], "--rho: expected a finite number > 0.0, got inf"),
        (["--method", "cggm", "--lam", "-1"], "--lam: expected a finite number >= 0.0, got -1.0"),
        (["--method", "opm", "--lam", "nan"], "--lam: expected a finite number >= 0.0, got nan"),
        (["--method", "mslr", "--lr-scales=-1,1"], "--lr-scales[0]: expected a finite number > 0.0, got -1.0"),
        (["--weight-decay", "nan"], "--weight-decay a finite number >= 0"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--seed", str(2**64)], "--seed must be an int in [0, 2**32)"),
        (["--seed", str(2**63)], "--seed must be an int in [0, 2**32)"),
        (["--seed", "-1"], "--seed must be an int in [0, 2**32)"),
        (["--resume", "--overwrite"], "choose one"),
    ],
)
def test_bad_values_stop_before_training(tmp_path, capsys, argv, fragment):
    out = tmp_path / "run"
    rc, stdout, err = run(["train", "--out", out, "--epochs", 1, *SMALL, *argv], capsys)
    assert rc == 2
    assert fragment in one_line(err, "agm-fast: error: ")
    assert "epoch 1/1" not in stdout


def _poison_at(monkeypatch, epoch, step):
    """Make the parameters non-finite just before step ``step`` (from 1) of epoch ``epoch`` (from 0)."""
    real = run_mod.methods.training_step
    calls = {}

    def step_fn(method, inputs, target, ep, optimizer, **kwargs):
        calls[ep] = calls.get(ep, 0) + 1
        if ep == epoch and calls[ep] == step:
            with torch.no_grad():
                for enc in method.encoders:
                    for p in enc.parameters():
                        p.fill_(float("inf"))
        return real(method, inputs, target, ep, optimizer, **kwargs)

    monkeypatch.setattr(run_mod.methods, "training_step", step_fn)


@pytest.mark.parametrize("method", ["agm", "ogm_ge", "cggm"])
def test_divergence_stops_at_once_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, monkeypatch, method):
    out = tmp_path / "run"
    _poison_at(monkeypatch, epoch=1, step=2)
    rc, stdout, err = run(["train", "--method", method, "--out", out, "--epochs", 3, *SMALL], capsys)
    assert rc == 3
    line = one_line(err, "agm-fast: diverged: ")
    assert "training diverged at epoch 2, step 2" in line and "checkpoint of epoch 1" in line
    assert "epoch 2/3" not in stdout
    assert len(rows_of(out / "metrics.csv")) == 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["epoch"] == 2
    assert summary["diverged"]["at"] == "step 2" and summary["epochs_completed"] == 1
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    # The kept checkpoint resumes (the run diverges again at the same place only if poisoned again).
    monkeypatch.undo()
    rc, stdout, err = run(["train", "--method", method, "--out", out, "--epochs", 2, "--resume", *SMALL], capsys)
    assert rc == 0, err
    assert len(rows_of(out / "metrics.csv")) == 2


def test_a_legal_but_huge_learning_rate_diverges_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run(["train", "--lr", "1e6", "--out", out, "--epochs", 3, *SMALL], capsys)
    assert rc == 3
    assert "training diverged at epoch" in one_line(err, "agm-fast: diverged: ")
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_tmp(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/7: "
                "file write failed"
            )
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(run_mod.torch, "save", save)
    rc, _, err = run(["train", "--out", out, "--epochs", 3, *SMALL], capsys)
    assert rc == 2
    line = one_line(err, "agm-fast: error: ")
    assert "could not write the checkpoint" in line and "disk may be full" in line
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.csv"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_an_out_folder_that_becomes_unwritable(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("metrics.csv") and os.path.exists(dst):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rc, _, err = run(["train", "--out", out, "--epochs", 3, *SMALL], capsys)
    assert rc == 2
    line = one_line(err, "agm-fast: error: ")
    assert "could not write metrics.csv" in line and "Permission denied" in line


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--out", out, "--epochs", 1, *SMALL], capsys)[0] == 0
    before = (out / "metrics.csv").read_text()
    rc, _, err = run(["train", "--out", out, "--epochs", 1, "--method", "joint", *SMALL], capsys)
    assert rc == 2
    line = one_line(err, "agm-fast: error: ")
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "metrics.csv").read_text() == before
    rc, _, err = run(["train", "--out", out, "--epochs", 1, "--method", "joint", "--overwrite", *SMALL], capsys)
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["method"] == "joint"


def test_resume_checks_say_what_the_checkpoint_holds(tmp_path, capsys):
    out = tmp_path / "run"
    first = ["train", "--out", out, "--epochs", 1, "--method", "agm", "--strategy", "batched", *SMALL]
    assert run(first, capsys)[0] == 0
    rc, _, err = run(["train", "--out", out, "--epochs", 2, "--resume", "--method", "ogm", *SMALL], capsys)
    line = one_line(err, "agm-fast: error: ")
    assert rc == 2 and "trained with method='agm'" in line and "--strategy" not in line


def test_resume_refuses_data_whose_values_changed(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    data = tmp_path / "d.npz"
    np.savez(data, x_a=rng.normal(size=(120, 4)), x_b=rng.normal(size=(120, 3)), y=y)
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--out", out, *SMALL, "--batch-size", 16]
    assert run([*argv, "--epochs", 1], capsys)[0] == 0
    np.savez(data, x_a=rng.normal(size=(120, 4)), x_b=rng.normal(size=(120, 3)), y=y)
    rc, _, err = run([*argv, "--epochs", 2, "--resume"], capsys)
    assert rc == 2 and "the data differ from those the checkpoint was trained on" in one_line(err)


def test_labels_that_are_ids_are_refused(tmp_path, capsys):
    data = tmp_path / "ids.npz"
    y = np.array([0, 1, 999999] * 40)
    np.savez(data, x_a=np.random.rand(120, 4), x_b=np.random.rand(120, 3), y=y)
    rc, _, err = run(["train", "--data", data, "--out", tmp_path / "run", *SMALL], capsys)
    line = one_line(err, "agm-fast: error: ")
    assert rc == 2 and "expected class indices 0..C-1 with few gaps" in line and "np.unique" in line


def test_a_npy_file_named_npz(tmp_path, capsys):
    data = tmp_path / "x.npz"
    with open(data, "wb") as fh:
        np.save(fh, np.zeros((4, 2)))
    rc, _, err = run(["train", "--data", data, "--out", tmp_path / "run", *SMALL], capsys)
    assert rc == 2 and "as a .npy file does" in one_line(err)


def _start(out, *extra):
    argv = [sys.executable, "-m", "agm_fast", "train", "--out", str(out), "--epochs", "50", "--batch-size", "2",
            "--hidden", "16", "--feature-dim", "8", "--no-plot", "--method", "joint", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _wait_for_line(proc, fragment):
    for line in proc.stdout:
        if fragment in line:
            return
    raise AssertionError(f"the run ended before printing {fragment!r}: {proc.stderr.read()}")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_with_one_line_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    try:
        _wait_for(lambda: (out / "checkpoint.pt").exists())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    line = one_line(err)
    assert "interrupted by SIGTERM" in line and "continue with --resume" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] >= 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_before_the_first_checkpoint_does_not_promise_a_resume(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    try:
        _wait_for_line(proc, "| device ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    line = one_line(err)
    assert "interrupted by SIGINT during epoch 1" in line and "no epoch had finished" in line
    assert "--resume" not in line.replace("without --resume", "")


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks")
def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _start(out)
    try:
        _wait_for_line(proc, "| device ")
        rc, _, err = run(["train", "--out", out, "--epochs", 1, "--overwrite", *SMALL], capsys)
        assert rc == 2
        line = one_line(err, "agm-fast: error: ")
        assert f"is in use by another agm-fast run (pid {proc.pid})" in line
    finally:
        proc.kill()
        proc.communicate()
    # Once the first run is gone, its lock is too.
    assert run(["train", "--out", out, "--epochs", 1, "--overwrite", *SMALL], capsys)[0] == 0
    assert math.isfinite(json.loads((out / "summary.json").read_text())["test_acc"])


def test_a_refused_flag_writes_nothing_and_a_finished_run_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "refused"
    rc, _, err = run(["train", "--out", out, "--cap", "-5", *SMALL], capsys)
    assert rc == 2 and "--cap" in err
    assert not out.exists()
    out = tmp_path / "done"
    rc, _, err = run(["train", "--out", out, "--epochs", 1, "--no-plot", *SMALL], capsys)
    assert rc == 0, err
    assert not (out / ".agm-fast.lock").exists()
