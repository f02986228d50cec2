"""DCMDualExpertSampler / DCMDualExpertGuider against the reference sampler, through PromptExecutor.

Parity: on tiny official-layout checkpoints the node's LATENT equals ``dcm_core.sampler.sample_dcm``
over the diffusers+peft model (same noise from ``comfy.sample.prepare_noise``) within 1e-4 in fp32,
and the expert of every model call is the one ``dcm_core.schedule.route`` names.
"""

from __future__ import annotations

import pytest
import torch

from dcm_core.latents import to_model_space
from dcm_core.schedule import build_sigmas, route, timestep_of

TOL = 1e-4

CASES = [
    # family, preset, seed, batch, cond_batch
    ("wan", "wan2.1-t2v-6step", 42, 1, 1),
    ("wan", "per-expert-uniform", 7, 2, 2),
    ("hunyuan_video", "hunyuan-t2v-4step", 42, 1, 1),
    ("hunyuan_video", "per-expert-uniform", 3, 2, 1),
]


@pytest.mark.parametrize("family,preset,seed,batch,cond_batch", CASES)
def test_sampler_matches_reference_and_routes_each_step(dcm, family, preset, seed, batch, cond_batch):
    fam = dcm.families[family]
    sigmas = build_sigmas(preset, boundary_timestep=fam.boundary)
    dcm.calls().clear()
    out = dcm.run(dcm.sampler_prompt(family, seed=seed, preset=preset, batch=batch, cond_batch=cond_batch, record=True))
    ref = dcm.reference(family, seed, sigmas, fam.boundary, batch=batch, cond_batch=cond_batch)
    assert out.shape == ref.shape == (batch, 16, 2, 4, 4)
    diff = (to_model_space(out, family) - to_model_space(ref, family)).abs().max().item()
    print(f"[parity] {family} {preset} batch={batch}: max|node - sample_dcm| = {diff:.3e} (model space, fp32)")
    assert diff <= TOL

    calls = list(dcm.calls())
    expected = route(sigmas, fam.boundary)
    assert [tag for tag, _ in calls] == expected, calls
    assert [t for _, t in calls] == pytest.approx([timestep_of(s) for s in sigmas[:-1]], abs=1e-3)
    # the experts really differ, so routing errors could not hide
    only_semantic = dcm.reference(family, seed, sigmas, 1.0, batch=batch, cond_batch=cond_batch)
    assert (to_model_space(only_semantic, family) - to_model_space(ref, family)).abs().max().item() > 100 * TOL


def test_guider_path_equals_sampler_node(dcm, comfy):
    fam = dcm.families["wan"]
    node_out = dcm.run(dcm.sampler_prompt("wan", seed=11))
    p = dcm.sampler_prompt("wan", seed=11)
    del p["5"]
    p.update({
        "10": {"class_type": "DCMDualExpertGuider", "inputs": {
            "semantic_model": ["1", 0], "detail_model": ["1", 1], "positive": ["2", 0], "negative": ["3", 0],
            "boundary_timestep": fam.boundary, "cfg_semantic": 1.0, "cfg_detail": 1.0}},
        "11": {"class_type": "DCMSchedule", "inputs": {
            "preset": fam.preset, "semantic_steps": 3, "detail_steps": 3, "steps": 6,
            "boundary_timestep": fam.boundary, "custom_sigmas": ""}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["13", 0], "guider": ["10", 0], "sampler": ["12", 0], "sigmas": ["11", 0], "latent_image": ["4", 0]}},
    })
    p["6"]["inputs"]["samples"] = ["14", 0]
    guider_out = dcm.run(p)
    assert torch.equal(guider_out, node_out)


def test_schedule_sigmas_input_overrides_preset(dcm):
    """Optional sigmas (DCM Schedule, custom list) override the sampler's preset."""
    fam = dcm.families["wan"]
    custom = "1.0, 0.99, 0.95, 0.7"
    sched = {"preset": "custom", "semantic_steps": 3, "detail_steps": 3, "steps": 6,
             "boundary_timestep": fam.boundary, "custom_sigmas": custom}
    out = dcm.run(dcm.sampler_prompt("wan", seed=5, preset="hunyuan-t2v-4step", schedule=sched))
    ref = dcm.reference("wan", 5, [1.0, 0.99, 0.95, 0.7, 0.0], fam.boundary)
    assert (to_model_space(out, "wan") - to_model_space(ref, "wan")).abs().max().item() <= TOL


def test_cfg_above_one_runs_negative_and_changes_result(dcm):
    base = dcm.run(dcm.sampler_prompt("wan", seed=9))
    dcm.calls().clear()
    out = dcm.run(dcm.sampler_prompt("wan", seed=9, cfg=(1.0, 3.0), record=True))
    tags = [t for t, _ in dcm.calls()]
    # cfg 1 on the semantic expert: one call per step; cfg 3 on the detail expert: cond + uncond
    # (ComfyUI batches them into one call when shapes match, so count per-step calls ≥ 1)
    assert tags.count("semantic") == 3 and tags.count("detail") >= 3
    assert not torch.equal(out, base)
