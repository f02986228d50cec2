"""A finished training run loads into ComfyUI and samples (issue 4, comfy tier).

The tiny Wan semantic stage (2 steps) then the tiny detail stage on top of it (2 steps) run
in-process with ``dcm_core/train/configs/tiny_wan_*.toml`` on a tiny generated latent dataset.
Large learning rates (semantic 1e-3, detail 1e-2) make both experts move well away from their
initialisation (the LoRA's share of the detail expert's output is > 100× the tolerance), and the
detail LoRA uses alpha = rank (scale 1, not the official 2) so a loader that ignored the exported
``dcm.lora_alpha`` metadata would be caught. Then, in the real ComfyUI of the ``comfy`` fixture:

(a) the pack-native export — ``NAME_semantic.safetensors`` in models/diffusion_models,
    ``NAME_detail_expert.safetensors`` in models/loras — through the STOCK ``UNETLoader`` +
    ``LoraLoaderModelOnly``, guided by ``DCMDualExpertGuider`` and sampled by ``SamplerCustomAdvanced``;
(b) the official combined file (``export/transformer/diffusion_pytorch_model.safetensors``, copied
    into models/diffusion_models) through ``DCMCheckpointLoader`` + ``DCMDualExpertSampler``;
(c) both latents are finite and equal ``dcm_core.sampler.sample_dcm`` over the trained diffusers
    model (``dcm_core.modeling.velocity`` routed per step to the semantic / detail expert), same noise
    (``comfy.sample.prepare_noise``), within 1e-4 in fp32 (export dtype fp32). The detail expert
    really changes the result (so routing or LoRA errors could not hide).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from dcm_core.latents import to_model_space
from dcm_core.schedule import DEFAULT_BOUNDARY_TIMESTEP, build_sigmas

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "dcm_core" / "train" / "configs"
NAME = "dcm_trained_tiny_wan"
PRESET = "wan2.1-t2v-6step"
SEED = 21
TOL = 1e-4
COND_SEED, NEG_SEED, COND_TOKENS = 5, 6, 8  # DCMTestConditioning inputs (as in conftest.DCMWorld)


def _train_helpers():
    """tests/unit/train/conftest.py (tiny latent datasets; loaded by path, importlib mode)."""
    spec = importlib.util.spec_from_file_location("dcm_comfy_train_helpers", ROOT / "tests" / "unit" / "train" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(stage: str, data: Path, out: Path, *extra: str):
    from tests.comfy.trainer_runs import train_in_process

    overrides = [f"data.path={data}", f"output_dir={out}", "optim.lr=1e-3", "checkpoint.every_steps=0",
                 f"export.name={NAME}", "export.dtype=fp32", *extra]
    return train_in_process(stage, overrides, CONFIGS / f"tiny_wan_{stage}.toml")


def _cond(seed: int) -> dict:
    return {"class_type": "DCMTestConditioning", "inputs": {
        "seed": seed, "tokens": COND_TOKENS, "batch": 1, "dim": 4096, "hunyuan": False, "guidance": 6.0}}


def _run(comfy, prompt: dict, key: str) -> torch.Tensor:
    import nodes

    store = nodes.NODE_CLASS_MAPPINGS["DCMTestCapture"].STORE
    store.pop(key, None)
    res = comfy.run(prompt)
    assert res.success, res.error_text()
    return store[key]["samples"]


def test_trained_run_loads_and_samples_in_comfy(comfy, tmp_path):
    assert getattr(comfy, "pack_loaded", False), "the DCM pack did not load into ComfyUI"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        th = _train_helpers()
        data = th.make_dataset(tmp_path / "data", "wan", n=2)
        _train("semantic", data, tmp_path / "sem")
        tr, res = _train("detail", data, tmp_path / "det", f"model.semantic_expert={tmp_path / 'sem'}",
                         "model.lora_rank=4", "model.lora_alpha=4", "optim.lr=1e-2")
    finally:
        torch.set_num_threads(n)
    export = tmp_path / "det" / "export"
    assert Path(res.exported["semantic"]).name == f"{NAME}_semantic.safetensors"
    assert Path(res.exported["detail_expert"]).name == f"{NAME}_detail_expert.safetensors"
    shutil.copy(export / f"{NAME}_semantic.safetensors", comfy.model_dir("diffusion_models"))
    shutil.copy(export / f"{NAME}_detail_expert.safetensors", comfy.model_dir("loras"))
    official = f"{NAME}_official.safetensors"
    shutil.copy(export / "transformer" / "diffusion_pytorch_model.safetensors", comfy.model_dir("diffusion_models") / official)

    boundary = DEFAULT_BOUNDARY_TIMESTEP["wan"]
    common = {
        "2": _cond(COND_SEED),
        "3": _cond(NEG_SEED),
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1}},
    }
    # (a) stock loaders + DCMDualExpertGuider + SamplerCustomAdvanced
    stock = dict(common)
    stock.update({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{NAME}_semantic.safetensors", "weight_dtype": "default"}},
        "20": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": f"{NAME}_detail_expert.safetensors", "strength_model": 1.0}},
        "10": {"class_type": "DCMDualExpertGuider", "inputs": {
            "semantic_model": ["1", 0], "detail_model": ["20", 0], "positive": ["2", 0], "negative": ["3", 0],
            "boundary_timestep": boundary, "cfg_semantic": 1.0, "cfg_detail": 1.0}},
        "11": {"class_type": "DCMSchedule", "inputs": {
            "preset": PRESET, "semantic_steps": 3, "detail_steps": 3, "steps": 6, "boundary_timestep": boundary,
            "custom_sigmas": ""}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["13", 0], "guider": ["10", 0], "sampler": ["12", 0], "sigmas": ["11", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "DCMTestCapture", "inputs": {"samples": ["14", 0], "key": "trained_stock"}},
    })
    out_stock = _run(comfy, stock, "trained_stock")
    # (b) DCMCheckpointLoader on the official combined export + DCMDualExpertSampler
    pack = dict(common)
    pack.update({
        "1": {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": official, "weight_dtype": "default"}},
        "5": {"class_type": "DCMDualExpertSampler", "inputs": {
            "semantic_model": ["1", 0], "detail_model": ["1", 1], "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "seed": SEED, "preset": PRESET, "boundary_timestep": boundary,
            "cfg_semantic": 1.0, "cfg_detail": 1.0}},
        "6": {"class_type": "DCMTestCapture", "inputs": {"samples": ["5", 0], "key": "trained_official"}},
    })
    out_official = _run(comfy, pack, "trained_official")

    # (c) the reference: sample_dcm over the trained diffusers student (both experts)
    from comfy.sample import prepare_noise

    from dcm_core.modeling import velocity
    from dcm_core.sampler import sample_dcm

    model = tr.student_unwrapped.eval()
    ctx = torch.randn(1, COND_TOKENS, 4096, generator=torch.Generator().manual_seed(COND_SEED))
    noise = prepare_noise(torch.zeros(1, 16, 2, 4, 4), SEED)
    sigmas = build_sigmas(PRESET, boundary_timestep=boundary)

    def reference(route_boundary: float) -> torch.Tensor:
        with torch.no_grad():
            return sample_dcm(lambda x, s, e: velocity(model, x, s, ctx, e), noise, sigmas, route_boundary)

    ref = reference(boundary)
    for what, out in (("stock loaders + guider", out_stock), ("DCMCheckpointLoader (official export)", out_official)):
        assert out.shape == (1, 16, 2, 4, 4), what
        assert torch.isfinite(out).all(), what
        diff = (to_model_space(out, "wan") - ref).abs().max().item()
        print(f"[trained export] {what}: max|comfy - sample_dcm| = {diff:.3e} (model space, fp32)")
        assert diff <= TOL, (what, diff)
    # the trained detail expert matters: sampling with the semantic expert only is far off ...
    only_semantic = reference(1.0)  # floor(1000·σ) ≤ 1: no step of this list goes to the detail expert
    print(f"[trained export] max|semantic-only - routed| = {(only_semantic - ref).abs().max().item():.3e}")
    assert (only_semantic - ref).abs().max().item() > 100 * TOL
    # ... and so does its LoRA scale: alpha misread as the official 2·rank would be caught
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    with torch.no_grad():
        for p in lora_b:
            p.mul_(2.0)
        try:
            doubled = reference(boundary)
        finally:
            for p in lora_b:
                p.div_(2.0)
    print(f"[trained export] max|LoRA x2 - routed| = {(doubled - ref).abs().max().item():.3e}")
    assert (doubled - ref).abs().max().item() > 100 * TOL
