"""``train --plan``: the memory plan is built without weights and its counts agree with the real trainer's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dcm_core.train.plan import GiB, make_plan

ROOT = Path(__file__).resolve().parents[3]


def test_plan_counts_match_the_trainer(tmp_path, th):
    from dcm_core.train.models import build_models

    data = th.make_dataset(tmp_path / "data", "wan")
    for stage in ("semantic", "detail"):
        cfg = th.tiny_config("wan", stage, data, tmp_path / "run")
        plan = make_plan(cfg, device="cpu")
        models = build_models(cfg.resolved("wan"))
        assert plan.trainable == sum(p.numel() for _, p in models.trainable())
        assert plan.tokens == 5 * 4 * 4  # the dataset's 16x5x8x8 latents, patch (1, 2, 2)
        items = {name: b for name, b, _ in plan.items}
        assert items["student weights (fp32)"] == sum(p.numel() * 4 for p in models.student.parameters())
        teacher = next(b for name, b in items.items() if name.startswith("teacher ("))
        assert teacher == sum(p.numel() * p.element_size() for p in models.teacher.parameters())
        assert ("discriminator activations (fake + real)" in items) == (stage == "detail")


def test_checkpointing_and_sharding_shrink_the_plan(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "wan")
    cfg = th.tiny_config("wan", "detail", data, tmp_path / "run", model__tiny_config="{dim = 256, num_layers = 4, ffn_dim = 512}")
    video = (81, 480, 832)
    full = make_plan(cfg, video=video)
    ck = make_plan(th.tiny_config("wan", "detail", data, tmp_path / "run", model__gradient_checkpointing="true",
                                  model__tiny_config="{dim = 256, num_layers = 4, ffn_dim = 512}"), video=video)
    act = lambda p: sum(b for n, b, _ in p.items if n.startswith(("student activations", "teacher activations")))  # noqa: E731
    assert full.tokens == ck.tokens == 21 * 30 * 52
    assert act(ck) < 0.5 * act(full)
    sharded = make_plan(cfg, video=video, num_gpus=8)
    assert dict((n, b) for n, b, _ in sharded.items)["student weights (fp32)"] * 8 == dict(
        (n, b) for n, b, _ in full.items)["student weights (fp32)"]


def test_cli_prints_the_plan_and_the_verdict(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "wan")
    args = th.tiny_overrides("wan", data, tmp_path / "run")
    cmd = [sys.executable, "-m", "dcm_core", "train", "--stage", "detail", *args, "--plan", "--num-gpus", "2", "--gpu-memory"]
    for gib, verdict in (("80", "fits in 80 GiB"), ("0.001", "does NOT fit")):
        p = subprocess.run(cmd + [gib], cwd=ROOT, env=th.subprocess_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "FSDP2" in p.stdout and "student activations" in p.stdout and verdict in p.stdout, p.stdout
    assert not (tmp_path / "run").exists(), "--plan must not start a run"
    assert GiB == 2**30


def test_plan_follows_bf16_gathers_sharded_teacher_and_bf16_base(tmp_path, th):
    """What changed in the trainer shows in the plan: bf16 all-gathers under mixed_precision = bf16 (half the fp32
    buffers), parallel.shard_teacher (teacher blocks / N plus two gathered blocks), model.detail_base_dtype = bf16
    (the student's frozen base at 2 bytes), each equal to the counts of the built modules."""
    from dcm_core.train.models import build_models

    data = th.make_dataset(tmp_path / "data", "wan")
    tiny = "{dim = 256, num_layers = 4, ffn_dim = 512}"

    def items(**kw):
        cfg = th.tiny_config("wan", "detail", data, tmp_path / "run", model__tiny_config=tiny, **kw)
        return {n: b for n, b, _ in make_plan(cfg, num_gpus=4, video=(81, 480, 832)).items}, cfg

    fp32, _ = items()
    bf16, cfg = items(mixed_precision="bf16")
    assert bf16["FSDP all-gather buffers"] * 2 == fp32["FSDP all-gather buffers"]
    whole = bf16["teacher (bfloat16, replicated)"]
    sharded, _ = items(mixed_precision="bf16", parallel__shard_teacher="true")
    models = build_models(cfg.resolved("wan"))
    blocks = sum(p.numel() * p.element_size() for p in models.teacher.blocks.parameters())
    assert whole == sum(p.numel() * p.element_size() for p in models.teacher.parameters())
    assert sharded["teacher (bfloat16, blocks sharded)"] == whole - blocks + blocks / 4
    assert sharded["teacher all-gather buffers"] == 2 * blocks / 4  # two of the 4 equal blocks
    base, cfg_b = items(mixed_precision="bf16", model__detail_base_dtype="bf16")
    student = build_models(cfg_b.resolved("wan")).student
    assert base["student weights (frozen base bf16)"] * 4 == sum(p.numel() * p.element_size() for p in student.parameters())
    assert base["student weights (frozen base bf16)"] < 0.7 * bf16["student weights (fp32)"]  # (tiny: fp32 LoRA, *_lora)
