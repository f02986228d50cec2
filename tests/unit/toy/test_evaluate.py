"""`make toy-eval` (python -m dcm_core.toy.evaluate) on the bundled toy models, as a smoke run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dcm_core.toy import models as M

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    not (M.WEIGHTS_DIR / M.DCM_FILE).exists(), reason="bundled toy weights missing: run `make toy-models`"
)


def test_evaluate_cli_scores_every_method_on_every_schedule(tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "dcm_core.toy.evaluate", "--quick", "--runs", "", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["samples"] == 2
    assert [len(s["sigmas"]) - 1 for s in res["schedules"]] == [6, 4, 2]
    assert res["schedules"][0]["sigmas"] == [1.0, 0.992, 0.982, 0.949, 0.905, 0.81, 0.0]
    for s in res["schedules"]:
        assert set(s["methods"]) == {"dcm", "euler", "single_expert_cm"}  # no ablation runs with --runs ''
        for m in s["methods"].values():
            assert math.isfinite(m["mse_to_teacher"]) and m["mse_to_teacher"] > 0
        assert s["euler_over_dcm_mse"] == pytest.approx(
            s["methods"]["euler"]["mse_to_teacher"] / s["methods"]["dcm"]["mse_to_teacher"])
    # fewer steps, further from the teacher (plain Euler)
    e = [s["methods"]["euler"]["mse_to_teacher"] for s in res["schedules"]]
    assert e[0] < e[2]
    assert "| **DCM** (semantic + detail experts) |" in r.stdout
