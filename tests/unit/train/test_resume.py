"""Checkpoint / resume: a run killed after its step-2 checkpoint continues bit-identically."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcm_core.errors import DCMCheckpointError
from dcm_core.train import checkpoint as ck
from dcm_core.train.trainer import DEBUG_HANG_ENV, DCMTrainer

ROOT = Path(__file__).resolve().parents[3]


def _final(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    d = run / "checkpoints" / f"checkpoint-{step:08d}"
    return {f.name: load_file(str(f)) for f in sorted(d.glob("*.safetensors")) if not f.name.startswith("rng-")}


def _assert_same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for fname in a:
        assert a[fname].keys() == b[fname].keys(), fname
        for k in a[fname]:
            assert torch.equal(a[fname][k], b[fname][k]), f"{fname}:{k} differs"


def test_kill_and_resume_is_bit_identical(tmp_path, th):
    """4 steps straight == 2 steps + SIGKILL + resume latest + 2 steps (detail stage: G, D, EMA, all RNGs)."""
    data = th.make_dataset(tmp_path / "data", "wan", n=3)
    extra = dict(max_train_steps=4, checkpoint__every_steps=2, optim__use_ema="true", data__caption_dropout=0.5,
                 export__at_end="false", optim__lr=1e-4)
    # A: uninterrupted, in-process
    DCMTrainer(th.tiny_config("wan", "detail", data, tmp_path / "A", **extra)).train()
    # B: a subprocess that sleeps after publishing checkpoint 2 and is SIGKILLed there
    cfg_b = th.tiny_config("wan", "detail", data, tmp_path / "B", **extra)
    cfg_file = tmp_path / "b.json"
    cfg_file.write_text(json.dumps(cfg_b.to_dict()))
    env = th.subprocess_env()
    env[DEBUG_HANG_ENV] = "2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcm_core", "train", "--config", str(cfg_file)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    ckpt2 = tmp_path / "B" / "checkpoints" / "checkpoint-00000002"
    try:
        deadline = time.time() + 120
        while not (ckpt2 / ck.MANIFEST).is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no step-2 checkpoint within 120 s"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "B" / "checkpoints" / "checkpoint-00000004").exists()
    # resume in-process, continue to step 4
    tr = DCMTrainer(th.tiny_config("wan", "detail", data, tmp_path / "B", **extra), resume="latest")
    assert tr.global_step == 2
    tr.train()
    _assert_same(_final(tmp_path / "A", 4), _final(tmp_path / "B", 4))
    for r in (0,):
        a = load_file(str(tmp_path / "A" / "checkpoints" / "checkpoint-00000004" / f"rng-rank{r}.safetensors"))
        b = load_file(str(tmp_path / "B" / "checkpoints" / "checkpoint-00000004" / f"rng-rank{r}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_semantic_in_process_and_rotation(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "hunyuan_video", n=3)
    extra = dict(checkpoint__every_steps=1, checkpoint__keep=2, export__at_end="false", optim__lr=1e-4)
    DCMTrainer(th.tiny_config("hunyuan_video", "semantic", data, tmp_path / "A", max_train_steps=4, **extra)).train()
    DCMTrainer(th.tiny_config("hunyuan_video", "semantic", data, tmp_path / "B", max_train_steps=2, **extra)).train()
    tr = DCMTrainer(th.tiny_config("hunyuan_video", "semantic", data, tmp_path / "B", max_train_steps=4, **extra), resume="latest")
    tr.train()
    _assert_same(_final(tmp_path / "A", 4), _final(tmp_path / "B", 4))
    names = sorted(p.name for p in (tmp_path / "A" / "checkpoints").iterdir())
    assert names == ["checkpoint-00000003", "checkpoint-00000004"]  # keep = 2


def test_corrupted_newest_checkpoint_is_skipped(tmp_path, th, caplog):
    data = th.make_dataset(tmp_path / "data", "wan", n=2)
    cfg = th.tiny_config("wan", "semantic", data, tmp_path / "run", max_train_steps=3, checkpoint__every_steps=1,
                         checkpoint__keep=0, export__at_end="false")
    DCMTrainer(cfg).train()
    root = tmp_path / "run" / "checkpoints"
    newest = root / "checkpoint-00000003"
    blob = bytearray((newest / "trainable.safetensors").read_bytes())
    blob[-5] ^= 0xFF  # flip one bit of a weight
    (newest / "trainable.safetensors").write_bytes(bytes(blob))
    (root / "checkpoint-00000002" / ck.MANIFEST).unlink()  # an unfinished write
    (root / ".tmp-checkpoint-00000004").mkdir()  # a write killed before publication
    assert "sha256" in ck.verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="DCM.train"):
        found = ck.find_latest_valid(root)
    assert found == root / "checkpoint-00000001"
    assert "checkpoint-00000003" in caplog.text and "checkpoint-00000002" in caplog.text
    tr = DCMTrainer(cfg, resume="latest")
    assert tr.global_step == 1
    # the damaged newer checkpoints were moved aside, so rotation / "latest" never pick them again
    assert [p.name for _, p in ck.list_checkpoints(root)] == ["checkpoint-00000001"]
    assert (root / ".broken-checkpoint-00000003").is_dir()
    with pytest.raises(DCMCheckpointError):
        ck.resolve_resume(str(newest), root)
    with pytest.raises(DCMCheckpointError):
        ck.resolve_resume("latest", tmp_path / "empty")


def test_optimizer_state_round_trips_without_pickle():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.0, 0.999))
    p.grad = torch.randn(3, 2)
    opt.step()
    t, meta = ck.optimizer_to_flat(opt.state_dict())
    json.dumps(meta)
    back = ck.optimizer_from_flat(t, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1.0)
    opt2.load_state_dict(back)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd2["param_groups"][0]["betas"] == (0.0, 0.999) and sd2["param_groups"][0]["lr"] == 1e-3
    for k in sd1["state"][0]:
        assert torch.equal(sd1["state"][0][k], sd2["state"][0][k])
