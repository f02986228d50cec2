"""DCM Dual-Expert Sampler on the families artists use, through ComfyUI's own conditioning nodes:

* Wan2.2 I2V A14B-shaped pair (two different 36-channel models, no weight shared; high-noise as semantic_model,
  low-noise as detail_model), conditioning from stock ``WanImageToVideo``, with and without a stock LoRA on each;
* a trained DCM Wan2.1 I2V expert pair (36 channels + CLIP image embedder, ``clip_vision_output``) through the
  DCM Checkpoint Loader;
* Wan2.2 TI2V-5B-shaped DCM experts (48 channels, ComfyUI's WAN22 model and Wan22 latent format) on stock
  ``Wan22ImageToVideoLatent``'s latent with its clean first frame (``noise_mask``).

Each is compared with the same models run through the stock chain (two SamplerCustomAdvanced, BasicGuider per
model, stock SplitSigmas) and must match within 1e-4 (fp32). The VAE / start image / CLIP vision output are the
test-only nodes DCMTestVAE / DCMTestImage / DCMTestClipVisionOutput (no real VAE or CLIP in CI).
"""

from __future__ import annotations

import os

import pytest
import torch

TOL = 1e-4
SIGMAS_900 = "1.0, 0.95, 0.85, 0.6, 0.3"  # (+ terminal 0) boundary 900: t 1000, 950 → high-noise; 850, 600, 300 → low
N_HIGH = 2


def _convert(dcm, tmp, name, cfg, seed, *, detail_to_loras=False, official_name=None):
    from dcm_core import tiny
    from dcm_core.formats import convert_official

    model = tiny.make_official_model("wan", cfg, rank=4, alpha=8.0, seed=seed)
    official = tmp / f"{name}_official.safetensors"
    tiny.save_official_checkpoint(model, official, metadata={"lora_alpha": "8"})
    res = convert_official(official, tmp / name, dtype="fp32", name=name, progress=False)
    os.replace(res.semantic_path, dcm.h.model_dir("diffusion_models") / res.semantic_path.name)
    if detail_to_loras:
        os.replace(res.detail_path, dcm.h.model_dir("loras") / res.detail_path.name)
    if official_name:
        import shutil

        shutil.copy(official, dcm.h.model_dir("diffusion_models") / official_name)
    return res.semantic_path.name, res.detail_path.name


def _lora(dcm, name: str, seed: int) -> str:
    """A stock ComfyUI-native LoRA on the first FFN layer of the tiny Wan (dim 128, ffn 256)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {
        "diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.randn(4, 128, generator=g) * 0.5,
        "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.randn(256, 4, generator=g) * 0.5,
        "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(4.0),
    }
    save_file(sd, str(dcm.h.model_dir("loras") / name))
    return name


@pytest.fixture(scope="module")
def files(dcm, tmp_path_factory):
    from dcm_core import tiny

    tmp = tmp_path_factory.mktemp("families")
    i2v = dict(num_layers=1, in_channels=36)
    return {
        "high": _convert(dcm, tmp, "tiny_wan22_i2v_high_noise", tiny.wan_config(**i2v), 21)[0],
        "low": _convert(dcm, tmp, "tiny_wan22_i2v_low_noise", tiny.wan_config(**i2v), 22)[0],
        "lora_high": _lora(dcm, "tiny_fewstep_high.safetensors", 41),
        "lora_low": _lora(dcm, "tiny_fewstep_low.safetensors", 42),
        "dcm_i2v": _convert(dcm, tmp, "tiny_dcm_wan21_i2v", tiny.wan_config(num_layers=1, in_channels=36, image_dim=1280),
                            23, detail_to_loras=True, official_name="tiny_dcm_wan21_i2v.safetensors"),
        "dcm_ti2v": _convert(dcm, tmp, "tiny_dcm_wan22_ti2v", tiny.wan_config(num_layers=1, in_channels=48, out_channels=48),
                             24, detail_to_loras=True, official_name="tiny_dcm_wan22_ti2v.safetensors"),
    }


def _base(*, image: bool, clip: bool = False) -> dict:
    """Conditioning + WanImageToVideo (node "33": positive, negative, latent)."""
    p = {
        "2": {"class_type": "DCMTestConditioning", "inputs": {"seed": 5, "tokens": 8, "batch": 1, "dim": 4096, "hunyuan": False, "guidance": 6.0}},
        "3": {"class_type": "DCMTestConditioning", "inputs": {"seed": 6, "tokens": 8, "batch": 1, "dim": 4096, "hunyuan": False, "guidance": 6.0}},
        "30": {"class_type": "DCMTestVAE", "inputs": {"channels": 16, "downscale": 8, "seed": 0}},
        "31": {"class_type": "DCMTestImage", "inputs": {"seed": 1, "width": 32, "height": 32, "frames": 1}},
        "33": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["30", 0], "width": 32, "height": 32, "length": 5,
            "batch_size": 1}},
        "9": {"class_type": "DCMSchedule", "inputs": {
            "preset": "custom", "semantic_steps": 2, "detail_steps": 2, "steps": 4, "boundary_timestep": 900.0,
            "custom_sigmas": SIGMAS_900}},
        "6": {"class_type": "DCMTestCapture", "inputs": {"samples": ["5", 0], "key": "fam"}},
    }
    if image:
        p["33"]["inputs"]["start_image"] = ["31", 0]
    if clip:
        p["32"] = {"class_type": "DCMTestClipVisionOutput", "inputs": {"seed": 2}}
        p["33"]["inputs"]["clip_vision_output"] = ["32", 0]
    return p


def _dcm_sampler(p: dict, semantic, detail, latent, seed: int, boundary_preset: str) -> dict:
    p["5"] = {"class_type": "DCMDualExpertSampler", "inputs": {
        "semantic_model": semantic, "detail_model": detail, "positive": ["33", 0], "negative": ["33", 1],
        "latent_image": latent, "seed": seed, "preset": "custom", "boundary_timestep": 978.0,
        "cfg_semantic": 1.0, "cfg_detail": 1.0, "sigmas": ["9", 0], "boundary_preset": boundary_preset}}
    return p


def _stock_chain(p: dict, semantic, detail, latent, seed: int) -> dict:
    """Two SamplerCustomAdvanced (RandomNoise, then DisableNoise), one BasicGuider per model, stock SplitSigmas."""
    p.update({
        "13": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "14": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "15": {"class_type": "DisableNoise", "inputs": {}},
        "12": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["9", 0], "step": N_HIGH}},
        "16": {"class_type": "BasicGuider", "inputs": {"model": semantic, "conditioning": ["33", 0]}},
        "17": {"class_type": "BasicGuider", "inputs": {"model": detail, "conditioning": ["33", 0]}},
        "18": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["14", 0], "guider": ["16", 0], "sampler": ["13", 0], "sigmas": ["12", 0], "latent_image": latent}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["15", 0], "guider": ["17", 0], "sampler": ["13", 0], "sigmas": ["12", 1], "latent_image": ["18", 0]}},
    })
    return p


def _a14b_models(p: dict, files: dict, lora: bool, record: bool = False):
    p["60"] = {"class_type": "UNETLoader", "inputs": {"unet_name": files["high"], "weight_dtype": "default"}}
    p["61"] = {"class_type": "UNETLoader", "inputs": {"unet_name": files["low"], "weight_dtype": "default"}}
    high, low = ["60", 0], ["61", 0]
    if lora:
        p["62"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": high, "lora_name": files["lora_high"], "strength_model": 1.0}}
        p["63"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": low, "lora_name": files["lora_low"], "strength_model": 1.0}}
        high, low = ["62", 0], ["63", 0]
    if record:
        p["64"] = {"class_type": "DCMTestRecordCalls", "inputs": {"model": high, "tag": "high"}}
        p["65"] = {"class_type": "DCMTestRecordCalls", "inputs": {"model": low, "tag": "low"}}
        high, low = ["64", 0], ["65", 0]
    return high, low


@pytest.mark.parametrize("lora", [False, True], ids=["stock", "fewstep-lora-on-each"])
def test_wan22_i2v_a14b_pair_equals_stock_chain(dcm, files, lora):
    """UNETLoader ×2 (+ LoraLoaderModelOnly on each) → WanImageToVideo → DCM Dual-Expert Sampler with the
    wan2.2-i2v-a14b (900) boundary preset, against the stock two-sampler chain on the same models."""
    import nodes

    rec = nodes.NODE_CLASS_MAPPINGS["DCMTestRecordCalls"].CALLS
    p = _base(image=True)
    high, low = _a14b_models(p, files, lora, record=True)
    rec.clear()
    ours = dcm.run(_dcm_sampler(p, high, low, ["33", 2], 7, "wan2.2-i2v-a14b (900)"), key="fam")
    routing = [(tag, round(t)) for tag, t in rec]
    p = _base(image=True)
    high, low = _a14b_models(p, files, lora)
    stock = dcm.run(_stock_chain(p, high, low, ["33", 2], 7), key="fam")
    p = _base(image=False)
    high, low = _a14b_models(p, files, lora)
    no_image = dcm.run(_dcm_sampler(p, high, low, ["33", 2], 7, "wan2.2-i2v-a14b (900)"), key="fam")
    diff = (ours - stock).abs().max().item()
    effect = (ours - no_image).abs().max().item()
    print(f"[wan2.2 i2v a14b{' + lora' if lora else ''}] vs stock chain {diff:.3e}; start image effect {effect:.3e}")
    assert routing == [("high", 1000), ("high", 950), ("low", 850), ("low", 600), ("low", 300)], routing
    assert diff <= TOL
    assert effect > 100 * TOL


def test_lora_on_each_expert_changes_the_result_and_stays_on_its_model(dcm, files):
    """The few-step LoRAs act (the result moves) and each stays on its own model: after the run each model's
    patches are only its own LoRA's, and the base weights equal the files'."""
    import comfy.model_management

    import nodes
    from dcm_core.formats import load_state_dict

    p = _base(image=True)
    high, low = _a14b_models(p, files, False)
    plain = dcm.run(_dcm_sampler(p, high, low, ["33", 2], 7, "wan2.2-i2v-a14b (900)"), key="fam")
    p = _base(image=True)
    high, low = _a14b_models(p, files, True)
    with_lora = dcm.run(_dcm_sampler(p, high, low, ["33", 2], 7, "wan2.2-i2v-a14b (900)"), key="fam")
    assert (with_lora - plain).abs().max().item() > 100 * TOL
    unet = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]()
    lora = nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
    h = lora.load_lora_model_only(unet.load_unet(files["high"], "default")[0], files["lora_high"], 1.0)[0]
    lo = lora.load_lora_model_only(unet.load_unet(files["low"], "default")[0], files["lora_low"], 1.0)[0]
    ctx, _ = dcm.cond("wan")
    dcm.sampling().sample_dual_expert(
        h, lo, [[ctx, {}]], [[ctx, {}]], {"samples": dcm.empty_latent()}, 3, "per-expert-uniform", 978.0, 1.0, 1.0,
        boundary_preset="wan2.2-t2v-a14b (875)")
    assert set(h.patches) == set(lo.patches) == {"diffusion_model.blocks.0.ffn.0.weight"}
    assert not any(torch.equal(a[1].weights[0], b[1].weights[0]) for a in h.patches["diffusion_model.blocks.0.ffn.0.weight"]
                   for b in lo.patches["diffusion_model.blocks.0.ffn.0.weight"])
    for patcher, name in ((h, files["high"]), (lo, files["low"])):
        patcher.unpatch_model()
        live = patcher.model.diffusion_model.state_dict()
        ref = load_state_dict(dcm.h.model_dir("diffusion_models") / name)
        bad = [k for k, v in ref.items() if not torch.equal(live[k].float(), v.float())]
        assert not bad, f"{name} changed: {bad[:3]}"
    comfy.model_management.unload_all_models()


def test_a14b_i2v_loads_one_model_per_segment(dcm, files):
    """Each segment asks ComfyUI's model management for its own model only (so it can offload the other)."""
    import comfy.model_management
    from comfy_extras.nodes_wan import WanImageToVideo

    import nodes

    unet = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]()
    high, low = unet.load_unet(files["high"], "default")[0], unet.load_unet(files["low"], "default")[0]
    ctx, _ = dcm.cond("wan")
    from tests.comfy.testing_nodes import _TestVAE

    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    pos, neg, latent = WanImageToVideo.execute([[ctx, {}]], [[ctx, {}]], _TestVAE(16, 8, 0), 32, 32, 5, 1, start_image=img)
    loads = []
    real = comfy.model_management.load_models_gpu

    def recording(models, *a, **k):
        loads.append([m.model for m in models])
        return real(models, *a, **k)

    comfy.model_management.load_models_gpu = recording
    try:
        dcm.sampling().sample_dual_expert(high, low, pos, neg, latent, 3, "per-expert-uniform", 978.0, 1.0, 1.0,
                                          boundary_preset="wan2.2-i2v-a14b (900)")
    finally:
        comfy.model_management.load_models_gpu = real
    expert_loads = [[m for m in batch if m in (high.model, low.model)] for batch in loads]
    assert [b for b in expert_loads if b] == [[high.model], [low.model]], loads


def test_trained_dcm_wan21_i2v_with_clip_equals_stock_loaders(dcm, files):
    """A trained DCM I2V checkpoint (36 channels + image embedder) through DCM Checkpoint Loader and the sampler,
    with WanImageToVideo's clip_vision_output, against stock UNETLoader + LoraLoaderModelOnly (the converted
    pair) in the stock chain."""
    sem, det = files["dcm_i2v"]
    p = _base(image=True, clip=True)
    p["1"] = {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": "tiny_dcm_wan21_i2v.safetensors", "weight_dtype": "default"}}
    ours = dcm.run(_dcm_sampler(p, ["1", 0], ["1", 1], ["33", 2], 9, "manual"), key="fam")
    p = _base(image=True, clip=True)
    p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": sem, "weight_dtype": "default"}}
    p["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": det, "strength_model": 1.0}}
    # manual boundary 978 with these sigmas: every step has t ≤ 978 except the first → split after step 1
    p = _stock_chain(p, ["1", 0], ["20", 0], ["33", 2], 9)
    p["12"]["inputs"]["step"] = 1
    stock = dcm.run(p, key="fam")
    p = _base(image=True, clip=False)
    p["1"] = {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": "tiny_dcm_wan21_i2v.safetensors", "weight_dtype": "default"}}
    no_clip = dcm.run(_dcm_sampler(p, ["1", 0], ["1", 1], ["33", 2], 9, "manual"), key="fam")
    diff, effect = (ours - stock).abs().max().item(), (ours - no_clip).abs().max().item()
    print(f"[trained dcm wan2.1 i2v + clip] vs stock loaders/chain {diff:.3e}; clip effect {effect:.3e}")
    assert diff <= TOL
    assert effect > 100 * TOL


def _ti2v_base() -> dict:
    p = _base(image=True)
    p["30"]["inputs"].update({"channels": 48, "downscale": 16})
    p["31"]["inputs"].update({"width": 64, "height": 64})
    p["34"] = {"class_type": "Wan22ImageToVideoLatent", "inputs": {
        "vae": ["30", 0], "width": 64, "height": 64, "length": 5, "batch_size": 1, "start_image": ["31", 0]}}
    p["35"] = {"class_type": "DCMTestCapture", "inputs": {"samples": ["34", 0], "key": "ti2v_latent"}}
    return p


def test_wan22_ti2v_5b_one_model_equals_one_stock_sampler(dcm, files):
    """Wan2.2 TI2V-5B shape: ComfyUI builds its WAN22 model (Wan22 latent format, 48 channels, per-token
    timesteps from the noise mask). With the same model as both experts, DCM Dual-Expert Sampler on stock
    Wan22ImageToVideoLatent's latent equals ONE stock SamplerCustomAdvanced over all steps, and frame 0 (the start
    image, kept by noise_mask) comes out clean. The stock two-sampler chain does not: at the hand-over it keeps
    frame 0 as x_k/(1−σ_k), the start frame plus noise (measured below)."""
    import comfy.latent_formats
    import comfy.model_base

    import nodes

    sem, _ = files["dcm_ti2v"]
    model = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(sem, "default")[0]
    assert isinstance(model.model, comfy.model_base.WAN22)
    assert isinstance(model.get_model_object("latent_format"), comfy.latent_formats.Wan22)
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": sem, "weight_dtype": "default"}}
    p = _ti2v_base()
    p["1"] = unet
    ours = dcm.run(_dcm_sampler(p, ["1", 0], ["1", 0], ["34", 0], 11, "manual"), key="fam")
    latent = nodes.NODE_CLASS_MAPPINGS["DCMTestCapture"].STORE["ti2v_latent"]
    p = _ti2v_base()
    p["1"] = unet
    p = _stock_chain(p, ["1", 0], ["1", 0], ["34", 0], 11)
    single = {k: v for k, v in p.items() if k not in ("12", "15", "17", "18")}
    single["5"]["inputs"].update({"noise": ["14", 0], "guider": ["16", 0], "sigmas": ["9", 0], "latent_image": ["34", 0]})
    one = dcm.run(single, key="fam")
    p = _ti2v_base()
    p["1"] = unet
    p = _stock_chain(p, ["1", 0], ["1", 0], ["34", 0], 11)
    p["12"]["inputs"]["step"] = 1
    chain = dcm.run(p, key="fam")
    diff = (ours - one).abs().max().item()
    frame0 = (ours[:, :, 0] - latent["samples"][:, :, 0]).abs().max().item()
    chain_frame0 = (chain[:, :, 0] - latent["samples"][:, :, 0]).abs().max().item()
    print(f"[wan2.2 ti2v-5b one model] vs one stock sampler {diff:.3e}; frame 0 vs start latent {frame0:.3e} "
          f"(stock two-sampler chain: {chain_frame0:.3e})")
    assert ours.shape == (1, 48, 2, 4, 4) and latent["noise_mask"].shape == (1, 1, 2, 4, 4)
    assert diff <= TOL
    assert frame0 <= TOL and chain_frame0 > 100 * TOL
    assert (ours[:, :, 1] - latent["samples"][:, :, 1]).abs().max().item() > 100 * TOL


def test_wan22_ti2v_5b_dcm_experts_keep_the_start_frame(dcm, files):
    """Trained-DCM TI2V-5B experts (DCM Checkpoint Loader: semantic + detail) on Wan22ImageToVideoLatent: frame 0
    stays the start image, the generated frames use both experts (they differ from the semantic expert alone)."""
    import nodes

    p = _ti2v_base()
    p["1"] = {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": "tiny_dcm_wan22_ti2v.safetensors", "weight_dtype": "default"}}
    ours = dcm.run(_dcm_sampler(p, ["1", 0], ["1", 1], ["34", 0], 11, "manual"), key="fam")
    latent = nodes.NODE_CLASS_MAPPINGS["DCMTestCapture"].STORE["ti2v_latent"]
    p = _ti2v_base()
    p["1"] = {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": "tiny_dcm_wan22_ti2v.safetensors", "weight_dtype": "default"}}
    semantic_only = dcm.run(_dcm_sampler(p, ["1", 0], ["1", 0], ["34", 0], 11, "manual"), key="fam")
    frame0 = (ours[:, :, 0] - latent["samples"][:, :, 0]).abs().max().item()
    print(f"[trained dcm wan2.2 ti2v-5b] frame 0 vs start latent {frame0:.3e}")
    assert frame0 <= TOL
    assert (ours - semantic_only).abs().max().item() > 100 * TOL


def test_boundary_preset_is_validated(dcm):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["DCMDualExpertSampler"]
    assert "boundary_preset" in cls.INPUT_TYPES()["optional"]
    msg = dcm.sampling().boundary_preset_problem("wan2.3 (950)")
    assert msg and "manual" in msg and "wan2.2-i2v-a14b (900)" in msg
    assert dcm.sampling().boundary_preset_problem("wan2.2-t2v-a14b (875)") is None


@pytest.mark.parametrize("expert,want", [
    ("dcm_i2v", r"is a i2v DCM expert .*is a t2v model \(16 input channels"),
    ("dcm_ti2v", r"is a ti2v DCM expert .*Wan22ImageToVideoLatent"),
])
def test_expert_loader_refuses_an_expert_of_another_task(dcm, files, expert, want):
    """DCM Expert LoRA Loader (the user path): an I2V / TI2V-5B detail expert on a text-to-video model stops
    the run with the named error and the fix, before any sampling."""
    import re

    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": dcm.families["wan"].semantic, "weight_dtype": "default"}},
        "2": {"class_type": "DCMExpertLoraLoader", "inputs": {"model": ["1", 0], "lora_name": files[expert][1], "strength": 1.0}},
        "3": {"class_type": "DCMTestModelInfo", "inputs": {"model": ["2", 0], "key": "refused"}},
    }
    res = dcm.h.run(p)
    assert not res.success
    text = res.error_text()
    assert "DCMIncompatibleModelError" in text or "DCM Expert LoRA Loader" in text, text
    assert re.search(want, text, re.S), text



def test_trained_dcm_wan21_i2v_equals_the_diffusers_reference(dcm, files):
    """The trained-DCM I2V pair in ComfyUI (DCM Checkpoint Loader → WanImageToVideo with a start image and CLIP
    vision output → DCM Dual-Expert Sampler) against the pack's reference sampler over the diffusers + peft model:
    hidden states = [noisy latent, 4-channel mask (1 on the start frame), start-frame latent] on the channel axis
    (normalised like the noise), CLIP features as ``encoder_hidden_states_image``; the detail expert's forward
    uses its own condition-embedder copy, image embedder included."""
    from comfy_extras.nodes_wan import WanImageToVideo

    from dcm_core import tiny
    from dcm_core.latents import to_model_space
    from dcm_core.modeling import velocity
    from dcm_core.sampler import sample_dcm
    from dcm_core.schedule import parse_custom_sigmas
    from tests.comfy.testing_nodes import _ClipVisionOut, _TestVAE

    p = _base(image=True, clip=True)
    # diffusers' Wan I2V attention takes the last 512 context tokens as text (umT5's padded length), ComfyUI the
    # tokens after the 257 image tokens: the two agree for a 512-token prompt, which the text encoder produces
    p["2"]["inputs"]["tokens"] = 512
    p["1"] = {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": "tiny_dcm_wan21_i2v.safetensors", "weight_dtype": "default"}}
    ours = dcm.run(_dcm_sampler(p, ["1", 0], ["1", 1], ["33", 2], 9, "manual"), key="fam")

    ctx = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(5))  # DCMTestConditioning(seed 5, 512)
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))  # DCMTestImage(seed 1)
    clip = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(2))  # DCMTestClipVisionOutput(seed 2)
    pos, _, _ = WanImageToVideo.execute([[ctx, {}]], [[ctx, {}]], _TestVAE(16, 8, 0), 32, 32, 5, 1,
                                        start_image=img, clip_vision_output=_ClipVisionOut(clip))
    extra = pos[0][1]
    image = to_model_space(extra["concat_latent_image"], "wan")
    mask = (1.0 - extra["concat_mask"].mean(dim=1, keepdim=True)).repeat(1, 4, 1, 1, 1)
    model = tiny.make_official_model("wan", tiny.wan_config(num_layers=1, in_channels=36, image_dim=1280), rank=4, alpha=8.0, seed=23)

    def model_fn(x, sigma, expert):
        return velocity(model, torch.cat([x, mask, image], dim=1), sigma, ctx, expert, encoder_hidden_states_image=clip)

    with torch.no_grad():
        ref = sample_dcm(model_fn, dcm.noise(9), parse_custom_sigmas(SIGMAS_900), 978.0)
    diff = (to_model_space(ours, "wan") - ref).abs().max().item()
    print(f"[trained dcm wan2.1 i2v + clip] vs diffusers reference {diff:.3e}")
    assert diff <= TOL


def test_wan22_i2v_a14b_pair_equals_the_diffusers_reference(dcm, files):
    """The A14B I2V-shaped pair (UNETLoader ×2 → WanImageToVideo → DCM Dual-Expert Sampler, boundary preset 900)
    against the pack's reference over the two diffusers models: high-noise model above 900, low-noise at or below,
    both given [noisy latent, mask, start-frame latent]."""
    from comfy_extras.nodes_wan import WanImageToVideo

    from dcm_core import tiny
    from dcm_core.latents import to_model_space
    from dcm_core.modeling import velocity
    from dcm_core.sampler import sample_dcm
    from dcm_core.schedule import DETAIL, SEMANTIC, parse_custom_sigmas
    from tests.comfy.testing_nodes import _TestVAE

    p = _base(image=True)
    high, low = _a14b_models(p, files, False)
    ours = dcm.run(_dcm_sampler(p, high, low, ["33", 2], 7, "wan2.2-i2v-a14b (900)"), key="fam")
    ctx, _ = dcm.cond("wan")
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    pos, _, _ = WanImageToVideo.execute([[ctx, {}]], [[ctx, {}]], _TestVAE(16, 8, 0), 32, 32, 5, 1, start_image=img)
    extra = pos[0][1]
    cond = torch.cat([(1.0 - extra["concat_mask"].mean(dim=1, keepdim=True)).repeat(1, 4, 1, 1, 1),
                      to_model_space(extra["concat_latent_image"], "wan")], dim=1)
    cfg = tiny.wan_config(num_layers=1, in_channels=36)
    models = {SEMANTIC: tiny.make_official_model("wan", cfg, rank=4, alpha=8.0, seed=21),
              DETAIL: tiny.make_official_model("wan", cfg, rank=4, alpha=8.0, seed=22)}

    def model_fn(x, sigma, expert):  # each stock model's own weights (SEMANTIC = no DCM adapter)
        return velocity(models[expert], torch.cat([x, cond], dim=1), sigma, ctx, SEMANTIC)

    with torch.no_grad():
        ref = sample_dcm(model_fn, dcm.noise(7), parse_custom_sigmas(SIGMAS_900), 900.0)
    diff = (to_model_space(ours, "wan") - ref).abs().max().item()
    print(f"[wan2.2 i2v a14b] vs diffusers reference {diff:.3e}")
    assert diff <= TOL


def test_trained_dcm_wan22_ti2v_equals_the_diffusers_reference(dcm, files):
    """The TI2V-5B-shaped DCM pair in ComfyUI (DCM Checkpoint Loader → DCM Dual-Expert Sampler on stock
    Wan22ImageToVideoLatent's latent) against the pack's reference over the diffusers + peft model, with Wan2.2
    TI2V's rule written out: the start frame's tokens get timestep 0 (diffusers' per-token ``timestep``), the
    model sees the clean start frame there, and its prediction there is the start frame (x0 = clean)."""
    import comfy.latent_formats
    import comfy.sample

    import nodes
    from dcm_core import tiny
    from dcm_core.modeling import expert_mode
    from dcm_core.sampler import sample_dcm
    from dcm_core.schedule import parse_custom_sigmas

    p = _ti2v_base()
    p["1"] = {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": "tiny_dcm_wan22_ti2v.safetensors", "weight_dtype": "default"}}
    ours = dcm.run(_dcm_sampler(p, ["1", 0], ["1", 1], ["34", 0], 11, "manual"), key="fam")
    latent = nodes.NODE_CLASS_MAPPINGS["DCMTestCapture"].STORE["ti2v_latent"]
    fmt = comfy.latent_formats.Wan22()
    clean = fmt.process_in(latent["samples"])  # model space; frame 0 is the start frame
    m = latent["noise_mask"]  # [1, 1, frames, h, w]: 0 on the start frame
    ctx, _ = dcm.cond("wan")
    model = tiny.make_official_model("wan", tiny.wan_config(num_layers=1, in_channels=48, out_channels=48), rank=4, alpha=8.0, seed=24)
    tokens_m = m[:, 0, :, ::2, ::2].flatten(1)  # one value per 1×2×2 patch token

    def model_fn(x, sigma, expert):
        x_in = x * m + clean * (1 - m)
        t = (1000.0 * float(sigma)) * tokens_m
        with expert_mode(model, expert):
            v = model(hidden_states=x_in, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        x0 = (x_in - float(sigma) * v) * m + clean * (1 - m)
        return (x - x0) / float(sigma)

    noise = comfy.sample.prepare_noise(torch.zeros_like(latent["samples"]), 11)
    with torch.no_grad():
        ref = sample_dcm(model_fn, noise, parse_custom_sigmas(SIGMAS_900), 978.0)
    diff = (fmt.process_in(ours) - ref).abs().max().item()
    print(f"[trained dcm wan2.2 ti2v-5b] vs diffusers reference {diff:.3e}")
    assert diff <= TOL
