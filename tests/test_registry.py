"""A method added from a folder of its own, with one hyper-parameter declared once, appears everywhere with that
default: the command line, ``defaults()``, ``describe()``, the method state and the CLI checkpoint."""

import importlib
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import agm_fast
from agm_fast import cli, methods

METHOD_FOLDER = '''
from agm_fast import methods
from agm_fast.methods.hparams import HParam, HParams, declare, number


@declare(HParams(
    HParam("shrink", 0.25, "gradient factor of every encoder", number(low=0.0, low_open=True), parse=float),
))
class Shrink(methods.Method):
    """Multiply every encoder's gradients by ``shrink`` inside the window."""

    def __init__(self, encoders, fusion, *, window=None, seed=0, task="classification"):
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)

    def before_optimizer_step(self, out=None, target=None):
        out, target = self._resolve(out, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        for enc in self.encoders:
            for p in enc.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.shrink)
        return self.constant([self.shrink] * self.num_modalities, target.device)


methods.register("shrink", Shrink)
'''


@pytest.fixture
def shrink_method(tmp_path, monkeypatch):
    folder = tmp_path / "shrink_method"
    folder.mkdir()
    (folder / "__init__.py").write_text(textwrap.dedent(METHOD_FOLDER))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("shrink_method")
    yield module.Shrink
    methods.unregister("shrink")
    sys.modules.pop("shrink_method", None)


def test_a_method_from_its_own_folder_appears_everywhere_with_its_default(shrink_method, tmp_path, capsys):
    assert "shrink" in methods.available()
    assert shrink_method.defaults() == {"shrink": 0.25}

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--shrink SHRINK shrink: gradient factor of every encoder (default 0.25)" in help_text

    encoders = [torch.nn.Linear(3, 4), torch.nn.Linear(5, 4)]
    method = methods.create("shrink", encoders, agm_fast.ConcatFusion([4, 4], 3))
    assert method.describe()["shrink"] == 0.25
    assert method.state_dict()["hparams"] == {"shrink": 0.25}
    with pytest.raises(ValueError, match="^shrink: expected"):
        methods.create("shrink", encoders, agm_fast.ConcatFusion([4, 4], 3), shrink=0.0)

    out = tmp_path / "run"
    assert cli.main(["train", "--method", "shrink", "--epochs", "1", "--no-plot", "--out", str(out)]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["shrink"] == 0.25
    assert ckpt["method"]["hparams"] == {"shrink": 0.25}


def test_state_from_another_number_of_modalities_is_refused_and_changed_settings_are_named():
    def build(m, **kw):
        return methods.create("ogm_ge", [torch.nn.Linear(3, 4) for _ in range(m)], agm_fast.ConcatFusion([4] * m, 3),
                              **kw)

    with pytest.raises(ValueError, match="state: taken with 2 modalities, expected 3"):
        build(3).load_state_dict(build(2).state_dict())
    with pytest.warns(UserWarning, match="alpha=0.8 in the state, 0.5 here"):
        build(2, alpha=0.5).load_state_dict(build(2).state_dict())


def test_declarations_are_checked_once_at_construction():
    with pytest.raises(TypeError, match="alphaa: not an argument of AGM"):
        agm_fast.AGM(encoders=[torch.nn.Linear(3, 4)] * 2, fusion=torch.nn.Linear(8, 3), alphaa=1.0)
    with pytest.raises(ValueError, match="^cap: expected"):
        agm_fast.AGMCoefficients(2, cap=-1.0)
    with pytest.raises(TypeError, match="nope: not a hyper-parameter of OGMMethod"):
        methods.register("ogm_bad", methods.get("ogm").cls, nope=1)


def test_the_docs_table_is_generated_from_the_declarations():
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("hparams_docs", root / "scripts" / "hparams_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "hyperparameters.md").read_text() == module.render(), (
        "docs/hyperparameters.md is stale: run python scripts/hparams_docs.py"
    )
    assert Path(cli.catalog.CATALOG_PATH).read_text() == cli.catalog.generate(), (
        "agm_fast/cli/methods.json is stale: run python scripts/hparams_docs.py"
    )


def test_help_and_argument_errors_load_no_torch():
    code = (
        "import sys\n"
        "from agm_fast.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['train', '--alpha', 'x']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'triton', 'matplotlib') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout, proc.stdout
    assert "--alpha: invalid float value" in proc.stderr
