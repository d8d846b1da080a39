"""The Triton compile gate: every kernel configuration the launchers choose compiles with Triton's real compiler for
sm_80 and sm_90, with no GPU, and none spills registers (triton_gate.py beside this file does the work in a clean
process, over the grid each kernel module declares)."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import triton.backends

HERE = Path(__file__).resolve().parent
ARCHS = (80, 90)

pytestmark = pytest.mark.skipif(
    "nvidia" not in triton.backends.backends, reason="this triton has no CUDA backend, so nothing can be compiled"
)


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A cache of its own: the gate compiles every configuration instead of finding it compiled.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    argv = [sys.executable, str(HERE / "triton_gate.py"), "--jobs", str(os.cpu_count() or 1)]
    for arch in ARCHS:
        argv += ["--arch", str(arch)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_configuration_compiles_for_sm80_and_sm90(gate, gate_report):
    results = gate["results"]
    assert gate["archs"] == list(ARCHS)
    assert len(results) == gate["configurations"] * len(ARCHS)
    # Every kernel module declares its grid, and the grids reach every kernel the launchers use.
    assert gate["ungated"] == []
    assert gate["modules"] == [f"agm_fast.kernels.{m}" for m in ("ogm_scores", "shapley", "subset_batch")]
    assert set(gate["kernels"]) == {
        "_ogm_scores_fwd_kernel", "_ogm_scores_reduce_kernel", "_shapley_scores_fwd_kernel",
        "_shapley_scores_reduce_kernel", "_shapley_bwd_kernel", "_shapley_combine_bwd_kernel",
        "_subset_batch_fwd_kernel", "_subset_batch_bwd_kernel", "_subset_batch_bwd_reduce_kernel",
    }
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['case']}: {r.get('error')}" for r in failed[:5])
    per_kernel = defaultdict(list)
    for r in results:
        per_kernel[(r["kernel"], r["arch"])].append(r)
    gate_report.append(
        f"triton: {len(gate['kernels'])} kernels, {gate['configurations']} launch configurations, compiled for "
        f"{', '.join(f'sm_{a}' for a in ARCHS)} ({len(results)} compiles, {gate['seconds']} s)"
    )
    for (kernel, arch), rs in sorted(per_kernel.items()):
        gate_report.append(
            f"  {kernel} sm_{arch}: {len(rs)} configs, registers <= {max(r['registers'] for r in rs)}, "
            f"shared memory <= {max(r['shared_bytes'] for r in rs)} B, spills {sum(r['spill_stores'] for r in rs)}"
        )


def test_no_configuration_spills_registers(gate):
    spilled = [r for r in gate["results"] if r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, "\n".join(
        f"{r['kernel']} sm_{r['arch']} {r['case']}: {r['spill_stores']} B spill stores, {r['registers']} registers"
        for r in spilled[:10]
    )
