"""`python -m dcm_core.toy.study --only stages`: where the bundled DCM's distance to the teacher comes from."""

from __future__ import annotations

import json

import pytest
import torch

from dcm_core.toy import models as M
from dcm_core.toy import study, world_v2
from dcm_core.toy import vbench as V


def test_stage_errors_of_the_bundle_agree_with_the_toy_vbench(tmp_path):
    out = tmp_path / "stages.json"
    assert study.main(["--only", "stages", "--pairs", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    st = M.toy_settings()
    assert res["sigma_boundary"] == pytest.approx(0.8056, abs=1e-3) and res["pairs"] == 2
    # the random error is drawn with the semantic expert's size at the boundary
    assert res["random_error_same_size"]["at_boundary"] == pytest.approx(res["semantic_1step"]["at_boundary"], rel=0.2)
    assert res["teacher_euler_1step"]["at_boundary"] > 0 and res["semantic_1step"]["teacher_finishes"] > 0
    assert set(res["detail_from_teacher_x_b"]) == {"1", "2", "3", "4"}
    # the full DCM figure is the toy VBench's MSE for the same pairs, sampler and grid
    b = M.load_bundle()
    prs = V.pairs(2, world_v2, seed=V.TUNE_SEED)
    noise, ctx = V.noise_and_context(world_v2, prs)
    ref = V._run(V.single(b.teacher), noise, ctx, M.teacher_sigmas(st))
    got = V._run(V.dcm(b.dcm, st.boundary_timestep), noise, ctx, st.grid(4))
    assert res["full_dcm"]["4"] == pytest.approx(float(((got - ref) ** 2).mean()), abs=2e-5)
    assert torch.isfinite(got).all()
