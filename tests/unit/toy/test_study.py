"""The pre-distillation studies (world hardness per step count, the reference grid's shift) on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from dcm_core.toy import study, world_v2
from dcm_core.toy import teacher_run as TR


@pytest.fixture(scope="module")
def tiny_model():
    torch.set_num_threads(1)
    return TR.build_model(TR.RunConfig(arch=dict(dim=128, num_layers=1, ffn_dim=64))).eval()


def test_hardness_reports_every_step_count(tiny_model):
    res = study.hardness(tiny_model, world_v2, n_prompts=2, ref_steps=6)
    assert res["samples"] == 2
    labels = list(res["few_step"])
    assert labels[:3] == ["2 steps, toy grid (shift 3)", "4 steps, toy grid (shift 3)", "6 steps, toy grid (shift 3)"]
    six = res["few_step"]["6 steps, toy grid (shift 3)"]
    assert six["mse"] == pytest.approx(0.0, abs=1e-10)  # the same grid as the 6-step reference: identical
    assert res["few_step"]["2 steps, toy grid (shift 3)"]["mse"] > 0
    assert res["few_step"]["6 steps, wan2.1-t2v-6step"]["sigmas"] == [1.0, 0.992, 0.982, 0.949, 0.905, 0.81, 0.0]


def test_shift_study_names_the_last_jump(tiny_model):
    res = study.shift_study(tiny_model, world_v2, shifts=(3.0, 17.0), steps=8, converged_steps=8, n_prompts=1)
    assert res["shifts"]["3"]["mse"] == pytest.approx(0.0, abs=1e-10)  # converged reference is 8 steps at shift 3
    assert res["shifts"]["17"]["mse"] > 0
    assert res["shifts"]["17"]["last_sigma_before_0"] == pytest.approx(17 / 8 / (1 + 16 / 8), abs=1e-6)
    assert res["converged_uncertainty_mse"] > 0


def test_cli_reads_a_run_checkpoint(tmp_path, capsys):
    cfg = TR.RunConfig(arch=dict(dim=128, num_layers=1, ffn_dim=64), steps=1, batch_size=1, eval_every=0)
    TR.train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "s.json"
    assert study.main(["--ckpt", str(tmp_path / "run" / "ckpt.safetensors"), "--prompts", "1", "--only", "hardness",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["world"] == "world_v2" and res["teacher"]["step"] == 1 and "shift_study" not in res
    capsys.readouterr()


def test_spectral_proxy_v2_has_more_fine_detail_decided_only_at_low_noise():
    from dcm_core.toy import world

    v1 = study.spectral_decided(world, n_clips=24)
    v2 = study.spectral_decided(world_v2, n_clips=24)
    assert v2["hf_share_of_energy"] > 2 * v1["hf_share_of_energy"]
    for r in (v1, v2):
        fine = [x["fine"] for x in r["by_sigma"].values()]  # σ descending → decided share non-decreasing
        assert fine == sorted(fine) and fine[0] == 0.0 and fine[-1] > 0.9
        assert r["by_sigma"]["0.81"]["fine"] == 0.0  # the wan preset's last jump starts with no fine detail decided


def test_conditioning_sensitivity_sees_a_deaf_text_path(tiny_model):
    import copy

    res = study.conditioning_sensitivity(tiny_model, world_v2, sigmas=(0.8,), bases=("red circle moving right",),
                                         n_noise=1)
    assert set(res["0.8"]) == {"colour", "shape", "motion", "unconditional"}
    assert all(v > 0 for v in res["0.8"].values())
    deaf = copy.deepcopy(tiny_model)
    for p in deaf.condition_embedder.text_embedder.parameters():
        torch.nn.init.zeros_(p)
    res = study.conditioning_sensitivity(deaf, world_v2, sigmas=(0.8,), bases=("red circle moving right",), n_noise=1)
    assert all(v == 0 for v in res["0.8"].values())
    assert study._swap("red circle moving right", "motion") == "red circle moving up"
    assert study._swap("magenta diamond shrinking", "shape") == "magenta circle shrinking"


def test_word_separation_sees_a_collapsed_text_embedder(tiny_model):
    import copy

    fresh = study.word_separation(tiny_model, world_v2)
    assert set(fresh) == {"colour", "shape", "direction"}
    assert all(g["max_cosine"] < 0.9 for g in fresh.values())  # a random projection keeps the words apart
    collapsed = copy.deepcopy(tiny_model)
    lin = collapsed.condition_embedder.text_embedder.linear_1
    with torch.no_grad():  # the words no longer reach the output: every word lands on the same vector
        lin.weight.zero_()
        lin.bias.normal_()
    res = study.word_separation(collapsed, world_v2)
    assert all(g["max_cosine"] > 0.999 for g in res.values())


def test_word_value_colour_and_motion_are_worth_more_than_shape_at_high_noise():
    res = study.word_value(world_v2, per_prompt=16, tests_per_prompt=3, sigmas=(0.98,),
                           prompts=("red circle moving right",))
    g = res["by_sigma"]["0.98"]
    assert g["colour"]["gain"] > 0 and g["motion"]["gain"] > 0
    assert g["shape"]["gain"] < 0.5 * min(g["colour"]["gain"], g["motion"]["gain"])
    assert res["tests"] == 3


def test_cli_word_value_needs_no_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "WORD_VALUE_CLIPS", 4)
    monkeypatch.setattr(study, "WORD_VALUE_PROMPTS", ("red circle moving right",))
    out = tmp_path / "wv.json"
    assert study.main(["--only", "word-value", "--world", "v2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res) == ["v2"] and set(res["v2"]["by_sigma"]["0.9"]) == {"colour", "shape", "motion"}
    capsys.readouterr()


def test_ridge_r2_finds_position_only_where_it_is():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (400, 3), generator=g).float()
    mixed = torch.cat([pos @ torch.randn(3, 8, generator=g), torch.randn(400, 8, generator=g)], 1)
    r2 = study.ridge_r2(mixed[:300], pos[:300], mixed[300:], pos[300:])
    assert min(r2) > 0.99
    r2 = study.ridge_r2(torch.randn(400, 16, generator=g)[:300], pos[:300], torch.randn(100, 16, generator=g), pos[300:])
    assert max(r2) < 0.1


def test_position_probe_reports_every_block(tiny_model):
    res = study.position_probe(tiny_model, world_v2, sigmas=(0.98,), n_train=2, n_test=1)
    assert set(res["0.98"]) == {"input", "block0"}
    assert set(res["0.98"]["input"]) == {"frame", "row", "column"}
    assert res["0.98"]["input"]["frame"] < 0.2  # pure noise in, a patch embedding out: no position
    assert not tiny_model._forward_hooks and not tiny_model.blocks[0]._forward_hooks  # hooks removed
