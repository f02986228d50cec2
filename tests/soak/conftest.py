"""Soak tier: a real ComfyUI server under a long seeded queue (tests/soak/soak.py, issue 15).

``make test`` runs the short form (≥ 30 prompts, ≥ 10 interrupts, < 3 min on 2 cores);
``make soak`` sets ``DCM_SOAK_FULL=1`` for the full one (≥ 200 prompts, ≥ 50 interrupts), whose
figures go into README's Reliability section. Output: tests/_output/soak/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.pathimport import load_path_module

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def soak_result(tmp_path_factory, request):
    soak = load_path_module("dcm_soak", HERE / "soak.py")
    full = os.environ.get("DCM_SOAK_FULL", "") not in ("", "0")
    cfg = soak.SoakConfig.full() if full else soak.SoakConfig.short()
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    say = (lambda s: tr.write_line(s)) if tr is not None else print
    return soak.run_soak(cfg, tmp_path_factory.mktemp("soak"), log=say)
