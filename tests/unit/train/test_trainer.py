"""Both stages on tiny Wan / HunyuanVideo: finite losses, which parameters move, overfitting."""

from __future__ import annotations

import math

import pytest
import torch

from dcm_core.modeling import DETAIL_ADAPTER, EXPERT_MODULES
from dcm_core.train.trainer import DCMTrainer


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def _is_detail_param(name: str, family: str) -> bool:
    extras = tuple(f"{m}." for m in EXPERT_MODULES[family].values())
    return f".lora_A.{DETAIL_ADAPTER}." in name or f".lora_B.{DETAIL_ADAPTER}." in name or name.startswith(extras)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
@pytest.mark.parametrize("stage", ["semantic", "detail"])
def test_two_steps_only_intended_parameters_move(family, stage, tmp_path, th):
    data = th.make_dataset(tmp_path / "data", family)
    cfg = th.tiny_config(family, stage, data, tmp_path / "run", export__at_end="false", data__caption_dropout=0.5)
    tr = DCMTrainer(cfg)
    student = tr.student_unwrapped
    teacher = tr.models.teacher
    s0, t0 = _snapshot(student), _snapshot(teacher)
    d0 = _snapshot(tr.disc_unwrapped) if tr.disc_unwrapped is not None else None
    result = tr.train()
    assert result.global_step == 2 and len(result.history) == 2
    for rec in result.history:
        assert all(math.isfinite(v) for v in rec.values()), rec
        assert "loss_cd" in rec
        assert ("loss_tc" in rec) == (stage == "semantic")
        assert ("loss_g" in rec and "loss_fm" in rec and "loss_d" in rec) == (stage == "detail")
    assert not _changed(t0, teacher), "the teacher must never change"
    changed = _changed(s0, student)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert changed <= trainable
    if stage == "semantic":
        assert trainable == set(s0), "semantic stage: full fine-tune"
        # q/k biases (softmax-invariant) and some norm scales get (near-)zero gradients; the rest moves
        assert len(changed) >= 0.8 * len(s0) and "proj_out.weight" in changed
    else:
        assert all(_is_detail_param(n, family) for n in trainable), sorted(trainable - {n for n in trainable if _is_detail_param(n, family)})[:5]
        assert any(".lora_B." in n for n in changed), "the LoRA B matrices must move"
        assert any(not (".lora_" in n) for n in changed), "the *_lora embedder / head must move"
        assert _changed(d0, tr.disc_unwrapped), "the discriminator must be trained"
    # the run folder has a checkpoint with a manifest and the metrics file
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-00000002" / "MANIFEST.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_semantic_lora_option_trains_only_the_adapter(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "wan")
    cfg = th.tiny_config(
        "wan", "semantic", data, tmp_path / "run", model__semantic_lora="true", model__semantic_lora_rank=4, optim__lr=1e-3
    )
    tr = DCMTrainer(cfg)
    assert tr.models.teacher is None  # the teacher is the student with its adapter off
    s0 = _snapshot(tr.student_unwrapped)
    res = tr.train()
    changed = _changed(s0, tr.student_unwrapped)
    assert changed and all(".lora_A.semantic." in n or ".lora_B.semantic." in n for n in changed)
    # the export merges the LoRA into plain diffusers weights
    from safetensors.torch import load_file

    sd = load_file(res.exported["transformer"])
    assert not any("lora" in k or "base_layer" in k for k in sd)
    base = {n: p for n, p in s0.items() if ".lora_" not in n}
    q = "blocks.0.attn1.to_q.weight"
    assert not torch.equal(sd[q], base["blocks.0.attn1.to_q.base_layer.weight"])  # merged delta


def test_validation_sample_and_ema(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "hunyuan_video")
    cfg = th.tiny_config(
        "hunyuan_video", "detail", data, tmp_path / "run", validation__every_steps=2, optim__use_ema="true", export__at_end="false"
    )
    tr = DCMTrainer(cfg)
    tr.train()
    from safetensors.torch import load_file

    val = load_file(str(tmp_path / "run" / "validation" / "step-00000002.safetensors"))
    assert val["latents"].shape == (1, 16, 5, 8, 8) and torch.isfinite(val["latents"]).all()
    assert set(tr.ema.shadow) == {n for n, _ in tr.trainable}


def test_overfitting_one_sample_lowers_the_consistency_loss(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "wan", n=1)
    cfg = th.tiny_config(
        "wan", "semantic", data, tmp_path / "run", max_train_steps=50, optim__lr=1e-4, data__caption_dropout=0,
        export__at_end="false",
    )
    tr = DCMTrainer(cfg)
    before = tr.consistency_eval()
    tr.train()
    after = tr.consistency_eval()
    print(f"semantic overfit: consistency loss {before:.4g} -> {after:.4g}")
    assert after < 0.8 * before


def test_overfitting_detail_stage_with_gan(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "wan", n=1)
    cfg = th.tiny_config(
        "wan", "detail", data, tmp_path / "run", max_train_steps=40, optim__lr=1e-4, data__caption_dropout=0,
        export__at_end="false",
    )
    tr = DCMTrainer(cfg)
    before = tr.consistency_eval()
    tr.train()
    after = tr.consistency_eval()
    print(f"detail overfit: consistency loss {before:.4g} -> {after:.4g}")
    assert after < 0.97 * before


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_bf16_gradient_checkpointing_and_accumulation(family, tmp_path, th):
    """The GPU recipe's switches on CPU: bf16 autocast + bf16 teacher, checkpointed blocks, 2 micro-batches."""
    data = th.make_dataset(tmp_path / "data", family, n=4)
    cfg = th.tiny_config(
        family, "detail", data, tmp_path / "run", mixed_precision="bf16", model__gradient_checkpointing="true",
        gradient_accumulation_steps=2, export__at_end="false",
    )
    tr = DCMTrainer(cfg)
    assert tr.models.teacher.proj_out.weight.dtype == torch.bfloat16  # (norms / time embedder stay fp32)
    assert all(p.dtype == torch.float32 for _, p in tr.trainable)
    s0 = _snapshot(tr.student_unwrapped)
    res = tr.train()
    assert all(math.isfinite(v) for rec in res.history for v in rec.values())
    assert _changed(s0, tr.student_unwrapped)
    assert tr.data.state() == {"epoch": 0, "batch_in_epoch": 4}  # 2 steps × 2 micro-batches of 1 = 4 samples


def test_bf16_teacher_without_autocast(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "wan")
    cfg = th.tiny_config("wan", "detail", data, tmp_path / "run", model__teacher_dtype="bf16", export__at_end="false")
    res = DCMTrainer(cfg).train()
    assert all(math.isfinite(v) for rec in res.history for v in rec.values())
