"""The dual-expert sampler on a two-model base (Wan2.2 A14B-shaped: a high-noise and a low-noise model that
share no weights), loaded with stock UNETLoader, as artists wire Wan2.2 today.

The reference is the pack's pure-torch sampler over the two diffusers models: the high-noise model on the
steps the routing gives the semantic expert, the low-noise model on the others.
"""

from __future__ import annotations

import os

import pytest

from dcm_core.latents import to_model_space

TOL = 1e-4  # fp32; measured below


@pytest.fixture(scope="module")
def pair(dcm, tmp_path_factory):
    """Two different tiny Wan models (ComfyUI layout) in models/diffusion_models, plus their diffusers twins."""
    from dcm_core import tiny
    from dcm_core.formats import convert_official

    tmp = tmp_path_factory.mktemp("a14b")
    out = {}
    for role, seed in (("high", 11), ("low", 12)):
        model = tiny.make_official_model("wan", tiny.wan_config(num_layers=2), rank=4, alpha=8.0, seed=seed)
        official = tmp / f"tiny_a14b_{role}_official.safetensors"
        tiny.save_official_checkpoint(model, official, metadata={"lora_alpha": "8"})
        res = convert_official(official, tmp / role, dtype="fp32", name=f"tiny_a14b_{role}", progress=False)
        target = dcm.h.model_dir("diffusion_models") / f"tiny_a14b_{role}_noise.safetensors"
        os.replace(res.semantic_path, target)
        out[role] = (target.name, model)
    return out


def _prompt(dcm, pair, seed: int, boundary: float, sigmas: str) -> dict:
    p = dcm.sampler_prompt("wan", seed=seed, boundary=boundary, preset="custom")
    del p["1"]
    p["60"] = {"class_type": "UNETLoader", "inputs": {"unet_name": pair["high"][0], "weight_dtype": "default"}}
    p["61"] = {"class_type": "UNETLoader", "inputs": {"unet_name": pair["low"][0], "weight_dtype": "default"}}
    p["9"] = {"class_type": "DCMSchedule", "inputs": {
        "preset": "custom", "semantic_steps": 2, "detail_steps": 2, "steps": 4, "boundary_timestep": boundary,
        "custom_sigmas": sigmas}}
    p["5"]["inputs"].update({"semantic_model": ["60", 0], "detail_model": ["61", 0], "sigmas": ["9", 0]})
    return p


@pytest.mark.parametrize("boundary,sigmas", [
    (875.0, "1.0, 0.95, 0.9, 0.8, 0.5, 0.2"),  # Wan2.2 T2V boundary: 3 high-noise steps, 3 low-noise steps
    (900.0, "1.0, 0.93, 0.85, 0.6"),  # Wan2.2 I2V boundary: 2 + 2
])
def test_two_model_base_equals_reference(dcm, pair, boundary, sigmas):
    """Through a workflow: UNETLoader ×2 → DCM Dual-Expert Sampler; routing picks the model per step.
    Measured 4.8e-7 (875) and 6.0e-7 (900) max abs; swapping the two models moves the result by 0.62 / 0.73."""
    import torch

    from dcm_core.latents import from_model_space
    from dcm_core.modeling import velocity
    from dcm_core.sampler import sample_dcm
    from dcm_core.schedule import DETAIL, SEMANTIC, parse_custom_sigmas

    values = parse_custom_sigmas(sigmas)
    out = dcm.run(_prompt(dcm, pair, 31, boundary, sigmas))
    ctx, _ = dcm.cond("wan")

    def reference(models):
        def model_fn(x, sigma, expert):  # each model's own weights, no DCM adapter
            return velocity(models[expert], x, sigma, ctx, SEMANTIC)

        with torch.no_grad():
            return to_model_space(from_model_space(sample_dcm(model_fn, dcm.noise(31), values, boundary), "wan"), "wan")

    ref = reference({SEMANTIC: pair["high"][1], DETAIL: pair["low"][1]})
    swapped = reference({SEMANTIC: pair["low"][1], DETAIL: pair["high"][1]})
    diff = (to_model_space(out, "wan") - ref).abs().max().item()
    effect = (swapped - ref).abs().max().item()
    print(f"[two-model] boundary {boundary}: vs reference {diff:.3e}; models swapped {effect:.3e}")
    assert diff <= TOL
    assert effect > 100 * TOL


def test_two_model_base_loads_one_expert_per_segment_and_never_merges_them(dcm, pair):
    """Each segment asks ComfyUI to load only its own expert (so its model management may offload the other
    when VRAM is short), and after the run each model still holds exactly its file's weights."""
    import comfy.model_management
    import torch

    import nodes
    from dcm_core.formats import load_state_dict

    loader = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]()
    high = loader.load_unet(pair["high"][0], "default")[0]
    low = loader.load_unet(pair["low"][0], "default")[0]
    ctx, _ = dcm.cond("wan")
    loads = []
    real_load = comfy.model_management.load_models_gpu

    def recording(models, *a, **k):
        loads.append([m.model for m in models])
        return real_load(models, *a, **k)

    comfy.model_management.load_models_gpu = recording
    try:
        dcm.sampling().sample_dual_expert(high, low, [[ctx, {}]], [[ctx, {}]], {"samples": dcm.empty_latent()}, 3,
                                          "custom", 875.0, 1.0, 1.0, torch.tensor([1.0, 0.95, 0.9, 0.8, 0.5, 0.0]))
    finally:
        comfy.model_management.load_models_gpu = real_load
    expert_loads = [[m for m in batch if m in (high.model, low.model)] for batch in loads]
    assert [b for b in expert_loads if b] == [[high.model], [low.model]], loads
    for patcher, role in ((high, "high"), (low, "low")):
        comfy.model_management.load_models_gpu([patcher])
        live = patcher.model.diffusion_model.state_dict()
        ref = load_state_dict(dcm.h.model_dir("diffusion_models") / pair[role][0])
        bad = [k for k, v in ref.items() if not torch.equal(live[k.removeprefix("model.diffusion_model.")].float(), v.float())]
        assert len(ref) == len(live) and not bad, f"the {role}-noise model changed: {bad[:3]}"


@pytest.fixture(scope="module")
def dcm_a14b(dcm, tmp_path_factory):
    """DCM experts for a Wan2.2 T2V A14B-shaped pair, as the mapping defines them: the semantic expert is a full
    model distilled from the high-noise transformer (its converted *_semantic file); the detail expert is a
    pack-native LoRA file that applies onto the stock low-noise model (its converted *_detail_expert file, the
    stock low-noise weights being that pair's *_semantic file)."""
    from dcm_core import tiny
    from dcm_core.formats import convert_official

    tmp = tmp_path_factory.mktemp("a14b_dcm")
    out = {}
    for side, seed in (("high_noise", 31), ("low_noise", 32)):
        model = tiny.make_official_model("wan", tiny.wan_config(num_layers=1), rank=4, alpha=8.0, seed=seed)
        official = tmp / f"a14b_{side}_official.safetensors"
        tiny.save_official_checkpoint(model, official, metadata={
            "lora_alpha": "8", "dcm.base": "wan2.2-t2v-a14b", "dcm.expert_base": side})
        res = convert_official(official, tmp / side, dtype="fp32", name=f"tiny_dcm_a14b_{side}", progress=False)
        os.replace(res.semantic_path, dcm.h.model_dir("diffusion_models") / res.semantic_path.name)
        os.replace(res.detail_path, dcm.h.model_dir("loras") / res.detail_path.name)
        out[side] = (res.semantic_path.name, res.detail_path.name, model)
    return out


def test_dcm_experts_on_a_two_model_base_equal_reference(dcm, dcm_a14b):
    """UNETLoader (DCM high-noise semantic expert) as semantic_model; UNETLoader (stock low-noise model) → DCM
    Expert LoRA Loader (the low-noise detail expert) as detail_model; boundary preset wan2.2-t2v-a14b (875),
    per-expert-uniform 3 + 3. Reference: sample_dcm with the high-noise model's semantic forward above 875 and the
    low-noise model's detail-expert forward at or below it."""
    import torch

    from dcm_core.modeling import velocity
    from dcm_core.sampler import sample_dcm
    from dcm_core.schedule import DETAIL, SEMANTIC, build_sigmas, route

    hi_sem, _, hi_model = dcm_a14b["high_noise"]
    lo_stock, lo_detail, lo_model = dcm_a14b["low_noise"]
    p = dcm.sampler_prompt("wan", seed=23, preset="per-expert-uniform", boundary=978.0)
    del p["1"]
    p["60"] = {"class_type": "UNETLoader", "inputs": {"unet_name": hi_sem, "weight_dtype": "default"}}
    p["61"] = {"class_type": "UNETLoader", "inputs": {"unet_name": lo_stock, "weight_dtype": "default"}}
    p["62"] = {"class_type": "DCMExpertLoraLoader", "inputs": {"model": ["61", 0], "lora_name": lo_detail, "strength": 1.0}}
    p["5"]["inputs"].update({"semantic_model": ["60", 0], "detail_model": ["62", 0], "boundary_preset": "wan2.2-t2v-a14b (875)"})
    out = dcm.run(p)
    values = build_sigmas("per-expert-uniform", boundary_timestep=875.0)
    ctx, _ = dcm.cond("wan")
    models = {SEMANTIC: hi_model, DETAIL: lo_model}

    def model_fn(x, sigma, expert):
        return velocity(models[expert], x, sigma, ctx, expert)

    with torch.no_grad():
        ref = sample_dcm(model_fn, dcm.noise(23), values, 875.0)
    diff = (to_model_space(out, "wan") - ref).abs().max().item()
    print(f"[dcm a14b experts] boundary preset 875, per-expert-uniform 3+3: vs reference {diff:.3e}")
    assert diff <= TOL
    assert route(values, 875.0) == [SEMANTIC] * 3 + [DETAIL] * 3
