"""Checkpoint / resume: a run killed after its step-2 checkpoint continues bit-identically."""

from __future__ import annotations

import json
import logging
import shutil
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
from dcm_core.train.trainer import DCMTrainer

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


def _json_state(run: Path, step: int) -> dict[str, object]:
    """The checkpoint's JSON files: LR scheduler, optimizer hyper-parameters (the lr of every group), trainer state."""
    d = run / "checkpoints" / f"checkpoint-{step:08d}"
    out = {f.name: json.loads(f.read_text()) for f in sorted(d.glob("*.json")) if f.name != ck.MANIFEST and not f.name.startswith("rng-")}
    assert {"scheduler.json", "optimizer.json", "trainer_state.json"} <= out.keys(), sorted(out)
    return out


def _assert_same_state(a: Path, b: Path, step: int) -> None:
    ja, jb = _json_state(a, step), _json_state(b, step)
    for j in (ja, jb):  # the run folder differs between two runs by design
        j["trainer_state.json"]["config"].pop("output_dir")
    assert ja.keys() == jb.keys()
    for name in ja:
        assert ja[name] == jb[name], f"{name} differs after resume"
    assert ja["scheduler.json"]["last_epoch"] == step


def test_kill_and_resume_is_bit_identical(tmp_path, th):
    """4 steps straight == 2 steps + SIGKILL + resume latest + 2 steps (detail stage: G, D, EMA, all RNGs, and a
    warm-up + cosine LR schedule: multipliers 0, 1, 0.75, 0.25 — a scheduler restarted at step 0 on resume would
    use 1 instead of 0.25 for step 4)."""
    data = th.make_dataset(tmp_path / "data", "wan", n=3)
    extra = dict(max_train_steps=4, checkpoint__every_steps=2, optim__use_ema="true", data__caption_dropout=0.5,
                 export__at_end="false", optim__lr=1e-4, optim__lr_scheduler="cosine", optim__lr_warmup_steps=1)
    # A: uninterrupted, in-process
    DCMTrainer(th.tiny_config("wan", "detail", data, tmp_path / "A", **extra)).train()
    # B: a subprocess that sleeps after publishing checkpoint 2 and is SIGKILLed there
    cfg_b = th.tiny_config("wan", "detail", data, tmp_path / "B", **extra)
    cfg_file = tmp_path / "b.json"
    cfg_file.write_text(json.dumps(cfg_b.to_dict()))
    env = th.subprocess_env()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parent / "hang_child.py"), "2", "--", "train", "--config", str(cfg_file)],
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
    _assert_same_state(tmp_path / "A", tmp_path / "B", 4)
    for r in (0,):
        a = load_file(str(tmp_path / "A" / "checkpoints" / "checkpoint-00000004" / f"rng-rank{r}.safetensors"))
        b = load_file(str(tmp_path / "B" / "checkpoints" / "checkpoint-00000004" / f"rng-rank{r}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_linear_warmup_schedule_is_exact_and_follows_the_schedule(tmp_path, th):
    """Fixed run length (4 steps, linear decay after 1 warm-up step): the run cut back to its step-2 checkpoint and
    resumed writes a step-4 checkpoint bit-identical to the one it wrote uninterrupted — weights, optimizer and EMA
    tensors, scheduler.json, optimizer.json and trainer_state.json — and the LR after each step is the
    hand-computed one (a scheduler restarted at step 0 on resume would give step 4 the multiplier 1, not 1/3)."""
    data = th.make_dataset(tmp_path / "data", "wan", n=3)
    lr = 1e-4
    extra = dict(max_train_steps=4, checkpoint__every_steps=2, checkpoint__keep=0, optim__use_ema="true",
                 export__at_end="false", optim__lr=lr, optim__lr_scheduler="linear", optim__lr_warmup_steps=1)
    run = tmp_path / "run"
    res = DCMTrainer(th.tiny_config("wan", "semantic", data, run, **extra)).train()
    # linear with 1 warm-up step over 4 steps: multiplier(step) = 0 | 1, 2/3, 1/3, 0; the lr logged after step k
    # is the one step k + 1 uses, lr · multiplier(k)
    assert [h["lr"] for h in res.history] == pytest.approx([lr, lr * 2 / 3, lr / 3, 0.0], rel=1e-6, abs=1e-15)
    tensors, state = _final(run, 4), _json_state(run, 4)
    shutil.rmtree(run / "checkpoints" / "checkpoint-00000004")
    tr = DCMTrainer(th.tiny_config("wan", "semantic", data, run, **extra), resume="latest")
    assert tr.global_step == 2
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 2 / 3, rel=1e-6)
    res_b = tr.train()
    assert [h["lr"] for h in res_b.history] == pytest.approx([lr / 3, 0.0], rel=1e-6, abs=1e-15)
    _assert_same(tensors, _final(run, 4))
    again = _json_state(run, 4)
    for name in state:
        assert state[name] == again[name], f"{name} differs after resume"
    assert again["scheduler.json"]["last_epoch"] == 4


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
    # the damaged newer checkpoints were moved aside, so rotation / "latest" never pick them again; only the
    # newest one is kept for a post-mortem, and the killed write's temp folder is gone
    assert [p.name for _, p in ck.list_checkpoints(root)] == ["checkpoint-00000001"]
    assert sorted(p.name for p in root.iterdir()) == [".broken-checkpoint-00000003", "checkpoint-00000001"]
    with pytest.raises(DCMCheckpointError):
        ck.resolve_resume(str(newest), root)
    with pytest.raises(DCMCheckpointError):
        ck.resolve_resume("latest", tmp_path / "empty")


def _fake_checkpoint(root: Path, step: int) -> Path:
    w = ck.CheckpointWriter(root, step)
    w.prepare()
    w.tensors("trainable.safetensors", {"w": torch.full((2,), float(step))})
    w.json("trainer_state.json", {"global_step": step})
    return w.commit()


def test_manifest_damage_of_any_kind_is_a_reason_not_a_crash(tmp_path):
    root = tmp_path / "checkpoints"
    good, newest = _fake_checkpoint(root, 1), _fake_checkpoint(root, 2)
    mf = newest / ck.MANIFEST
    text = mf.read_bytes()
    for bad in (b"\xff" + text, b"[1, 2]", b'{"files": [1]}', b'{"files": {"x": 3}}', b"", text[:10],
                b'{"files": {"../x": {"bytes": 1}, "trainable.safetensors": {}, "trainer_state.json": {}}}'):
        mf.write_bytes(bad)
        why = ck.verify_checkpoint(newest)
        assert why is not None and ("MANIFEST.json" in why or "not listed" in why or "not a file" in why), (bad, why)
        warnings: list[str] = []
        assert ck.find_latest_valid(root, warn=warnings.append) == good
        assert len(warnings) == 1 and newest.name in warnings[0] and "skipping" in warnings[0]


def test_rotation_goes_through_the_trash_and_cleans_leftovers(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _fake_checkpoint(root, step)
    # leftovers of interrupted deletions: a half-deleted checkpoint in the trash, a replaced one
    (root / ck.TRASH / "checkpoint-00000000").mkdir(parents=True)
    (root / ".old-checkpoint-00000002-123").mkdir()
    deleted: list[str] = []
    real = ck.shutil.rmtree

    def rmtree(path, *a, **k):
        deleted.append(str(Path(path).relative_to(root)))
        return real(path, *a, **k)

    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    removed = ck.rotate(root, keep=2)
    assert [p.name for p in removed] == ["checkpoint-00000001"]
    # an old checkpoint is never deleted under its published name: renamed into .trash/ first
    assert f"{ck.TRASH}/checkpoint-00000001" in deleted and "checkpoint-00000001" not in deleted
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-00000002", "checkpoint-00000003"]
    assert ck.rotate(root, keep=0) == [] and len(ck.list_checkpoints(root)) == 2


def test_clean_for_resume_keeps_only_the_newest_broken_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 5):
        _fake_checkpoint(root, step)
    for step in (2, 3):
        (root / f"checkpoint-{step:08d}" / ck.MANIFEST).unlink()
    ck.set_aside_broken(root, root / "checkpoint-00000002")
    ck.set_aside_broken(root, root / "checkpoint-00000003")
    (root / ".tmp-checkpoint-00000006").mkdir()
    (root / ck.TRASH / "checkpoint-00000004").mkdir(parents=True)
    gone = ck.clean_for_resume(root)
    assert gone == [".broken-checkpoint-00000002", ".tmp-checkpoint-00000006", ck.TRASH]
    assert sorted(p.name for p in root.iterdir()) == [".broken-checkpoint-00000003", "checkpoint-00000001", "checkpoint-00000005"]


def test_resume_at_the_last_step_still_rotates(tmp_path, th):
    """A run killed after publishing its last checkpoint but before rotating leaves keep + 1 checkpoints; resuming
    it saves nothing, but the keep limit is applied all the same."""
    data = th.make_dataset(tmp_path / "data", "wan", n=2)
    cfg = th.tiny_config("wan", "semantic", data, tmp_path / "run", max_train_steps=3, checkpoint__every_steps=1,
                         checkpoint__keep=0, export__at_end="false")
    DCMTrainer(cfg).train()
    root = tmp_path / "run" / "checkpoints"
    assert len(ck.list_checkpoints(root)) == 3
    cfg2 = th.tiny_config("wan", "semantic", data, tmp_path / "run", max_train_steps=3, checkpoint__every_steps=1,
                          checkpoint__keep=2, export__at_end="false")
    tr = DCMTrainer(cfg2, resume="latest")
    assert tr.global_step == 3
    tr.train()
    assert [s for s, _ in ck.list_checkpoints(root)] == [3, 2]


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
