"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter."""

import os
import sys

import torch

# The shared test helpers (agm_models, toy_method, lightning_ddp) live here, beside the tests of every folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_GATE_REPORT = []


@pytest.fixture(scope="session")
def gate_report():
    """Lines for the "compile gates" section of the test summary (what was compiled, for which archs)."""
    return _GATE_REPORT


def pytest_terminal_summary(terminalreporter):
    if _GATE_REPORT:
        terminalreporter.section("compile gates")
        for line in _GATE_REPORT:
            terminalreporter.write_line(line)
