"""``agm-fast compare``: a tiny grid end to end, its table, CSV and plot, the per-seed differences, resume."""

import csv
import json

import numpy as np
import pytest

from agm_fast import cli
from agm_fast.cli import compare as compare_mod
from agm_fast.cli import compare_report

# A small generated set and small encoders: every run of the grid takes a fraction of a second.
DATA = ["--data", "synthetic", "--synthetic-rows", "240", "--synthetic-fast-dims", "16", "--synthetic-slow-dims", "16"]
SMALL = ["--hidden", "8", "--feature-dim", "4", "--batch-size", "64", "--epochs", "2"]
GRID = ["--methods", "joint,ogm_ge", "--seeds", "0,1", "--timing-rounds", "2", "--timing-steps", "2", *DATA, *SMALL]


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def results(out):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "grid"
    assert cli.main([*map(str, ["compare", *GRID, "--out", out])]) == 0
    return out


def test_tiny_grid_writes_table_csv_and_plot(grid):
    runs = results(grid)
    assert sorted(runs) == ["joint-seed0", "joint-seed1", "ogm_ge-seed0", "ogm_ge-seed1", "unimodal-seed0",
                            "unimodal-seed1"]
    assert all(r["status"] == "completed" for r in runs.values())
    text = (grid / "compare.md").read_text()
    for name in ("| joint |", "| ogm_ge |", "| fast alone |", "| slow alone |", "| unimodal ensemble |"):
        assert name in text
    assert "probe fast / ceiling" in text and "step time / joint" in text and "## Per row" in text
    # The command as given, less where the outputs went.
    assert "`agm-fast compare --methods joint,ogm_ge --seeds 0,1" in text and "--out" not in text

    rows = read_csv(grid / "compare.csv")
    assert len(rows) == 5 * 2
    by = {(r["name"], int(r["seed"])): r for r in rows}
    for seed in (0, 1):
        joint = runs[f"joint-seed{seed}"]["test_acc"]
        ogm = runs[f"ogm_ge-seed{seed}"]["test_acc"]
        uni = runs[f"unimodal-seed{seed}"]
        # The per-seed difference is that seed's accuracy minus joint's on the same seed.
        assert float(by[("ogm_ge", seed)]["delta_vs_joint"]) == pytest.approx(ogm - joint)
        assert float(by[("joint", seed)]["delta_vs_joint"]) == 0.0
        assert float(by[("unimodal ensemble", seed)]["test_acc"]) == pytest.approx(uni["ensemble_acc"])
        assert float(by[("unimodal ensemble", seed)]["delta_vs_joint"]) == pytest.approx(uni["ensemble_acc"] - joint)
        assert float(by[("slow alone", seed)]["test_acc"]) == pytest.approx(uni["test_acc"]["slow"])
        # The ceiling of a view is the probe of the encoder trained on that view alone, on every row.
        for r in rows:
            if int(r["seed"]) == seed:
                assert float(r["ceiling_slow"]) == pytest.approx(uni["probe"]["slow"])
        assert float(by[("ogm_ge", seed)]["probe_fast"]) == pytest.approx(runs[f"ogm_ge-seed{seed}"]["probe"]["fast"])
    assert float(by[("joint", 0)]["step_time_vs_joint"]) == 1.0
    assert float(by[("ogm_ge", 0)]["step_time_vs_joint"]) > 0

    from matplotlib.image import imread

    img = imread(grid / "compare.png")
    assert img.ndim == 3 and img.shape[1] > 800 and float(np.asarray(img).std()) > 0.01


def test_each_run_is_a_train_run_with_the_grid_options(grid):
    summary = json.loads((grid / "runs" / "ogm_ge-seed1" / "summary.json").read_text())
    assert summary["method"] == "ogm_ge" and summary["epochs"] == 2 and summary["views"] == ["fast", "slow"]
    assert summary["config"]["seed"] == 1 and summary["config"]["hidden"] == 8
    assert summary["test_acc"] == results(grid)["ogm_ge-seed1"]["test_acc"]


def fake(name, seed, acc, probe=None):
    return {"kind": "method", "name": name, "seed": seed, "status": "completed", "test_acc": acc,
            "probe": probe or {"a": 0.5, "b": 0.25}, "rows": {"train": 300, "val": 100, "test": 100}}


def fake_unimodal(seed, accs, ensemble, probe):
    return {"kind": "unimodal", "name": "unimodal", "seed": seed, "status": "completed", "test_acc": accs,
            "ensemble_acc": ensemble, "probe": probe, "rows": {"train": 300, "val": 100, "test": 100}}


def test_per_seed_differences_and_report_on_a_fake_grid(tmp_path):
    records = [
        fake("joint", 0, 0.50), fake("joint", 1, 0.60), fake("joint", 2, 0.70),
        fake("m", 0, 0.65), fake("m", 1, 0.70), fake("m", 2, 0.85, {"a": 0.5, "b": 0.75}),
        fake_unimodal(0, {"a": 0.4, "b": 0.3}, 0.55, {"a": 0.6, "b": 0.8}),
        fake_unimodal(1, {"a": 0.4, "b": 0.3}, 0.55, {"a": 0.6, "b": 0.8}),
        {"kind": "unimodal", "name": "unimodal", "seed": 2, "status": "diverged", "error": "x"},
    ]
    s = compare_mod.summarize(records, ["joint", "m"], [0, 1, 2], ["a", "b"], {"joint": 1.0, "m": 1.5})
    rows = {r["name"]: r for r in s["rows"]}
    assert list(rows) == ["joint", "m", "a alone", "b alone", "unimodal ensemble"]
    assert [rows["m"]["delta"][k] for k in (0, 1, 2)] == pytest.approx([0.15, 0.10, 0.15])
    assert rows["unimodal ensemble"]["delta"][0] == pytest.approx(0.05)
    assert rows["unimodal ensemble"]["delta"][2] is None and rows["unimodal ensemble"]["status"][2] == "diverged"
    assert rows["m"]["probe"]["b"][2] == 0.75 and rows["m"]["ceiling"]["b"][2] is None

    table = compare_mod.markdown_table(s)
    line = next(t for t in table.splitlines() if t.startswith("| m |"))
    # Mean ± sample std of 0.65, 0.70, 0.85; the per-seed differences; their mean; the probe against its ceiling.
    assert "| 73.3 ± 10.4 | +15.0 +10.0 +15.0 | +13.3 | 50.0 ± 0.0 / 60.0 | 41.7 ± 28.9 / 80.0 | 1.50 |" in line
    assert "(diverged)" in next(t for t in table.splitlines() if t.startswith("| unimodal ensemble |"))
    said = "\n".join(compare_mod.findings(s))
    assert "**m**: +13.3 points vs joint (better than joint on every seed)" in said
    assert "probe a 50.0 -> 50.0 (ceiling 60.0), b 25.0 -> 41.7 (ceiling 80.0); step time x1.50 of joint" in said

    config = {"data": {"source": "fake", "dims": [3, 4], "rows": 100}, "epochs": 1, "fusion": "concat",
              "batch_size": 8, "lr": 0.1, "momentum": 0.9, "hidden": 4, "feature_dim": 2, "device": "cpu",
              "timing": {"rounds": 1, "steps": 1}}
    compare_mod.write_report(str(tmp_path), s, config, "agm-fast compare ...", plot=True)
    rows_csv = read_csv(tmp_path / "compare.csv")
    assert len(rows_csv) == 15
    m2 = next(r for r in rows_csv if r["name"] == "m" and r["seed"] == "2")
    assert float(m2["delta_vs_joint"]) == pytest.approx(0.15) and m2["ceiling_b"] == ""
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_verdicts():
    assert compare_report.verdict([0.02, 0.03], 400) == "better than joint on every seed"
    assert compare_report.verdict([-0.02, -0.03], 400) == "worse than joint on every seed"
    # Two test samples (0.5 points of 400) or less is no effect, however steady.
    assert compare_report.verdict([0.004, 0.004], 400) == "within the seed-to-seed spread: no clear effect"
    assert compare_report.verdict([0.05, -0.04, 0.01], 400) == "within the seed-to-seed spread: no clear effect"
    assert compare_report.verdict([0.04, 0.05, 0.003], 400) == "better on average, not on every seed"
    assert compare_report.verdict([0.01], 400) == "one seed: no spread to judge it by"


def test_interrupted_grid_resumes_skipping_finished_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid"
    argv = ["compare", *GRID, "--timing-rounds", "0", "--out", out]
    real = compare_mod.run_method
    calls = []

    def interrupted_at_the_third(ns, seed, run_dir):
        calls.append(run_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(ns, seed, run_dir)

    monkeypatch.setattr(compare_mod, "run_method", interrupted_at_the_third)
    rc, _, err = run(argv, capsys)
    # Finished before the interrupt: the unimodal runs of both seeds, joint and ogm_ge of seed 0.
    assert rc == 130 and "continue with --resume" in err and "4 of 6 runs are finished" in err
    assert not (out / "compare.md").exists()

    rc, _, err = run(argv, capsys)
    assert rc == 2 and "already holds a comparison; finish it with --resume" in err
    rc, _, err = run([*argv, "--resume", "--epochs", "3"], capsys)
    assert rc == 2 and "--resume: epochs: the comparison in --out has 2, this run asks for 3" in err
    rc, _, err = run([*argv, "--resume", "--synthetic-seed", "5"], capsys)
    assert rc == 2 and "the data differ" in err

    monkeypatch.setattr(compare_mod, "run_method", real)
    before = results(out)
    rc, stdout, err = run([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert "resuming: 4 of 6 runs are finished" in stdout
    after = results(out)
    assert len(after) == 6 and all(after[k] == v for k, v in before.items())
    assert len(read_csv(out / "compare.csv")) == 10

    # --jobs 2 runs the grid in two processes, with the same numbers (seed 0 of it, to keep the test short).
    other = tmp_path / "jobs"
    rc, _, err = run(["compare", *GRID, "--seeds", "0", "--timing-rounds", "0", "--jobs", "2", "--out", other], capsys)
    assert rc == 0, err
    strip = ("seconds", "step_ms")
    parallel = {k: {f: v for f, v in r.items() if f not in strip} for k, r in results(other).items()}
    assert sorted(parallel) == ["joint-seed0", "ogm_ge-seed0", "unimodal-seed0"]
    assert parallel == {k: {f: v for f, v in after[k].items() if f not in strip} for k in parallel}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "joint,nope"], "--methods: unknown method 'nope'"),
        (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
        (["--seeds", "1,1"], "--seeds: expected distinct values"),
        (["--jobs", "0"], "--jobs: expected an int >= 1, got 0"),
        (["--methods", "joint,mses", "--alpha", "0.5"], "--alpha applies to --methods"),
        (["--methods", "cggm", "--fusion", "sum"], "--methods cggm: --method cggm does not support --fusion sum"),
        (["--resume", "--overwrite"], "choose one"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    rc, _, err = run(["compare", *DATA, *SMALL, *argv, "--out", tmp_path / "c"], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_resume_of_nothing(tmp_path, capsys):
    rc, _, err = run(["compare", *DATA, *SMALL, "--resume", "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "holds no comparison to finish" in err
