"""A trained Wan2.2 A14B-shaped pair loads into ComfyUI with the stock loaders and samples like the reference
(issue #14, trainer side; the pack's sampler work for two-model bases is tested elsewhere).

A tiny two-transformer diffusers folder (``transformer/`` high noise, ``transformer_2/`` low noise, boundary_ratio
0.875) is trained: stage 1 distils the high-noise transformer (export ``NAME_semantic``), stage 2 puts the detail
expert on the stock low-noise transformer (export ``NAME_detail_expert`` only). In the real ComfyUI of the
``comfy`` fixture: STOCK ``UNETLoader`` (semantic file) and ``UNETLoader`` (the stock low-noise transformer in
ComfyUI keys, as the released ``*_low_noise_*`` files are) + ``LoraLoaderModelOnly`` (detail file),
``DCMDualExpertGuider`` at the model's boundary 875, ``SamplerCustomAdvanced``; the latent equals
``dcm_core.sampler.sample_dcm`` over the two trained diffusers students (semantic steps: the high-noise student;
detail steps: the low-noise student's detail expert) within 1e-4 in fp32, and using the detail expert matters.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from dcm_core.latents import to_model_space
from dcm_core.schedule import build_sigmas

ROOT = Path(__file__).resolve().parents[2]
NAME = "dcm_tiny_a14b"
PRESET = "wan2.1-t2v-6step"
BOUNDARY = 875.0
SEED = 23
TOL = 1e-4
COND_SEED, NEG_SEED, COND_TOKENS = 5, 6, 8


def _train_helpers():
    spec = importlib.util.spec_from_file_location("dcm_comfy_train_helpers_fam", ROOT / "tests" / "unit" / "train" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(stage: str, model: Path, data: Path, out: Path, *extra: str):
    from tests.comfy.trainer_runs import train_in_process

    overrides = [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}", "max_train_steps=2",
                 "checkpoint.every_steps=0", f"export.name={NAME}", "export.dtype=fp32", "disc.inner_channels=64",
                 "logging.progress_bar=false", *extra]  # fmt: skip
    return train_in_process(stage, overrides)


def _cond(seed: int) -> dict:
    return {"class_type": "DCMTestConditioning", "inputs": {
        "seed": seed, "tokens": COND_TOKENS, "batch": 1, "dim": 4096, "hunyuan": False, "guidance": 6.0}}


def test_trained_a14b_pair_loads_with_stock_loaders_and_samples(comfy, tmp_path):
    assert getattr(comfy, "pack_loaded", False), "the DCM pack did not load into ComfyUI"
    from safetensors.torch import load_file, save_file

    import nodes
    from dcm_core.formats import diffusers_to_comfy, read_header
    from dcm_core.tiny import save_tiny_model_folder

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = save_tiny_model_folder(tmp_path / "model", "a14b-t2v")
        data = _train_helpers().make_dataset(tmp_path / "data", "wan", n=2)
        sem_tr, sem = _train("semantic", model, data, tmp_path / "sem", "optim.lr=1e-3")
        det_tr, det = _train("detail", model, data, tmp_path / "det", "model.lora_rank=4", "model.lora_alpha=4", "optim.lr=1e-2")
    finally:
        torch.set_num_threads(n)
    assert Path(sem.exported["semantic"]).name == f"{NAME}_semantic.safetensors"
    assert Path(det.exported["detail_expert"]).name == f"{NAME}_detail_expert.safetensors" and "semantic" not in det.exported
    assert read_header(sem.exported["semantic"]).metadata["dcm.expert_base"] == "high_noise"
    assert read_header(det.exported["detail_expert"]).metadata["dcm.expert_base"] == "low_noise"
    shutil.copy(sem.exported["semantic"], comfy.model_dir("diffusion_models"))
    shutil.copy(det.exported["detail_expert"], comfy.model_dir("loras"))
    low = diffusers_to_comfy("wan", load_file(str(model / "transformer_2" / "diffusion_pytorch_model.safetensors")))
    save_file(low, str(comfy.model_dir("diffusion_models") / "tiny_a14b_low_noise.safetensors"))

    prompt = {
        "2": _cond(COND_SEED),
        "3": _cond(NEG_SEED),
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 17, "batch_size": 1}},
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{NAME}_semantic.safetensors", "weight_dtype": "default"}},
        "7": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_a14b_low_noise.safetensors", "weight_dtype": "default"}},
        "20": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["7", 0], "lora_name": f"{NAME}_detail_expert.safetensors", "strength_model": 1.0}},
        "10": {"class_type": "DCMDualExpertGuider", "inputs": {
            "semantic_model": ["1", 0], "detail_model": ["20", 0], "positive": ["2", 0], "negative": ["3", 0],
            "boundary_timestep": BOUNDARY, "cfg_semantic": 1.0, "cfg_detail": 1.0}},
        "11": {"class_type": "DCMSchedule", "inputs": {
            "preset": PRESET, "semantic_steps": 3, "detail_steps": 3, "steps": 6, "boundary_timestep": BOUNDARY,
            "custom_sigmas": ""}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["13", 0], "guider": ["10", 0], "sampler": ["12", 0], "sigmas": ["11", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "DCMTestCapture", "inputs": {"samples": ["14", 0], "key": "a14b_stock"}},
    }
    store = nodes.NODE_CLASS_MAPPINGS["DCMTestCapture"].STORE
    store.pop("a14b_stock", None)
    res = comfy.run(prompt)
    assert res.success, res.error_text()
    out = store["a14b_stock"]["samples"]

    from comfy.sample import prepare_noise

    from dcm_core.modeling import velocity
    from dcm_core.sampler import sample_dcm

    high, low = sem_tr.student_unwrapped.eval(), det_tr.student_unwrapped.eval()
    ctx = torch.randn(1, COND_TOKENS, 4096, generator=torch.Generator().manual_seed(COND_SEED))
    noise = prepare_noise(torch.zeros(1, 16, 5, 8, 8), SEED)
    sigmas = build_sigmas(PRESET, boundary_timestep=BOUNDARY)

    def reference(detail_expert: str) -> torch.Tensor:
        def fn(x, s, e):
            return velocity(high, x, s, ctx, "semantic") if e == "semantic" else velocity(low, x, s, ctx, detail_expert)

        with torch.no_grad():
            return sample_dcm(fn, noise, sigmas, BOUNDARY)

    ref = reference("detail")
    assert out.shape == (1, 16, 5, 8, 8) and torch.isfinite(out).all()
    diff = (to_model_space(out, "wan") - ref).abs().max().item()
    print(f"[a14b export] stock loaders + guider: max|comfy - sample_dcm| = {diff:.3e} (model space, fp32)")
    assert diff <= TOL
    stock_low = reference("semantic")  # the low-noise student's semantic mode = the stock low-noise transformer
    print(f"[a14b export] max|stock low-noise - detail expert| = {(stock_low - ref).abs().max().item():.3e}")
    assert (stock_low - ref).abs().max().item() > 100 * TOL
