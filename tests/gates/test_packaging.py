"""How agm_fast builds and installs where users build: the CUDA architecture choice on a machine with no visible GPU,
a torch / toolkit CUDA mismatch, a plain ``pip install .`` (build isolation on), and a wheel and an sdist that install
in a fresh environment and work from outside the source tree."""

import importlib.util
import os
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import build_config  # noqa: E402

CUDA13 = ["7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0", "10.3", "12.0", "12.1"]
CUDA118 = ["3.5", "3.7", "5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"]
CUDA124 = ["5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"]


@pytest.mark.parametrize(
    "supported, expected",
    [
        (CUDA13, "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        (CUDA124, "8.0;8.6;8.9;9.0+PTX"),
        (CUDA118, "8.0;8.6;8.9;9.0+PTX"),
        (["8.0"], "8.0+PTX"),
        (["5.0", "6.0"], None),
        ([], None),
    ],
)
def test_cuda_arch_list_is_the_toolkits_share_of_the_users_archs(supported, expected):
    assert build_config.cuda_arch_list(supported) == expected


def test_arch_list_for_build_respects_the_user_and_a_visible_gpu():
    assert build_config.arch_list_for_build(None, False, CUDA13) == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    assert build_config.arch_list_for_build("9.0", False, CUDA13) is None
    assert build_config.arch_list_for_build(None, True, CUDA13) is None
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        build_config.arch_list_for_build(None, False, ["5.0"])


def test_cuda_version_mismatch_is_one_sentence():
    assert build_config.cuda_version_problem("12.8", "12.4") is None
    assert build_config.cuda_version_problem(None, "13.0") is None
    message = build_config.cuda_version_problem("12.8", "13.0")
    assert "CUDA 12.8" in message and "13.0" in message and "\n" not in message


def _fake_toolkit(tmp_path, version="13.0", archs=(75, 80, 86, 89, 90, 100, 120)):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    arch_lines = "\\n".join(f"compute_{a}" for a in archs)
    nvcc.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version) echo "Cuda compilation tools, release {version}, V{version}.0";; '
        f'--list-gpu-arch) printf "{arch_lines}\\n";; esac\n'
    )
    nvcc.chmod(0o755)
    return home


def _setup_module():
    spec = importlib.util.spec_from_file_location("agm_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_torch(cuda_version, gpu):
    return types.SimpleNamespace(
        version=types.SimpleNamespace(cuda=cuda_version), cuda=types.SimpleNamespace(is_available=lambda: gpu)
    )


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvcc is a shell script")
def test_setup_py_on_a_login_node_picks_the_arch_list_itself(tmp_path, monkeypatch, capsys):
    setup = _setup_module()
    home = _fake_toolkit(tmp_path)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup._cuda_setup(_fake_torch("13.0", False), types.SimpleNamespace(CUDA_HOME=str(home)))
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    assert "no GPU is visible" in capsys.readouterr().out
    # The user's list wins.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert setup._cuda_setup(_fake_torch("13.0", False), types.SimpleNamespace(CUDA_HOME=str(home)))
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    # A torch built for CUDA 12 with a CUDA 13 toolkit: one message, not torch's traceback.
    with pytest.raises(SystemExit, match="torch was built with CUDA 12.8 but the CUDA toolkit found"):
        setup._cuda_setup(_fake_torch("12.8", False), types.SimpleNamespace(CUDA_HOME=str(home)))
    # A CPU torch builds the CPU kernels only.
    assert not setup._cuda_setup(_fake_torch(None, False), types.SimpleNamespace(CUDA_HOME=str(home)))


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _pypi_reachable(), reason="pip's isolated build environment needs PyPI for setuptools")
def test_plain_pip_install_stops_at_once_and_downloads_no_torch(tmp_path):
    # The command most people type first: build isolation on. It must not fetch a second torch to build against.
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(tmp_path), "-v"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    elapsed = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "pip install --no-build-isolation ." in " ".join(output.split()), output[-3000:]
    downloads = [line for line in output.splitlines() if ("Collecting" in line or "Downloading" in line)]
    assert not any("torch" in line.lower() for line in downloads), downloads
    assert elapsed < 300, f"{elapsed:.0f} s"


def _fresh_env(tmp_path, name):
    """A venv without pip of its own that sees this interpreter's site-packages (torch, pip, setuptools) as a plain
    path, so that the source tree's editable install (a .pth hook there) stays out of it."""
    env = tmp_path / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    py = env / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_outer_site.pth").write_text("\n".join(sorted(paths)) + "\n")
    return py


SMOKE = textwrap.dedent(
    """
    import os, sys
    import torch
    import agm_fast
    from agm_fast import coalitions, functional, ops
    # The installed copy in this environment, not the source tree.
    assert agm_fast.__file__.startswith(sys.prefix) and "site-packages" in agm_fast.__file__, agm_fast.__file__
    info = agm_fast.backend_info()
    assert info["ext"], info
    from agm_fast.kernels import shapley  # the mapped package is installed
    x = torch.randn(4, 3)
    assert functional.subset_batch(x, None, [1, 3], 0).shape == (8, 3)
    masks, W = functional.shapley_subsets(2)
    F = torch.randn(len(masks), 4, 5)
    y = torch.randint(0, 5, (4,))
    psi, scores, running, count, coeffs = functional.shapley_scores(
        F, W, y, torch.zeros(2), torch.zeros(()), torch.ones(2), alpha=1.0)
    assert torch.isfinite(coeffs).all()
    assert functional.shapley_combine(F, W, coeffs, len(masks) - 1).shape == (4, 5)
    s, k = functional.ogm_scores(torch.randn(2, 4, 5), y, 0.8)
    g = [torch.randn(10), torch.randn(3, 3)]
    functional.ogm_ge_(g, [0, 1], k, noise=True, seed=1, offset=0)
    assert all(torch.isfinite(t).all() for t in g)
    assert os.path.exists(os.path.join(os.path.dirname(agm_fast.__file__), "data", "mfeat.npz"))
    assert os.path.exists(os.path.join(os.path.dirname(agm_fast.__file__), "cli", "methods.json"))
    assert coalitions.full_mask(3) == 7 and "ogm_ge" in agm_fast.methods.available()
    print("smoke ok", agm_fast.__file__)
    """
)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def _install_and_smoke(tmp_path, dist, name, train=False):
    py = _fresh_env(tmp_path, name)
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(dist)],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = subprocess.run([str(py), "-c", SMOKE], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0 and "smoke ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    if train:
        cli = py.parent / "agm-fast"
        out = tmp_path / "run"
        args = [str(cli), "train", "--epochs", "1", "--out", str(out), "--hidden", "16", "--feature-dim", "8"]
        trained = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert (out / "summary.json").exists() and (out / "curves.png").exists()


def test_the_wheel_installs_and_runs_outside_the_source_tree(dists, tmp_path):
    wheel, _ = dists
    _install_and_smoke(tmp_path, wheel, "wheel-env", train=True)


def test_the_sdist_carries_what_the_build_needs(dists, tmp_path):
    _, sdist = dists
    import tarfile

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("setup.py", "build_config.py", "pyproject.toml", "csrc/ogm_ge.h", "csrc/philox.h",
                   "csrc/cuda/ogm_ge.cu", "kernels/_common.py", "agm_fast/data/mfeat.npz", "README.md"):
        assert needed in names, needed
    _install_and_smoke(tmp_path, sdist, "sdist-env")
