"""Bad inputs give the documented error (or warning) before any model work where possible."""

from __future__ import annotations

import logging

import pytest
import torch

from dcm_core.latents import to_model_space


def _run_fail(comfy, prompt):
    import os
    res = comfy.run(prompt)
    assert not res.success, "expected the run to fail"
    print("\n[msg]", res.error_text()) if os.environ.get("DCM_SHOW") else None
    return res.error_text()


@pytest.fixture(scope="module")
def bad_files(dcm):
    from safetensors.torch import save_file

    from dcm_core.formats import load_experts

    diff_dir, lora_dir = dcm.h.model_dir("diffusion_models"), dcm.h.model_dir("loras")
    # a plain Wan model in ComfyUI layout, no DCM experts
    sem = load_experts(diff_dir / dcm.families["wan"].official, dtype=torch.float32).semantic_sd
    save_file({k: v.contiguous() for k, v in sem.items()}, str(diff_dir / "plain_wan.safetensors"))
    (diff_dir / "garbled.safetensors").write_bytes(b"\x00\x10not a safetensors file" * 64)
    (lora_dir / "garbled_expert.safetensors").write_bytes(b"\xff" * 100)
    (lora_dir / "official_in_loras.safetensors").symlink_to(diff_dir / dcm.families["wan"].official)
    save_file(
        {"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.randn(4, 128), "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.randn(256, 4)},
        str(lora_dir / "plain_style_lora.safetensors"),
    )
    return {"plain": "plain_wan.safetensors", "garbled": "garbled.safetensors"}


def test_plain_wan_model_in_checkpoint_loader(dcm, comfy, bad_files):
    msg = _run_fail(comfy, dcm.sampler_prompt("wan", ckpt=bad_files["plain"]))
    assert "DCMCheckpointLoader" in msg and "DCMUnsupportedFileError" in msg
    assert "DCM Checkpoint Loader:" in msg and "plain" in msg and "Load Diffusion Model" in msg


def test_garbled_file(dcm, comfy, bad_files):
    msg = _run_fail(comfy, dcm.sampler_prompt("wan", ckpt=bad_files["garbled"]))
    assert "DCMFormatError" in msg and "garbled.safetensors" in msg


def _expert_prompt(dcm, lora_name):
    p = dcm.sampler_prompt("wan", seed=3)
    p["20"] = {"class_type": "DCMExpertLoraLoader", "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength": 1.0}}
    p["5"]["inputs"]["detail_model"] = ["20", 0]
    return p


def test_hunyuan_expert_on_wan_model(dcm, comfy):
    msg = _run_fail(comfy, _expert_prompt(dcm, dcm.families["hunyuan_video"].detail))
    assert "DCMIncompatibleModelError" in msg and "DCM Expert LoRA Loader:" in msg
    assert "HunyuanVideo" in msg and "Wan" in msg


@pytest.mark.parametrize("name,expect", [
    ("official_in_loras.safetensors", "DCM Checkpoint Loader"),
    ("plain_style_lora.safetensors", "LoraLoaderModelOnly"),
    ("garbled_expert.safetensors", "garbled_expert.safetensors"),
])
def test_expert_loader_refuses_other_kinds(dcm, comfy, bad_files, name, expect):
    msg = _run_fail(comfy, _expert_prompt(dcm, name))
    assert "DCM Expert LoRA Loader:" in msg and expect in msg


def test_boundary_leaving_detail_expert_no_steps_warns_and_runs_semantic(dcm, caplog):
    from dcm_core.schedule import build_sigmas

    with caplog.at_level(logging.WARNING, logger="DCM"):
        out = dcm.run(dcm.sampler_prompt("wan", seed=8, boundary=1.0))
    assert any("leaves the detail expert no steps" in r.getMessage() and "All 6 step(s) run on the semantic expert" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    ref = dcm.reference("wan", 8, build_sigmas("wan2.1-t2v-6step"), 1.0)  # boundary 1: every step semantic
    assert (to_model_space(out, "wan") - to_model_space(ref, "wan")).abs().max().item() <= 1e-4


def test_schedule_leaving_semantic_expert_no_steps_warns_and_runs_detail(dcm, caplog):
    sched = {"preset": "custom", "semantic_steps": 3, "detail_steps": 3, "steps": 6, "boundary_timestep": 978.0,
             "custom_sigmas": "0.9, 0.5"}
    with caplog.at_level(logging.WARNING, logger="DCM"):
        out = dcm.run(dcm.sampler_prompt("wan", seed=8, schedule=sched))
    assert any("leaves the semantic expert no steps" in r.getMessage() for r in caplog.records)
    ref = dcm.reference("wan", 8, [0.9, 0.5, 0.0], 978.0)
    assert (to_model_space(out, "wan") - to_model_space(ref, "wan")).abs().max().item() <= 1e-4


def test_empty_custom_sigmas_fails_validation(dcm, comfy):
    sched = {"preset": "custom", "semantic_steps": 3, "detail_steps": 3, "steps": 6, "boundary_timestep": 978.0,
             "custom_sigmas": "   "}
    res = comfy.run(dcm.sampler_prompt("wan", schedule=sched), check_valid=False)
    text = str(res.node_errors)
    assert res.node_errors and "custom_sigmas is empty" in text


@pytest.mark.parametrize("boundary", [0.0, 1000.0, -5.0])
def test_boundary_outside_range_fails_validation(dcm, comfy, boundary):
    res = comfy.run(dcm.sampler_prompt("wan", boundary=boundary), check_valid=False)
    assert res.node_errors and "outside (0, 1000)" in str(res.node_errors)


def test_custom_preset_without_sigmas_input(dcm, comfy):
    msg = _run_fail(comfy, dcm.sampler_prompt("wan", preset="custom"))
    assert "preset 'custom' needs the optional sigmas input" in msg


def test_conditioning_batch_that_cannot_broadcast(dcm, comfy):
    msg = _run_fail(comfy, dcm.sampler_prompt("wan", batch=2, cond_batch=3))
    assert "DCMSamplingError" in msg and "batch 3" in msg and "batch 2" in msg


# ---------------------------------------------------------------- direct adapter calls


@pytest.fixture()
def experts(dcm):
    return dcm.loading().load_dcm_checkpoint(dcm.families["wan"].official, "default")


def _sample(dcm, experts, latent, **kw):
    ctx, _ = dcm.cond("wan")
    args = dict(seed=4, preset="wan2.1-t2v-6step", boundary_timestep=978.0, cfg_semantic=1.0, cfg_detail=1.0)
    args.update(kw)
    return dcm.sampling().sample_dual_expert(experts[0], experts[1], [[ctx, {}]], [[ctx, {}]], latent, **args)


def test_latent_channel_mismatch(dcm, experts):
    errors = dcm.h.pack_module("dcm_core.errors")
    with pytest.raises(errors.DCMSamplingError, match=r"shape \[1, 4, 2, 4, 4\].*expects \[batch, 16"):
        _sample(dcm, experts, {"samples": torch.randn(1, 4, 2, 4, 4)})


def test_latent_with_nan(dcm, experts):
    errors = dcm.h.pack_module("dcm_core.errors")
    lat = dcm.empty_latent()
    lat[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(errors.DCMSamplingError, match="1 NaN/Inf"):
        _sample(dcm, experts, {"samples": lat})


def test_nan_during_detail_steps_names_step_and_expert_and_restores_weights(dcm, experts):
    import comfy.patcher_extension as pe

    errors = dcm.h.pack_module("dcm_core.errors")
    semantic, detail = experts
    broken = detail.clone()
    broken.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "nan", lambda ex, x, t, *a, **k: ex(x, t, *a, **k) * float("nan"))
    with pytest.raises(errors.DCMSamplingError, match=r"step 3 \(detail expert, sigma=0\.949\)"):
        _sample(dcm, (semantic, broken), {"samples": dcm.empty_latent()})
    # the next run loads the semantic clone: ComfyUI restores the shared weights from its backups
    import comfy.model_management

    comfy.model_management.load_models_gpu([semantic])
    sd = semantic.model.diffusion_model.state_dict()
    ref = dcm.h.pack_module("dcm_core.formats").load_experts(
        dcm.h.model_dir("diffusion_models") / dcm.families["wan"].official, dtype=torch.float32).semantic_sd
    bad = [k for k in ref if not torch.equal(sd[k].float(), ref[k].float())]
    assert set(sd) == set(ref) and not bad, f"{len(bad)} weights are not the semantic expert's, e.g. {bad[:3]}"


@pytest.mark.parametrize("sigmas,match", [
    (torch.tensor([]), "needs at least two"),
    (torch.tensor([1.0]), "needs at least two"),
    (torch.tensor([1.0, 0.5, 0.7, 0.0]), "strictly descending"),
    (torch.tensor([1.0, float("nan"), 0.0]), "outside"),
    (torch.tensor([2.0, 0.5, 0.0]), "outside"),
])
def test_bad_sigmas(dcm, experts, sigmas, match):
    errors = dcm.h.pack_module("dcm_core.errors")
    with pytest.raises(errors.DCMScheduleError, match=match):
        _sample(dcm, experts, {"samples": dcm.empty_latent()}, sigmas=sigmas)
