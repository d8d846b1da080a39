"""The CUDA compile gate: ``csrc/cuda/*.cu`` compiles with nvcc for sm_80 and sm_90, with the flags of setup.py's
CUDA build, against the installed torch's headers (a CPU wheel carries them too), and ptxas spills no register.

It proves that the CUDA sources compile and fit in registers on the architectures users run; it cannot prove that
they run correctly or fast (that takes a GPU: benchmarks/run_gpu.sh)."""

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import build_config  # noqa: E402

ARCHS = (80, 90)
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc():
    for candidate in (
        os.environ.get("CUDACXX"),
        build_config.nvcc_path(cpp_extension.CUDA_HOME),
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="no CUDA compiler (nvcc) found: the CUDA sources cannot compile")


def setup_py_flags():
    """The nvcc command line of setup.py's CUDA build (torch's BuildExtension plus build_config.NVCC_FLAGS)."""
    includes = [ROOT / "csrc", *cpp_extension.include_paths()]
    cuda_home = Path(NVCC).resolve().parents[1]
    includes.append(cuda_home / "include")
    flags = [f"-I{p}" for p in includes]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)
    flags += ["--compiler-options", "-fPIC", "-std=c++20"]
    flags += ["-DAGM_FAST_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    # A CPU wheel of torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h; this define skips it.
    flags += ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    flags += list(build_config.NVCC_FLAGS)
    for arch in ARCHS:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)")
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(log: str):
    """``{(function, arch): {"registers": n, "spill_stores": s, "spill_loads": l}}`` from ``ptxas -v`` output."""
    report = defaultdict(dict)
    current = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = (entry.group(1), int(entry.group(2)))
            report[current].update(spill_stores=0, spill_loads=0)
            continue
        if current is None:
            continue
        spill = _SPILL.search(line)
        if spill:
            report[current]["spill_stores"] += int(spill.group(1))
            report[current]["spill_loads"] += int(spill.group(2))
        used = _USED.search(line)
        if used:
            report[current]["registers"] = int(used.group(1))
    return dict(report)


def _demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = [re.sub(r"\(.*", "", d.replace("(anonymous namespace)::", "").removeprefix("void ")) for d in out]
    return dict(zip(names, short))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("nvcc-gate")
    logs = []
    for src in SOURCES:
        cmd = [NVCC, "-c", str(src), "-o", str(out_dir / (src.stem + ".o")), *setup_py_flags(), "-Xptxas", "-v"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        logs.append(proc.stdout + proc.stderr)
    return ptxas_report("\n".join(logs))


def test_cuda_sources_compile_for_sm80_and_sm90_without_spills(compiled, gate_report):
    assert SOURCES, "csrc/cuda has no .cu file"
    archs = {arch for _, arch in compiled}
    assert archs == set(ARCHS), f"ptxas reported {sorted(archs)}"
    spilled = {k: v for k, v in compiled.items() if v["spill_stores"] or v["spill_loads"]}
    names = _demangle(sorted({f for f, _ in compiled}))
    gate_report.append(
        f"nvcc: {len(SOURCES)} file(s), {len(names)} kernels, compiled for {', '.join(f'sm_{a}' for a in ARCHS)} "
        f"with setup.py's flags"
    )
    for (fn, arch), usage in sorted(compiled.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        gate_report.append(
            f"  {names[fn]} sm_{arch}: {usage['registers']} registers, spills {usage['spill_stores']} B"
        )
    assert not spilled, {names[f]: v for (f, _), v in spilled.items()}


def test_ptxas_report_parser():
    log = (
        "ptxas info    : Compiling entry function '_Zk' for 'sm_90'\n"
        "ptxas info    : Function properties for _Zk\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers\n"
    )
    assert ptxas_report(log) == {("_Zk", 90): {"registers": 40, "spill_stores": 4, "spill_loads": 4}}
