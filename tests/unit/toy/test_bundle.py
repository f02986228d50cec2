"""The bundled toy models: the files the manifest lists, byte for byte, inside the size budget, with the settings
every tool samples them with."""

from __future__ import annotations

import json

import pytest

from dcm_core.toy import models as M
from dcm_core.train.checkpoint import sha256_file

pytestmark = pytest.mark.skipif(not (M.WEIGHTS_DIR / M.MANIFEST).exists(), reason="bundled toy weights missing")
BUDGET_BYTES = 30 * 1024 * 1024


def test_every_bundled_file_matches_its_manifest_entry_and_the_bundle_fits_the_budget():
    man = json.loads((M.WEIGHTS_DIR / M.MANIFEST).read_text())
    on_disk = {p.relative_to(M.WEIGHTS_DIR).as_posix() for p in M.WEIGHTS_DIR.rglob("*") if p.is_file()}
    assert on_disk - {M.MANIFEST} == set(man["files"])
    for name, entry in man["files"].items():
        p = M.WEIGHTS_DIR / name
        assert p.stat().st_size == entry["bytes"] and sha256_file(p) == entry["sha256"], name
    assert sum(p.stat().st_size for p in M.WEIGHTS_DIR.rglob("*") if p.is_file()) <= BUDGET_BYTES


def test_the_manifest_says_how_to_sample_the_bundle():
    man = json.loads((M.WEIGHTS_DIR / M.MANIFEST).read_text())
    toy = man["toy"]
    st = M.toy_settings()
    assert (st.world, st.shift, st.boundary_timestep, st.teacher_cfg) == (
        toy["world"], toy["shift"], toy["boundary_timestep"], toy["teacher_cfg"])
    # the routing boundary splits the recommended steps between both experts on the toy grid
    from dcm_core.schedule import route

    experts = route(st.grid(st.recommended_steps), st.boundary_timestep)
    assert "semantic" in experts and "detail" in experts
    assert set(man["commands"]) >= {"semantic", "detail", "lcm", "pcm", "detail_no_gan"}
    assert man["wall_seconds"]["teacher"] > 0
