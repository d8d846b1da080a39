"""``agm-fast train`` / ``agm-fast bench``: outputs, exact resume, the --data path and every bad-argument error."""

import csv
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from agm_fast import cli

# Small encoders and big batches keep every run to a fraction of a second per epoch on CPU.
SMALL = ["--hidden", "16", "--feature-dim", "8", "--batch-size", "128"]
TIME_KEYS = ("step_ms", "epoch_s", "time_per_step_ms", "time_per_step_ms_median")


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def without_times(rows):
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


def test_train_end_to_end_writes_sane_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(["train", "--epochs", 2, "--out", out, *SMALL], capsys)
    assert rc == 0, err
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for col in ("val_acc_fac", "val_acc_zer", "coeff_fac", "coeff_zer", "step_ms"):
        assert all(math.isfinite(float(r[col])) for r in rows), col
    assert "epoch 1/2" in stdout and "mono fac" in stdout and "coeff fac" in stdout and "ms/step" in stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "agm" and summary["views"] == ["fac", "zer"]
    # Ten balanced classes: chance is 0.1.
    assert summary["test_acc"] > 0.5
    assert set(summary["test_acc_per_modality"]) == {"fac", "zer"}
    assert all(0 <= a <= 1 for a in summary["test_acc_per_modality"].values())
    assert set(summary["competition_strength"]) == {"fac", "zer"}
    assert all(math.isfinite(v) and v >= 0 for v in summary["competition_strength"].values())
    assert summary["time_per_step_ms"] > 0

    from matplotlib.image import imread

    img = imread(out / "curves.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 800
    # Not a blank canvas.
    assert float(np.asarray(img).std()) > 0.01

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and {"model", "optimizer", "method", "torch_rng", "data_rng"} <= set(ckpt)


@pytest.mark.parametrize("method", ["joint", "agm", "ogm_ge", "opm", "cggm", "mslr", "mses"])
def test_resume_matches_an_uninterrupted_run(tmp_path, capsys, method):
    extra = ["--method", method, "--seed", 3, "--no-plot", *SMALL]
    if method == "opm":
        # The journal's warm-up would keep OPM from dropping anything in a 4-epoch run.
        extra += ["--warmup-epochs", 1]
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert run(["train", "--epochs", 4, "--out", straight, *extra], capsys)[0] == 0
    assert run(["train", "--epochs", 2, "--out", parts, *extra], capsys)[0] == 0
    rc, stdout, err = run(["train", "--epochs", 4, "--out", parts, "--resume", *extra], capsys)
    assert rc == 0, err
    assert "resuming from" in stdout
    a, b = read_csv(straight / "metrics.csv"), read_csv(parts / "metrics.csv")
    assert len(a) == 4
    assert without_times(a) == without_times(b)
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((parts / "summary.json").read_text())
    assert {k: v for k, v in sa.items() if k not in TIME_KEYS} == {k: v for k, v in sb.items() if k not in TIME_KEYS}
    ckpt = torch.load(parts / "checkpoint.pt", weights_only=True)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    model_params = [k for k in ckpt["model"] if not k.endswith(buffers)]
    # The optimizer's first group is exactly the model; CGGM's heads are a second group of their own.
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups[0]["params"]) == len(model_params)
    assert len(groups) == (2 if method == "cggm" else 1)
    if method in ("agm", "ogm_ge", "opm", "cggm"):
        # The method did act: some coefficient differs from 1.
        assert any(float(r[c]) != 1.0 for r in a for c in r if c.startswith("coeff_"))


def test_a_registered_method_is_on_the_command_line(tmp_path, capsys):
    from toy_method import DampStrongest

    from agm_fast import methods

    methods.register("damp_strongest", DampStrongest)
    try:
        help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
        assert "damp_strongest" in help_text and "--factor" in help_text
        assert "(default 0.5)" in help_text
        out = tmp_path / "run"
        argv = ["train", "--method", "damp_strongest", "--factor", 0.25, "--modulation_starts", 1, "--epochs", 2]
        rc, _, err = run([*argv, "--out", out, "--no-plot", *SMALL], capsys)
        assert rc == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == "damp_strongest" and summary["config"]["factor"] == 0.25
        rows = read_csv(out / "metrics.csv")
        assert float(rows[0]["coeff_fac"]) == 1.0 and float(rows[0]["coeff_zer"]) == 1.0
        assert {float(rows[1]["coeff_fac"]), float(rows[1]["coeff_zer"])} & {0.25}
        # The method's own validation reaches the user as one line naming the flag.
        check_error(*run([*argv, "--factor", 2, "--out", tmp_path / "bad", *SMALL], capsys)[::2],
                    "--factor: expected a number in (0, 1]")
        # Its option belongs to it alone.
        check_error(*run(["train", "--method", "agm", "--factor", 0.5, "--out", out, *SMALL], capsys)[::2],
                    "--factor applies to --method damp_strongest")
    finally:
        methods.unregister("damp_strongest")
    assert "damp_strongest" not in cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def make_npz(path, n=150, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    strong = np.eye(3)[y] * 2 + rng.normal(size=(n, 3))
    weak = np.concatenate([np.eye(3)[y] * 0.5 + rng.normal(size=(n, 3)), rng.normal(size=(n, 2))], axis=1)
    np.savez(path, x_strong=strong.astype(np.float32), x_weak=weak, y=y)


def test_train_on_a_user_npz(tmp_path, capsys):
    data = tmp_path / "feats.npz"
    make_npz(data)
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--epochs", 4, "--out", out, "--no-plot", *SMALL, "--batch-size", 16]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["views"] == ["strong", "weak"] and summary["data"] == "feats.npz"
    assert summary["test_acc"] > 0.6
    assert len(read_csv(out / "metrics.csv")) == 4
    assert "90 train, 30 val, 30 test, 3 classes" in stdout


def test_reference_flag_aliases(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--modulation", "OGM_GE", "--fusion_method", "gated", "--modulation_starts", 1, "--epochs", 2]
    rc, _, err = run([*argv, "--alpha", 0.5, "--out", out, *SMALL], capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "ogm_ge" and summary["fusion"] == "gated"
    assert summary["config"]["alpha"] == 0.5 and summary["config"]["modulation_starts"] == 1
    rows = read_csv(out / "metrics.csv")
    # Epoch 1 is epoch index 0, before the window: no modulation.
    assert float(rows[0]["coeff_fac"]) == 1.0 and float(rows[0]["coeff_zer"]) == 1.0


@pytest.mark.parametrize(
    "switches, expected",
    [
        (
            ["--strategy", "sequential", "--shapley", "exact", "--cap", "none", "--hold-last", "--modulation_ends", 0],
            {"strategy": "sequential", "shapley": "exact", "cap": None, "hold_last": True, "modulation_ends": 0},
        ),
        (
            ["--strategy", "factorized", "--masked-mode", "train", "--shapley", "sampled", "--permutations", 3],
            {"strategy": "factorized", "masked_mode": "train", "shapley": "sampled", "permutations": 3},
        ),
        (
            ["--strategy", "batched", "--alpha", 2.0, "--cap", 0.5, "--fusion", "mlp"],
            {"strategy": "batched", "alpha": 2.0, "cap": 0.5, "fusion": "mlp"},
        ),
    ],
)
def test_agm_parity_switches_reach_the_method(tmp_path, capsys, switches, expected):
    out = tmp_path / "run"
    rc, _, err = run(["train", "--method", "agm", "--epochs", 2, "--out", out, "--no-plot", *SMALL, *switches], capsys)
    assert rc == 0, err
    config = json.loads((out / "summary.json").read_text())["config"]
    assert {k: config[k] for k in expected} == expected
    rows = read_csv(out / "metrics.csv")
    if config["hold_last"]:
        # Window [0, 0] with hold_last: every step of epoch 2 keeps the last coefficients of epoch 1, not 1.
        held = float(rows[1]["coeff_fac"])
        assert held != 1.0 and math.isclose(held, float(rows[1]["coeff_mean_fac"]), rel_tol=1e-6)
    if config["cap"] == 0.5:
        # c_m = exp(alpha * min(rbar - r, cap)) <= exp(2 * 0.5).
        assert max(float(r[f"coeff_mean_{n}"]) for r in rows for n in ("fac", "zer")) <= math.exp(1.0) + 1e-6


def test_all_six_views(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--views", "fac,fou,kar,pix,zer,mor", "--epochs", 1, "--out", out, "--no-plot", *SMALL]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["test_acc_per_modality"]) == ["fac", "fou", "kar", "pix", "zer", "mor"]
    assert summary["test_acc"] > 0.5


def check_error(rc, err, fragment):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("agm-fast: error: ") and "Traceback" not in err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--views", "fac,foo"], "unknown view 'foo'"),
        (["train", "--views", "fac"], "at least 2 views (M >= 2)"),
        (["train", "--views", "fac,fac"], "must not repeat"),
        (["train", "--method", "cggm", "--fusion", "sum"], "--method cggm does not support --fusion sum"),
        (["train", "--views", "fac,zer,mor", "--method", "cggm", "--fusion", "film"], "only for 2 views, got 3"),
        (["train", "--method", "ogm", "--conv-only"], "selects no 4-D (conv) parameter"),
        (["train", "--method", "agm", "--continuous"], "--continuous applies to --method ogm/ogm_ge"),
        (["train", "--method", "agm", "--modulation", "OGM"], "--modulation OGM means --method ogm"),
        (["train", "--fusion", "sum", "--fusion_method", "concat"], "disagree"),
        (["train", "--method", "agm", "--masked-mode", "train", "--strategy", "batched"], "--masked-mode: 'train'"),
        (["train", "--method", "nope"], "invalid choice: 'nope'"),
        (["train", "--epochs", "0"], "--epochs must be at least 1"),
        (["train", "--cap", "big"], "expected a number or 'none'"),
        (["train", "--method", "mslr", "--lr-scales", "1,2,3"], "--lr-scales: expected 2 values"),
        ([], "choose a command"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, argv, fragment):
    if argv:
        argv = argv + ["--out", str(tmp_path / "run"), "--epochs" if "--epochs" not in argv else "--seed", "1"]
    check_error(*run(argv, capsys)[::2], fragment)


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    check_error(*run(["train", "--out", blocker / "sub", *SMALL], capsys)[::2], "is not a writable folder")


def test_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    check_error(*run(["train", "--resume", "--out", out, *SMALL], capsys)[::2], "no checkpoint at")
    out.mkdir(exist_ok=True)
    (out / "checkpoint.pt").write_bytes(b"\x00garbage" * 100)
    check_error(*run(["train", "--resume", "--out", out, *SMALL], capsys)[::2], "corrupt or unreadable")
    torch.save({"epoch": 1}, out / "checkpoint.pt")
    check_error(*run(["train", "--resume", "--out", out, *SMALL], capsys)[::2], "not an agm-fast training checkpoint")
    assert run(["train", "--epochs", 1, "--out", out, "--method", "joint", "--no-plot", "--overwrite", *SMALL],
               capsys)[0] == 0
    argv = ["train", "--out", out, "--resume", "--epochs", 2]
    check_error(*run([*argv, "--lr", 0.2], capsys)[::2], "trained with lr=0.05")
    check_error(*run([*argv, "--method", "agm"], capsys)[::2], "trained with method='joint'")
    check_error(*run(["train", "--out", out, "--resume", "--epochs", 0], capsys)[::2], "--epochs must be at least 1")


def test_resume_takes_the_options_it_is_not_given(tmp_path, capsys):
    out = tmp_path / "run"
    first = ["train", "--method", "ogm_ge", "--views", "pix,mor", "--alpha", 0.3, "--epochs", 3, "--no-plot"]
    assert run([*first, "--out", out, *SMALL], capsys)[0] == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["epoch"], ckpt["history"] = 1, ckpt["history"][:1]
    torch.save(ckpt, out / "checkpoint.pt")
    rc, stdout, err = run(["train", "--out", out, "--resume"], capsys)
    assert rc == 0, err
    assert "resuming from" in stdout and "at epoch 1/3" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "ogm_ge" and summary["views"] == ["pix", "mor"] and summary["epochs"] == 3
    assert summary["config"]["alpha"] == 0.3 and summary["config"]["hidden"] == 16
    assert len(read_csv(out / "metrics.csv")) == 3


def test_bad_data_files(tmp_path, capsys):
    out = ["--out", tmp_path / "run", *SMALL]
    check_error(*run(["train", "--data", tmp_path / "missing.npz", *out], capsys)[::2], "does not exist")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    check_error(*run(["train", "--data", garbage, *out], capsys)[::2], "not a readable .npz")
    one = tmp_path / "one.npz"
    np.savez(one, x_a=np.zeros((30, 2)), y=np.arange(30) % 2)
    check_error(*run(["train", "--data", one, *out], capsys)[::2], "M >= 2 needed")
    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x_a=np.zeros((30, 2)), x_b=np.zeros((30, 2)))
    check_error(*run(["train", "--data", no_y, *out], capsys)[::2], "no label array 'y'")
    make_npz(tmp_path / "ok.npz")
    check_error(*run(["train", "--data", tmp_path / "ok.npz", "--views", "strong,fac", *out], capsys)[::2],
                "unknown view 'fac'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu(tmp_path, capsys):
    check_error(*run(["train", "--device", "cuda", "--out", tmp_path], capsys)[::2], "no CUDA device")


def test_module_entry_point_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "agm_fast", "train", "--views", "fac,xyz"], capture_output=True, text=True, timeout=120
    )
    check_error(proc.returncode, proc.stderr, "unknown view 'xyz'")


def test_bench_calls_the_benchmark_modules(monkeypatch, capsys):
    calls = []
    for name in ("bench_agm_step", "bench_ogm_ge"):
        mod = types.ModuleType(f"agm_fast.benchmarks.{name}")
        mod.main = lambda argv, name=name: calls.append((name, list(argv))) or 0
        monkeypatch.setitem(sys.modules, f"agm_fast.benchmarks.{name}", mod)
    rc, _, err = run(["bench", "--device", "cpu", "--quick"], capsys)
    assert rc == 0, err
    argv = ["--device", "cpu", "--quick"]
    assert calls == [("bench_agm_step", argv), ("bench_ogm_ge", argv)]
    calls.clear()
    rc, _, err = run(["bench", "--device", "cpu", "--only", "ogm_ge", "--threads", 2, "--no-save"], capsys)
    assert rc == 0, err
    assert calls == [("bench_ogm_ge", ["--device", "cpu", "--threads", "2", "--no-save"])]


def test_bench_reports_a_missing_module(monkeypatch, capsys):
    real = cli.importlib.import_module

    def fail(name, *args):
        if name.endswith("bench_agm_step"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", fail)
    check_error(*run(["bench", "--only", "agm"], capsys)[::2], "agm_fast.benchmarks.bench_agm_step is not importable")
