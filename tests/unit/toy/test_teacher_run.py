"""The resumable toy teacher run (world v2): checkpoints, exact resume, progress files, the build CLI."""

from __future__ import annotations

import json

import pytest
import torch

from dcm_core.toy import build
from dcm_core.toy import teacher_run as TR

TINY = dict(dim=128, num_layers=1, ffn_dim=64)


def _cfg(**kw) -> TR.RunConfig:
    base = dict(arch=dict(TINY), steps=4, batch_size=2, warmup=1, ckpt_every=2, log_every=1, eval_every=0)
    base.update(kw)
    return TR.RunConfig(**base)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    torch.set_num_threads(1)
    straight = TR.train(_cfg(), tmp_path / "a", progress=False)
    TR.train(_cfg(), tmp_path / "b", progress=False, stop_after=2)  # "killed" after step 2 (checkpoint written)
    ck = TR.load_checkpoint(tmp_path / "b" / "ckpt.safetensors")
    assert ck["step"] == 2 and not (tmp_path / "b" / "teacher").exists()
    resumed = TR.train(_cfg(), tmp_path / "b", progress=False, resume=True)
    assert _same(straight, resumed)
    assert (tmp_path / "b" / "teacher" / "config.json").exists()
    assert (tmp_path / "b" / "teacher_raw" / "diffusion_pytorch_model.safetensors").exists()
    lines = (tmp_path / "b" / "train.log").read_text().splitlines()
    assert [int(x.split()[1].split("/")[0]) for x in lines] == [1, 2, 3, 4]
    assert "loss_ema" in lines[-1] and "eta" in lines[-1]


def test_refuses_to_clobber_or_to_resume_with_another_config(tmp_path):
    TR.train(_cfg(steps=2), tmp_path / "r", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        TR.train(_cfg(steps=2), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="lr"):
        TR.train(_cfg(steps=2, lr=1e-3), tmp_path / "r", progress=False, resume=True)
    TR.train(_cfg(steps=2, log_every=5), tmp_path / "r", progress=False, resume=True)  # logging may change


def test_eval_scores_are_written_and_cfg_sampling_runs(tmp_path):
    TR.train(_cfg(steps=2, eval_every=2, eval_steps=2), tmp_path / "e", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "e" / "eval.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["samples"] == len(TR.EVAL_PROMPTS)
    assert {"all_ok", "motion_error_px", "hf_energy", "warp_error", "listens_shape", "listens_motion",
            "word_cosine_shape", "word_cosine_direction"} <= set(rows[-1])
    model = TR.build_model(_cfg()).eval()
    noise = torch.randn(1, 16, 6, 12, 12)
    ctx = torch.randn(1, 8, 4096) * 0.05
    a = TR.sample(model, noise, ctx, TR.grid_sigmas(2, 3.0), cfg_scale=1.0)
    b = TR.sample(model, noise, ctx, TR.grid_sigmas(2, 3.0), cfg_scale=3.0)
    assert a.shape == noise.shape and not torch.allclose(a, b)


def test_grid_sigmas():
    s = TR.grid_sigmas(50, 17.0)
    assert len(s) == 51 and s[0] == 1.0 and s[-1] == 0.0
    assert s[-2] == pytest.approx(0.257576, abs=1e-5)  # DCM's grid ends with one jump 0.26 → 0
    assert TR.grid_sigmas(50, 3.0)[-2] == pytest.approx(3 * 0.02 / (1 + 2 * 0.02))


def test_build_cli_v2_teacher_only(tmp_path, capsys):
    argv = ["--world", "v2", "--teacher-only", "--work", str(tmp_path), "--teacher-steps", "1", "--arch", "128,1,64",
            "--batch-size", "1"]
    assert build.main(argv) == 0
    assert (tmp_path / "teacher_run" / "teacher" / "config.json").exists()
    assert build.main(argv) == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert build.main(argv + ["--resume"]) == 0  # already complete: re-exports, no more steps


def test_train_sigmas_put_a_share_of_the_batch_in_the_high_noise_band():
    import numpy as np

    from dcm_core.schedule import flow_shift

    s = TR.train_sigmas(TR.RunConfig(band_frac=0.5, band_min=0.75), np.random.default_rng(0), 20000).numpy()
    assert s.min() >= 0 and s.max() <= 1
    plain = flow_shift(np.random.default_rng(1).random(20000), 3.0)
    in_band, plain_in_band = (s >= 0.75).mean(), (plain >= 0.75).mean()
    assert in_band == pytest.approx(0.5 + 0.5 * plain_in_band, abs=0.02)  # the band share plus the grid's own
    none = TR.train_sigmas(TR.RunConfig(band_frac=0.0), np.random.default_rng(2), 1000).numpy()
    assert np.allclose(none, flow_shift(np.random.default_rng(2).random(1000), 3.0), atol=1e-6)
