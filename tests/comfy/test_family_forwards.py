"""Trained image-to-video / TI2V exports load with stock ComfyUI and compute what the trainer trained (issue #14).

A tiny Wan2.1-I2V-shaped folder (36 → 16 channels, CLIP image embedder) and a tiny Wan2.2-TI2V-5B-shaped one (48
channels, 16× VAE) go through ``preprocess``, stage 1 and stage 2 (2 steps each); the exported ``NAME_semantic`` /
``NAME_detail_expert`` load with stock ``comfy.sd.load_diffusion_model`` + ``load_lora_for_models`` with no "lora key
not loaded", and ComfyUI's ``apply_model`` with the image conditioning in ComfyUI's form — I2V: ``c_concat`` = mask
+ image latent and ``clip_fea`` = the CLIP features; TI2V: the clean first frame in the latent with
``denoise_mask`` 0 there (ComfyUI's per-frame timesteps) — equals the trainer's ``call_velocity`` over the trained
diffusers students (semantic and detail expert) within 1e-4 in fp32 (on the noisy frames for TI2V).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

TOL = 1e-4
SIGMAS = (0.99, 0.6, 0.2)


def _train(stage: str, model: Path, data: Path, out: Path, *extra: str):
    from tests.comfy.trainer_runs import train_in_process

    overrides = [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}", "max_train_steps=2",
                 "checkpoint.every_steps=0", "export.name=fam", "export.dtype=fp32", "disc.inner_channels=64",
                 "logging.progress_bar=false", "model.lora_rank=4", "model.lora_alpha=4", *extra]  # fmt: skip
    return train_in_process(stage, overrides)


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_image_family_exports_match_in_stock_comfy(comfy, tmp_path, kind, caplog):
    import comfy.sd
    import comfy.utils

    from dcm_core.tiny import save_tiny_model_folder
    from dcm_core.train.models import call_velocity
    from dcm_core.train.preprocess import preprocess
    from dcm_core.train.video_io import synthetic_clip, write_mp4

    side = 64 if kind == "ti2v" else 32
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = save_tiny_model_folder(tmp_path / "model", kind)
        vids = tmp_path / "v"
        vids.mkdir()
        write_mp4(vids / "a.mp4", synthetic_clip(12, side + 8, side + 8, seed=3), fps=16)
        (tmp_path / "c.json").write_text(json.dumps({"a.mp4": "a cat runs"}))
        preprocess(model, vids, tmp_path / "c.json", tmp_path / "d", frames=9, height=side, width=side,
                   max_text_tokens=8, progress=False)  # fmt: skip
        _train("semantic", model, tmp_path / "d", tmp_path / "sem", "optim.lr=1e-3", "data.caption_dropout=0")
        tr, res = _train("detail", model, tmp_path / "d", tmp_path / "det", f"model.semantic_expert={tmp_path / 'sem'}",
                         "optim.lr=1e-2", "data.caption_dropout=0")  # fmt: skip
    finally:
        torch.set_num_threads(n)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patcher = comfy.sd.load_diffusion_model(res.exported["semantic"])
        lora_sd = comfy.utils.load_torch_file(res.exported["detail_expert"])
        lora_patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, 1.0, 0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]

    student = tr.student_unwrapped.eval()
    batch = __import__("dcm_core.train.data", fromlist=["collate"]).collate([tr.dataset[0]])
    cond = tr._cond(batch)
    x = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(7))
    frames = slice(1, None) if kind == "ti2v" else slice(None)
    kw: dict = {}
    x_in = x
    if kind == "i2v":
        kw = {"c_concat": cond.image, "clip_fea": cond.image_embeds}
    else:
        x_in = torch.cat([cond.first_frame, x[:, :, 1:]], dim=2)
        mask = torch.ones(1, 1, x.shape[2], x.shape[3], x.shape[4])
        mask[:, :, 0] = 0
        kw = {"denoise_mask": mask}

    def comfy_v(p, sigma):
        s = torch.tensor([sigma], dtype=torch.float32)
        with torch.no_grad():
            x0 = p.model.apply_model(x_in, s, c_crossattn=cond.context, **kw)
        return (x_in - x0) / sigma

    for sigma in SIGMAS:
        s = torch.tensor([sigma])
        with torch.no_grad():
            v_sem = call_velocity(student, student, x, s, cond, "semantic")
            v_det = call_velocity(student, student, x, s, cond, "detail")
        c_sem = comfy_v(patcher, sigma)
        lora_patcher.patch_model()
        try:
            c_det = comfy_v(lora_patcher, sigma)
        finally:
            lora_patcher.unpatch_model()
        d_sem = (c_sem[:, :, frames] - v_sem[:, :, frames]).abs().max().item()
        d_det = (c_det[:, :, frames] - v_det[:, :, frames]).abs().max().item()
        gap = (v_det - v_sem).abs().max().item()
        print(f"[{kind} export] sigma={sigma}: |comfy - trainer| semantic={d_sem:.3e} detail={d_det:.3e} (experts differ by {gap:.3e})")
        assert d_sem < TOL and d_det < TOL, (sigma, d_sem, d_det)
        assert gap > 100 * TOL
