"""`python -m dcm_core demo` on the bundled toy models (the same path `make demo` takes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcm_core.toy import models as M

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    not (M.WEIGHTS_DIR / M.DCM_FILE).exists(), reason="bundled toy weights missing: run `make toy-models`"
)


def test_demo_cli_writes_moving_shapes_closer_to_the_teacher_than_euler(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "dcm_core", "demo", "--prompt", "blue square moving up", "--seed", "3",
         "--out", str(out), "--scale", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"teacher_50step.gif", "dcm_6step.gif", "euler_6step.gif", "vcm_6step.gif", "strip.png",
            "metrics.json"} <= names
    m = json.loads((out / "metrics.json").read_text())
    meth = m["methods"]
    assert m["experts"] == ["semantic"] * 3 + ["detail"] * 3
    # non-trivial: the video changes over frames, and the images are not flat
    assert meth["dcm_6step"]["frame_change"] > 0.005
    assert meth["teacher_50step"]["frame_change"] > 0.005
    # DCM is closer to the teacher than plain Euler with the same 6 steps
    assert meth["dcm_6step"]["mse_to_teacher"] < meth["euler_6step"]["mse_to_teacher"]
    assert meth["dcm_6step"]["model_calls"] == 6 and meth["teacher_50step"]["model_calls"] == 50
    from PIL import Image

    gif = Image.open(out / "dcm_6step.gif")
    assert gif.n_frames == 6
    assert "DCM toy demo" in r.stdout


def test_demo_rejects_prompts_outside_the_world(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcm_core", "demo", "--prompt", "a cat playing piano",
                        "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "not in the toy world" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_demo_per_expert_uniform_two_steps(tmp_path):
    out = tmp_path / "demo2"
    r = subprocess.run(
        [sys.executable, "-m", "dcm_core", "demo", "--preset", "per-expert-uniform", "--semantic-steps", "1",
         "--detail-steps", "1", "--out", str(out), "--scale", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["experts"] == ["semantic", "detail"] and len(m["sigmas"]) == 3
    assert m["methods"]["dcm_2step"]["model_calls"] == 2
    assert {"dcm_2step.gif", "euler_2step.gif"} <= {p.name for p in out.iterdir()}
