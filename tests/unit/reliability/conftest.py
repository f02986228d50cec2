"""Reliability suite, unit tier: hostile files (hypothesis) and training faults.

Short example counts in ``make test``; ``--reliability-full`` (or ``DCM_RELIABILITY_FULL=1``,
``make reliability``) runs the large counts. The counts per property and the figures table are
printed at the end of the session and written to tests/_output/reliability/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import rel_registry  # noqa: E402


def pytest_configure(config):
    rel_registry.configure(config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    rel_registry.begin_test(xfail=item.get_closest_marker("xfail") is not None)
    outcome = yield
    rel_registry.end_test(outcome.excinfo is not None)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rel_registry.terminal_summary(terminalreporter)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors on a shared 2-core box: one intra-op thread is faster and keeps CPU times honest."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Valid seed files: official Wan T2V (fp32), Wan I2V (bf16), HunyuanVideo (fp16) and the
    pack-native semantic + detail pair converted from each (bf16, fp8, fp32)."""
    import rel_hostile
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rel_hostile.build_world(tmp_path_factory.mktemp("rel_world"))
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    import rel_hostile

    return rel_hostile.CaseDir(tmp_path_factory.mktemp("rel_cases"))
