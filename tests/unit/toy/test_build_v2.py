"""`make toy-models` (python -m dcm_core.toy.build) end to end on a tiny architecture: teacher → dataset → DCM
stages, LCM / PCM baselines and ablations through the trainer CLI → bundle; a re-run redoes only what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcm_core.toy import models as M
from dcm_core.toy import vbench as VB

ROOT = Path(__file__).resolve().parents[3]
RUNS = ("semantic", "detail", "detail_no_gan", "lcm", "pcm", "semantic_no_tc", "detail_no_tc")


def _build(work: Path, detail_steps: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcm_core.toy.build", "--work", str(work), "--weights-dir", str(work / "weights"),
         "--arch", "128,1,64", "--batch-size", "2", "--teacher-steps", "2", "--semantic-steps", "2",
         "--detail-steps", str(detail_steps), "--clips", "8", "--ablations"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("toybuild")
    r = _build(work)
    assert r.returncode == 0, r.stderr[-4000:]
    return work


def test_the_build_trains_every_run_through_the_trainer_cli_and_bundles(built):
    for run in RUNS:
        assert (built / run / "export" / "export_info.json").exists(), run
    man = json.loads((built / "weights" / M.MANIFEST).read_text())
    assert set(man["commands"]) == set(RUNS)
    assert all(c[:4] == ["python", "-m", "dcm_core", "train"] for c in man["commands"].values())
    pcm = " ".join(man["commands"]["pcm"])
    assert "schedule.k0=0" in pcm and "schedule.phases=4" in pcm
    toy = man["toy"]
    assert toy["world"] == "v2" and toy["shift"] == 3.0 and toy["boundary_timestep"] == 810.0
    assert toy["bundled"] == {"dcm": "detail_no_gan", "single_expert": "lcm"}
    st = M.toy_settings(built / "weights")
    assert (st.world, st.shift, st.teacher_cfg) == ("v2", 3.0, toy["teacher_cfg"])
    assert {"teacher/diffusion_pytorch_model.safetensors", M.DCM_FILE, M.VCM_FILE} <= set(man["files"])
    # the teacher's distillation CFG is the trainer's w = scale − 1
    assert f"guidance.cfg_scale={toy['teacher_cfg'] - 1:g}" in man["commands"]["semantic"]
    bundle = M.load_bundle(built / "weights")
    assert bundle.vcm is not None and bundle.settings == st


def test_a_rerun_redoes_only_what_is_missing(built):
    before = json.loads((built / "times.json").read_text())
    digest = json.loads((built / "weights" / M.MANIFEST).read_text())["files"][M.DCM_FILE]["sha256"]
    import shutil

    shutil.rmtree(built / "pcm")
    r = _build(built)
    assert r.returncode == 0, r.stderr[-4000:]
    after = json.loads((built / "times.json").read_text())
    assert after["pcm"] > 0 and all(after[k] == before[k] for k in RUNS if k != "pcm")
    assert "[pcm] $ python -m dcm_core train" in r.stderr and "[semantic] $" not in r.stderr
    assert json.loads((built / "weights" / M.MANIFEST).read_text())["files"][M.DCM_FILE]["sha256"] == digest


def _step(run: Path) -> int:
    return json.loads((run / "export" / "export_info.json").read_text())["step"]


def test_other_settings_or_a_retrained_dependency_retrain_the_runs_they_change(built):
    import shutil

    # other detail steps: the detail runs and the baselines (budget of both stages) change; the semantic runs do not
    r = _build(built, detail_steps=3)
    assert r.returncode == 0, r.stderr[-4000:]
    for run in ("detail", "detail_no_gan", "detail_no_tc", "lcm", "pcm"):
        assert f"[{run}] stale (another command, teacher" in r.stderr, run
        assert (built / f"{run}.stale-1" / "export" / "export_info.json").exists(), run  # set aside, not deleted
    assert "[semantic] $" not in r.stderr and "[semantic_no_tc] $" not in r.stderr
    assert (_step(built / "detail"), _step(built / "lcm"), _step(built / "semantic")) == (3, 5, 2)
    # a retrained semantic expert makes its detail runs stale, even under the same command
    shutil.rmtree(built / "semantic")
    r = _build(built, detail_steps=3)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "[semantic] $" in r.stderr and "[detail] stale (another command, teacher, dataset or semantic export)" in r.stderr
    assert "[detail_no_gan] $" in r.stderr and "[lcm] $" not in r.stderr and "[detail_no_tc] $" not in r.stderr
    assert (built / "detail.stale-2").is_dir()


def test_the_toy_vbench_scores_the_bundle_and_the_runs(built, tmp_path):
    out = tmp_path / "vb.json"
    assert VB.main(["--weights", str(built / "weights"), "--runs", str(built), "--pairs", "2", "--steps", "2",
                    "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["by_steps"]["2"]["methods"]) == {"euler", "dcm", "lcm", "pcm", "dcm_gan", "dcm_no_tc"}
    assert res["targets"] and res["targets"][0]["steps"] == 2
