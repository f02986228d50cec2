"""CI may not skip a tier (tests/conftest.py, DCM_REQUIRE_TIERS): a required tier that cannot run fails the
session with one message saying how to get the ComfyUI work tree; without the variable the tier is skipped
with one SKIP line. Each case runs pytest in a subprocess with COMFYUI_PATH pointing nowhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pytest(tmp_path: Path, *args: str, require: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path / "no-comfyui"), OMP_NUM_THREADS="1")
    env.pop("DCM_REQUIRE_TIERS", None)
    if require is not None:
        env["DCM_REQUIRE_TIERS"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_required_comfy_tier_fails_the_session_with_one_message(tmp_path):
    # a unit-only selection fails too: the machine, not the selection, is what CI checks
    r = _pytest(tmp_path, "tests/unit/test_boundaries.py", require="comfy,cli")
    out = r.stdout + r.stderr
    assert r.returncode == 4, out  # pytest's usage-error status: no test ran
    assert " passed" not in out and " failed" not in out, out
    assert out.count("ERROR: DCM_REQUIRE_TIERS=comfy,cli") == 1, out
    assert f"comfy: no ComfyUI work tree at {tmp_path / 'no-comfyui'}" in out, out
    assert "cli: needs the ComfyUI work tree too" in out, out
    assert "git clone https://github.com/Comfy-Org/ComfyUI ~/ComfyUI && git -C ~/ComfyUI checkout a125cd84" in out, out
    assert "COMFYUI_PATH" in out


def test_unknown_required_tier_is_a_usage_error(tmp_path):
    r = _pytest(tmp_path, "tests/unit/test_boundaries.py", require="comfy,gpu")
    assert r.returncode == 4 and "unknown tier(s) ['gpu']" in r.stdout + r.stderr, r.stdout + r.stderr


def test_by_hand_the_tier_is_skipped_with_one_line(tmp_path):
    r = _pytest(tmp_path, "tests/comfy/test_nodes_sampling.py", "-k", "guider_path", require=None)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert re.search(r"\b\d+ skipped", out) and " passed" not in out and " failed" not in out, out
    assert out.count("SKIP comfy tier: no ComfyUI work tree at") == 1, out
