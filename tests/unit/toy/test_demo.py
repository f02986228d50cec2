"""`python -m dcm_core demo` on the bundled toy models (the same path `make demo` takes)."""

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


def test_demo_cli_writes_moving_shapes_closer_to_the_teacher_than_euler(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "dcm_core", "demo", "--prompt", "blue square moving up", "--seed", "3",
         "--out", str(out), "--scale", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"teacher_50step.gif", "dcm_4step.gif", "euler_4step.gif", "vcm_4step.gif", "strip.png",
            "metrics.json"} <= names
    m = json.loads((out / "metrics.json").read_text())
    meth = m["methods"]
    st = M.toy_settings()
    # the default: the toy's recommended 4 steps on its own grid, 2 + 2 at the bundle's boundary
    assert m["preset"] == "toy" and m["grid_shift"] == st.shift and m["boundary_timestep"] == st.boundary_timestep
    assert m["sigmas"] == pytest.approx(st.grid(4)) and m["experts"] == ["semantic"] * 2 + ["detail"] * 2
    # non-trivial: the video changes over frames, and the images are not flat
    assert meth["dcm_4step"]["frame_change"] > 0.005
    assert meth["teacher_50step"]["frame_change"] > 0.005
    # plain Euler with 4 steps blurs the teacher's texture; DCM with the same 4 steps keeps it (sharpness: HF
    # energy relative to the teacher's sample, 1 = as sharp)
    s_dcm, s_euler = meth["dcm_4step"]["sharpness_vs_teacher"], meth["euler_4step"]["sharpness_vs_teacher"]
    assert s_euler < 0.6 and abs(math.log(s_dcm)) < abs(math.log(s_euler))
    assert meth["teacher_50step"]["sharpness_vs_teacher"] == 1 and meth["teacher_50step"]["mse_to_teacher"] == 0
    per_call = 2 if m["teacher_cfg"] != 1 else 1  # CFG: two teacher calls per step
    assert meth["dcm_4step"]["model_calls"] == 4 and meth["teacher_50step"]["model_calls"] == 50 * per_call
    assert meth["euler_4step"]["model_calls"] == 4 * per_call
    from PIL import Image

    gif = Image.open(out / "dcm_4step.gif")
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
    # the steps lie on the toy grid (its shift), one in each expert's part of it
    from dcm_core.schedule import per_expert_uniform_sigmas

    st = M.toy_settings()
    assert m["sigmas"] == pytest.approx(per_expert_uniform_sigmas(1, 1, st.boundary_timestep, st.shift))


@pytest.mark.parametrize("preset, n", [("hunyuan-t2v-4step", 4), ("wan2.1-t2v-6step", 6)])
def test_demo_official_presets_still_run(tmp_path, preset, n):
    out = tmp_path / preset
    r = subprocess.run([sys.executable, "-m", "dcm_core", "demo", "--preset", preset, "--out", str(out), "--scale", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    from dcm_core.schedule import build_sigmas

    assert m["sigmas"] == build_sigmas(preset) and len(m["experts"]) == n
    assert {"teacher_50step", f"dcm_{n}step", f"euler_{n}step", f"vcm_{n}step"} <= set(m["methods"])
