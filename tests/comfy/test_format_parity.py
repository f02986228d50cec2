"""Converted DCM files in the real ComfyUI: stock loaders accept every key, forwards match diffusers+peft.

For tiny official-layout Wan and HunyuanVideo checkpoints (dcm_core.tiny, random non-zero LoRA B,
perturbed *_lora modules):

* ``convert_official`` output loads with stock ``comfy.sd.load_diffusion_model`` (the semantic state
  dict matches ComfyUI's own module keys and shapes exactly) and stock LoRA loading
  (``comfy.lora.load_lora`` + ``add_patches`` accept exactly ``DetailExpert.expected_targets``; no
  "lora key not loaded"), and
* for σ on both sides of the expert boundary, ComfyUI's forward of the semantic model and of
  semantic + detail LoRA equals ``dcm_core.modeling.velocity`` of the same expert within 1e-4 (fp32).
"""

from __future__ import annotations

import logging

import pytest
import torch

from dcm_core import tiny
from dcm_core.formats import convert_official, load_detail_expert, load_experts
from dcm_core.modeling import velocity

TOL = 1e-4
# Wan boundary 978 / HY 981: one σ on the semantic side, two on the detail side.
SIGMAS = {"wan": (0.992, 0.949, 0.5), "hunyuan_video": (0.992, 0.9124, 0.5)}


def _official(tmp_path, family):
    cfg = tiny.wan_config(num_layers=2) if family == "wan" else tiny.hunyuan_config()
    model = tiny.make_official_model(family, cfg, rank=4, alpha=8.0, seed=3)
    path = tiny.save_official_checkpoint(model, tmp_path / f"{family}_official.safetensors", metadata={"lora_alpha": "8"})
    return model, path


def _inputs(family):
    g = torch.Generator().manual_seed(11)
    if family == "wan":
        x = torch.randn(1, 16, 2, 4, 4, generator=g)
    else:
        x = torch.randn(1, 16, 1, 4, 4, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    return x, ctx, pooled


def _diffusers_v(model, family, x, sigma, ctx, pooled, expert):
    with torch.no_grad():
        if family == "wan":
            return velocity(model, x, sigma, ctx, expert)
        mask = torch.ones(ctx.shape[:2], dtype=torch.long)
        # diffusers takes the embedded guidance already multiplied by 1000 (official code: 6.0 * 1000)
        return velocity(
            model, x, sigma, ctx, expert, encoder_attention_mask=mask, pooled_projections=pooled,
            guidance=torch.tensor([6000.0]),
        )


def _comfy_v(patcher, family, x, sigma, ctx, pooled):
    """v from ComfyUI's BaseModel.apply_model (returns x0 = x − σ·v for flow models)."""
    s = torch.tensor([sigma], dtype=torch.float32)
    kw = {} if family == "wan" else {"y": pooled, "guidance": torch.tensor([6.0])}  # ComfyUI multiplies by 1000
    with torch.no_grad():
        x0 = patcher.model.apply_model(x, s, c_crossattn=ctx, **kw)
    return (x - x0) / sigma


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_converted_files_load_in_stock_comfy_and_match_diffusers(comfy, tmp_path, family, caplog):
    import comfy.lora
    import comfy.sd
    import comfy.utils

    model, official = _official(tmp_path, family)
    res = convert_official(official, tmp_path / "out", dtype="fp32", name=f"tiny_{family}", progress=False)
    detail = load_detail_expert(res.detail_path)

    # --- stock diffusion-model loader; every key/shape equals ComfyUI's own module
    patcher = comfy.sd.load_diffusion_model(str(res.semantic_path))
    dm = patcher.model.diffusion_model
    comfy_sd = {k: tuple(v.shape) for k, v in dm.state_dict().items()}
    file_sd = comfy.utils.load_torch_file(str(res.semantic_path))
    assert {k: tuple(v.shape) for k, v in file_sd.items()} == comfy_sd
    for k, v in dm.state_dict().items():
        assert torch.equal(v.float(), file_sd[k].float()), k

    # --- stock LoRA loading accepts exactly the expected targets, nothing unloaded
    lora_sd = comfy.utils.load_torch_file(str(res.detail_path))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
        loaded = comfy.lora.load_lora(lora_sd, key_map)
        accepted = set(patcher.clone().add_patches(loaded, 1.0))
        lora_patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, 1.0, 0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert set(loaded) == set(detail.expected_targets)
    assert accepted == set(detail.expected_targets)

    # --- the in-memory bundle equals the files
    bundle = load_experts(official, dtype=torch.float32)
    assert set(bundle.semantic_sd) == set(file_sd)
    assert bundle.detail.expected_targets == detail.expected_targets

    # --- forwards
    x, ctx, pooled = _inputs(family)
    diffs = {}
    for sigma in SIGMAS[family]:
        v_sem = _diffusers_v(model, family, x, sigma, ctx, pooled, "semantic")
        v_det = _diffusers_v(model, family, x, sigma, ctx, pooled, "detail")
        c_sem = _comfy_v(patcher, family, x, sigma, ctx, pooled)
        lora_patcher.patch_model()
        try:
            c_det = _comfy_v(lora_patcher, family, x, sigma, ctx, pooled)
        finally:
            lora_patcher.unpatch_model()
        c_sem_again = _comfy_v(patcher, family, x, sigma, ctx, pooled)
        diffs[sigma] = (
            (c_sem - v_sem).abs().max().item(),
            (c_det - v_det).abs().max().item(),
            (v_det - v_sem).abs().max().item(),
        )
        assert torch.equal(c_sem, c_sem_again), "unpatching the detail LoRA did not restore the semantic model"
    for sigma, (d_sem, d_det, gap) in diffs.items():
        print(
            f"[parity] {family} sigma={sigma}: |comfy-diffusers| semantic={d_sem:.3e} detail={d_det:.3e} "
            f"(experts differ by {gap:.3e})"
        )
    for sigma, (d_sem, d_det, gap) in diffs.items():
        assert d_sem < TOL and d_det < TOL, (family, sigma, d_sem, d_det)
        assert gap > 100 * TOL, "the tiny detail expert must differ from the semantic one for the test to mean anything"


def _comfy_model_shapes(family, dims):
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.wan.model import WanModel

    ops = comfy.ops.disable_weight_init
    if family == "wan":
        m = WanModel(
            model_type="i2v" if dims.get("image_dim") else "t2v", dim=dims["dim"], ffn_dim=dims["ffn_dim"],
            num_heads=dims["dim"] // 128, num_layers=dims["num_layers"], in_dim=dims["in_dim"], out_dim=16,
            operations=ops, device="meta",
        )
    else:
        m = HunyuanVideo(
            image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768,
            axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096, hidden_size=dims["dim"], mlp_ratio=4.0,
            num_heads=dims["dim"] // 128, depth=dims["num_layers"], depth_single_blocks=dims["num_single_layers"],
            theta=256, qkv_bias=True, byt5=False, guidance_embed=True, operations=ops, device="meta",
        )
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize(
    "family,cfg",
    [
        ("wan", lambda: tiny.wan_config(**tiny.WAN_1_3B)),
        ("wan", lambda: tiny.wan_config(**tiny.WAN_14B, image_dim=1280, in_channels=36)),
        ("hunyuan_video", lambda: tiny.hunyuan_config(hidden=3072, num_layers=20, num_single_layers=40)),
    ],
    ids=["wan1.3b_t2v", "wan14b_i2v", "hunyuan13b"],
)
def test_full_size_key_maps_match_comfy_classes(comfy, family, cfg):
    """Every key and shape of the real-size models maps exactly onto ComfyUI's own modules (meta device)."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    from dcm_core.formats import keymaps as km

    cls = WanTransformer3DModel if family == "wan" else HunyuanVideoTransformer3DModel
    with torch.device("meta"):
        d = {k: tuple(v.shape) for k, v in cls(**cfg()).state_dict().items()}
    ours = {op.out: op.shape for op in km.diffusers_to_comfy_plan(family, d)}
    theirs = _comfy_model_shapes(family, km.dims_from_comfy_shapes(family, ours))
    assert set(ours) == set(theirs), (set(ours) ^ set(theirs))
    assert ours == theirs
    assert {op.out: op.shape for op in km.comfy_to_diffusers_plan(family, theirs)} == d
