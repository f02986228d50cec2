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

# the shared reliability hooks (counts per property, the figures table)
from rel_registry import pytest_configure, pytest_runtest_call, pytest_terminal_summary  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py: one_torch_thread)."""


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
