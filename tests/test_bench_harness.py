"""The benchmark harness: the provider loop refuses to time a wrong provider, ``--out`` is checked before anything
runs, and a quick CPU benchmark writes its JSON lines under ``--out``. No timing is asserted."""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from agm_fast.benchmarks import harness

CPU = torch.device("cpu")


def test_provider_loop_does_not_time_a_wrong_provider():
    calls = {"right": 0, "wrong": 0, "broken": 0}

    def make(name, delta):
        def fn(x):
            calls[name] += 1
            if delta is None:
                raise RuntimeError("cannot run\nsecond line")
            return [x * 2 + delta, x.sum()]

        return fn

    x = torch.arange(6.0)
    rows = harness.run_providers(
        ("baseline", lambda x: [x * 2, x.sum()]),
        [("right", make("right", 0.0)), ("wrong", make("wrong", 1.0)), ("broken", make("broken", None))],
        (x,),
        device=CPU,
        fields={"B": 6},
        timer=dict(warmup=0, rep=2),
    )
    by_name = {r["provider"]: r for r in rows}
    assert [r["provider"] for r in rows] == ["baseline", "right", "wrong", "broken"]
    assert all(r["B"] == 6 for r in rows)
    assert by_name["baseline"]["check"] == "ok" and by_name["baseline"]["speedup"] == 1.0
    assert by_name["right"]["check"] == "ok" and by_name["right"]["speedup"] > 0
    # Checked once, then timed: one check call plus the two timed repetitions.
    assert calls["right"] == 3
    assert by_name["wrong"]["check"].startswith("wrong: output 0 differs from the baseline")
    assert by_name["broken"]["check"] == "broken: RuntimeError: cannot run"
    # A provider that fails its check is called once, for the check, and has no timing columns.
    assert calls["wrong"] == 1 and calls["broken"] == 1
    for name in ("wrong", "broken"):
        assert not {"median_ms", "p20_ms", "p80_ms", "speedup"} & set(by_name[name])


def test_check_close_compares_numbers_and_counts_outputs():
    assert harness.check_close("p", (torch.tensor(0.5), torch.tensor(1.0)), (0.5, 1.0)) is None
    assert "differs" in harness.check_close("p", (torch.tensor(0.5),), (0.6,))
    assert harness.check_close("p", (torch.tensor(0.5),), (0.5, 1.0)) == "p: 1 outputs, the baseline has 2"


@pytest.mark.parametrize("name", ["bench_ogm_ge", "bench_agm_step", "bench_cggm_step"])
def test_unwritable_out_is_one_error_line_before_running(name, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = str(blocker / "results")
    main = importlib.import_module(f"agm_fast.benchmarks.{name}").main
    assert main(["--device", "cpu", "--quick", "--out", bad]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(rf"{name}: error: --out {re.escape(bad)} is not writable \(.+\)\n", err)


def test_unwritable_out_exits_2_without_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cmd = [sys.executable, "-m", "agm_fast.benchmarks.bench_ogm_ge", "--device", "cpu", "--out", str(blocker)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"bench_ogm_ge: error: --out {blocker} is not writable (Not a directory)"]


@pytest.mark.parametrize("name", ["bench_shapley", "bench_ogm_scores"])
def test_gpu_benchmarks_on_cpu_say_so_and_write_nothing(name, tmp_path, capsys):
    out = tmp_path / "results"
    main = importlib.import_module(f"agm_fast.benchmarks.{name}").main
    assert main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not out.exists()


def test_quick_cpu_run_writes_its_json_lines_under_out(tmp_path, monkeypatch, capsys):
    # The default folder is under the current directory: nothing may be written there when --out is given.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    from agm_fast.benchmarks import bench_ogm_ge

    assert bench_ogm_ge.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    assert os.listdir(out) == ["ogm_ge.jsonl"] and os.listdir(cwd) == []
    records = [json.loads(line) for line in (out / "ogm_ge.jsonl").read_text().splitlines()]
    assert len(records) >= 9
    assert all(r["check"] == "ok" and r["machine"].startswith("device: cpu") for r in records)
    assert {"score+coeff", "copy (bandwidth ref.)", "modulate OGM", "modulate OGM_GE"} <= {r["stage"] for r in records}
    assert f"appended {len(records)} records to {out / 'ogm_ge.jsonl'}" in capsys.readouterr().out


def test_method_step_bench_times_each_method_against_joint(tmp_path):
    from agm_fast.benchmarks import bench_method_step

    out = tmp_path / "out"
    argv = ["--quick", "--methods", "ogm,mmpareto", "--modalities", "2", "--out", str(out)]
    assert bench_method_step.main(argv) == 0
    records = [json.loads(line) for line in (out / "method_step.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["joint", "ogm", "mmpareto", "mmpareto (reference-style)"]
    assert records[0]["vs_joint"] == 1.0 and all(r["median_ms"] > 0 for r in records)
