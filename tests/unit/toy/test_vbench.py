"""The toy VBench (world v2): fixed pairs, per-sample scores that drop when a sample is broken, the runner and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dcm_core import tiny
from dcm_core.schedule import FAMILY_WAN
from dcm_core.toy import vbench as VB
from dcm_core.toy import world_v2 as W

TINY = tiny.wan_config(dim=128, num_layers=1, ffn_dim=64)


def test_pairs_are_fixed_distinct_and_cover_the_language():
    prs = VB.pairs()
    assert prs == VB.pairs() and len(prs) == 64 >= 64
    prompts = [W.parse_prompt(p) for p, _ in prs]
    assert len({p.text for p in prompts}) == 64 and len({s for _, s in prs}) == 64
    assert {p.colour for p in prompts} == set(W.COLOURS)
    assert {p.shape for p in prompts} == set(W.SHAPES)
    assert {p.motion for p in prompts} == set(W.MOTIONS)


def _scores(frames: torch.Tensor, ref_frames: torch.Tensor, prompt: str) -> dict:
    row, ref = W.score_clip(frames, prompt), W.score_clip(ref_frames, prompt)
    mse = float(((W.frames_to_latent(frames) - W.frames_to_latent(ref_frames)) ** 2).mean())
    return VB.sample_scores(row, ref, mse)


PROMPT, SEED = "red square moving right", 11


def test_a_perfect_sample_scores_one():
    ref = W.make_clip(PROMPT, SEED).frames
    s = _scores(ref, ref, PROMPT)
    assert s["mse"] == 0 and s["semantic"] == 1 and s["sharpness"] == 1 and s["consistency"] == 1 and s["total"] == 1


def test_blur_lowers_sharpness_and_total():
    ref = W.make_clip(PROMPT, SEED).frames
    blurred = torch.nn.functional.avg_pool2d(ref, 3, stride=1, padding=1, count_include_pad=False)
    s = _scores(blurred, ref, PROMPT)
    assert s["sharpness"] < 0.5 and s["total"] < 0.9 and s["mse"] > 0


def test_a_wrong_colour_or_motion_lowers_the_semantic_score():
    ref = W.make_clip(PROMPT, SEED).frames
    assert _scores(W.make_clip("blue square moving right", SEED).frames, ref, PROMPT)["colour_ok"] == 0
    s = _scores(W.make_clip("red square moving left", SEED).frames, ref, PROMPT)
    assert s["motion_ok"] == 0 and s["semantic"] <= 2 / 3 + 1e-9


def test_a_flickering_texture_lowers_consistency():
    clip = W.make_clip(PROMPT, SEED)
    rng = np.random.default_rng(0)
    frames = []
    for t in range(W.FRAMES):  # same object and motion, a new texture phase every frame
        tex = W.Texture(clip.texture.kind, clip.texture.period, clip.texture.angle, (float(rng.random()), float(rng.random())))
        frames.append(W.render(clip.prompt, clip.state, clip.background, tex)[t])
    s = _scores(torch.stack(frames), clip.frames, PROMPT)
    assert s["consistency"] < 0.5 and s["semantic"] == 1


def test_no_object_scores_zero_consistency():
    ref = W.make_clip(PROMPT, SEED).frames
    s = _scores(torch.full_like(ref, -1.0), ref, PROMPT)
    assert s["consistency"] == 0 and s["semantic"] < 1


def test_evaluate_on_tiny_random_models_counts_wins():
    torch.set_num_threads(1)
    teacher = tiny.build_transformer(FAMILY_WAN, TINY, seed=0)
    other = tiny.build_transformer(FAMILY_WAN, TINY, seed=1)

    def exact(noise, ctx, sig):  # a "few-step" method that returns the teacher's reference itself
        return VB.euler(teacher)(noise, ctx, VB.TR.grid_sigmas(4, 3.0))

    res = VB.evaluate(teacher, {"exact": exact, "euler": VB.euler(teacher), "other": VB.euler(other)},
                      n_pairs=3, steps=(2,), ref_steps=4)
    m = res["by_steps"]["2"]["methods"]
    assert m["exact"]["mse"] == 0 and m["exact"]["wins_mse"] == 3
    assert m["exact"]["sharpness"] == 1 and m["exact"]["consistency"] == 1
    assert m["euler"]["mse"] > 0 and m["other"]["mse"] > m["euler"]["mse"]
    assert sum(v["wins_total"] for v in m.values()) == 3
    assert res["samples"] == 3 and res["teacher"]["mse"] == 0
    assert "| 2 | other |" in VB.markdown(res)


def test_cli_scores_euler_dcm_and_single_expert(tmp_path, capsys):
    torch.set_num_threads(1)
    tdir = tmp_path / "run" / "teacher"
    tiny.build_transformer(FAMILY_WAN, TINY, seed=0).save_pretrained(str(tdir), safe_serialization=True)
    dcm_file = tiny.save_official_checkpoint(tiny.make_official_model(FAMILY_WAN, TINY, seed=3), tmp_path / "dcm.safetensors")
    single_file = tmp_path / "single.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.build_transformer(FAMILY_WAN, TINY, seed=5).state_dict().items()},
              str(single_file))
    out = tmp_path / "vb.json"
    assert VB.main(["--teacher", str(tdir), "--dcm", str(dcm_file), "--single", str(single_file), "--pairs", "2",
                    "--steps", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["by_steps"]["2"]["methods"]
    assert set(m) == {"euler", "dcm", "single_expert_cm"}
    assert all(math.isfinite(v["mse"]) and v["mse"] > 0 for v in m.values())
    assert m["dcm"]["mse"] != m["euler"]["mse"]
    assert "| 2 | dcm |" in capsys.readouterr().out


def test_cli_needs_a_teacher_folder_for_expert_files(tmp_path):
    with pytest.raises(SystemExit):
        VB.main(["--dcm", "x.safetensors"])
