"""`make toy-eval` (python -m dcm_core.toy.evaluate → the toy VBench) on the bundled toy models, as a smoke run."""

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


def test_evaluate_cli_scores_the_bundle_on_the_toy_grid(tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "dcm_core.toy.evaluate", "--quick", "--runs", "", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    st = M.toy_settings()
    assert res["samples"] == 4 and res["shift"] == st.shift and res["cfg_scale"] == st.teacher_cfg
    assert set(res["by_steps"]) == {"2", "4"}
    assert res["by_steps"]["4"]["sigmas"] == pytest.approx(st.grid(4), abs=1e-6)
    for block in res["by_steps"].values():
        assert set(block["methods"]) == {"dcm", "euler", "lcm"}  # no not-bundled runs with --runs ''
        for m in block["methods"].values():
            assert math.isfinite(m["mse"]) and m["mse"] > 0 and 0 <= m["total"] <= 1
    # fewer steps, further from the teacher (plain Euler)
    e = [res["by_steps"][n]["methods"]["euler"]["mse"] for n in ("4", "2")]
    assert e[0] < e[1]
    assert {t["steps"] for t in res["targets"]} == {2, 4}
    assert "| 4 | dcm |" in r.stdout and "| steps | target |" in r.stdout
