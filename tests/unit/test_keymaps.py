"""diffusers <-> ComfyUI key maps for Wan2.x and HunyuanVideo, checked key by key.

The ComfyUI key lists below were dumped from ComfyUI a125cd84's own classes
(comfy/ldm/wan/model.py ``WanModel``, comfy/ldm/hunyuan_video/model.py ``HunyuanVideo``);
tests/comfy/test_format_parity.py re-checks them against the live classes.
"""

from __future__ import annotations

import pytest
import torch

from dcm_core import tiny
from dcm_core.errors import DCMFormatError
from dcm_core.formats import comfy_to_diffusers, diffusers_to_comfy
from dcm_core.formats import keymaps as km

COMFY_WAN_T2V = (
    "patch_embedding.weight", "patch_embedding.bias",
    "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
    "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
    "time_projection.1.weight", "time_projection.1.bias",
    "blocks.{n}.modulation",
    "blocks.{n}.self_attn.q.weight", "blocks.{n}.self_attn.q.bias",
    "blocks.{n}.self_attn.k.weight", "blocks.{n}.self_attn.k.bias",
    "blocks.{n}.self_attn.v.weight", "blocks.{n}.self_attn.v.bias",
    "blocks.{n}.self_attn.o.weight", "blocks.{n}.self_attn.o.bias",
    "blocks.{n}.self_attn.norm_q.weight", "blocks.{n}.self_attn.norm_k.weight",
    "blocks.{n}.norm3.weight", "blocks.{n}.norm3.bias",
    "blocks.{n}.cross_attn.q.weight", "blocks.{n}.cross_attn.q.bias",
    "blocks.{n}.cross_attn.k.weight", "blocks.{n}.cross_attn.k.bias",
    "blocks.{n}.cross_attn.v.weight", "blocks.{n}.cross_attn.v.bias",
    "blocks.{n}.cross_attn.o.weight", "blocks.{n}.cross_attn.o.bias",
    "blocks.{n}.cross_attn.norm_q.weight", "blocks.{n}.cross_attn.norm_k.weight",
    "blocks.{n}.ffn.0.weight", "blocks.{n}.ffn.0.bias", "blocks.{n}.ffn.2.weight", "blocks.{n}.ffn.2.bias",
    "head.modulation", "head.head.weight", "head.head.bias",
)  # fmt: skip
COMFY_WAN_I2V_EXTRA = (
    "blocks.{n}.cross_attn.k_img.weight", "blocks.{n}.cross_attn.k_img.bias",
    "blocks.{n}.cross_attn.v_img.weight", "blocks.{n}.cross_attn.v_img.bias",
    "blocks.{n}.cross_attn.norm_k_img.weight",
    "img_emb.proj.0.weight", "img_emb.proj.0.bias", "img_emb.proj.1.weight", "img_emb.proj.1.bias",
    "img_emb.proj.3.weight", "img_emb.proj.3.bias", "img_emb.proj.4.weight", "img_emb.proj.4.bias",
)  # fmt: skip
_R = "txt_in.individual_token_refiner.blocks.{r}"
COMFY_HY = (
    "img_in.proj.weight", "img_in.proj.bias",
    "time_in.in_layer.weight", "time_in.in_layer.bias", "time_in.out_layer.weight", "time_in.out_layer.bias",
    "vector_in.in_layer.weight", "vector_in.in_layer.bias", "vector_in.out_layer.weight", "vector_in.out_layer.bias",
    "guidance_in.in_layer.weight", "guidance_in.in_layer.bias",
    "guidance_in.out_layer.weight", "guidance_in.out_layer.bias",
    "txt_in.input_embedder.weight", "txt_in.input_embedder.bias",
    "txt_in.t_embedder.in_layer.weight", "txt_in.t_embedder.in_layer.bias",
    "txt_in.t_embedder.out_layer.weight", "txt_in.t_embedder.out_layer.bias",
    "txt_in.c_embedder.in_layer.weight", "txt_in.c_embedder.in_layer.bias",
    "txt_in.c_embedder.out_layer.weight", "txt_in.c_embedder.out_layer.bias",
    f"{_R}.adaLN_modulation.1.weight", f"{_R}.adaLN_modulation.1.bias", f"{_R}.norm1.weight", f"{_R}.norm1.bias",
    f"{_R}.self_attn.qkv.weight", f"{_R}.self_attn.qkv.bias", f"{_R}.self_attn.proj.weight", f"{_R}.self_attn.proj.bias",
    f"{_R}.norm2.weight", f"{_R}.norm2.bias", f"{_R}.mlp.0.weight", f"{_R}.mlp.0.bias",
    f"{_R}.mlp.2.weight", f"{_R}.mlp.2.bias",
    "double_blocks.{n}.img_mod.lin.weight", "double_blocks.{n}.img_mod.lin.bias",
    "double_blocks.{n}.img_attn.qkv.weight", "double_blocks.{n}.img_attn.qkv.bias",
    "double_blocks.{n}.img_attn.norm.query_norm.scale", "double_blocks.{n}.img_attn.norm.key_norm.scale",
    "double_blocks.{n}.img_attn.proj.weight", "double_blocks.{n}.img_attn.proj.bias",
    "double_blocks.{n}.img_mlp.0.weight", "double_blocks.{n}.img_mlp.0.bias",
    "double_blocks.{n}.img_mlp.2.weight", "double_blocks.{n}.img_mlp.2.bias",
    "double_blocks.{n}.txt_mod.lin.weight", "double_blocks.{n}.txt_mod.lin.bias",
    "double_blocks.{n}.txt_attn.qkv.weight", "double_blocks.{n}.txt_attn.qkv.bias",
    "double_blocks.{n}.txt_attn.norm.query_norm.scale", "double_blocks.{n}.txt_attn.norm.key_norm.scale",
    "double_blocks.{n}.txt_attn.proj.weight", "double_blocks.{n}.txt_attn.proj.bias",
    "double_blocks.{n}.txt_mlp.0.weight", "double_blocks.{n}.txt_mlp.0.bias",
    "double_blocks.{n}.txt_mlp.2.weight", "double_blocks.{n}.txt_mlp.2.bias",
    "single_blocks.{s}.linear1.weight", "single_blocks.{s}.linear1.bias",
    "single_blocks.{s}.linear2.weight", "single_blocks.{s}.linear2.bias",
    "single_blocks.{s}.norm.query_norm.scale", "single_blocks.{s}.norm.key_norm.scale",
    "single_blocks.{s}.modulation.lin.weight", "single_blocks.{s}.modulation.lin.bias",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
)  # fmt: skip


def expand(templates, **counts) -> set[str]:
    out = set()
    for t in templates:
        keys = [t]
        for var, n in counts.items():
            keys = [k.replace("{" + var + "}", str(i)) for k in keys for i in range(n)] if "{" + var + "}" in t else keys
        out.update(keys)
    return out


def meta_shapes(family: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if family == "wan" else HunyuanVideoTransformer3DModel
    with torch.device("meta"):
        m = cls(**cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


CASES = {
    "wan_t2v": ("wan", lambda: tiny.wan_config(num_layers=3), expand(COMFY_WAN_T2V, n=3)),
    "wan_i2v": ("wan", lambda: tiny.wan_config(num_layers=2, image_dim=1280), expand(COMFY_WAN_T2V + COMFY_WAN_I2V_EXTRA, n=2)),
    "hunyuan": ("hunyuan_video", lambda: tiny.hunyuan_config(num_layers=2, num_single_layers=3), expand(COMFY_HY, n=2, s=3, r=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_key_sets_match_exactly_both_directions(case):
    family, cfg, expected = CASES[case]
    d = meta_shapes(family, cfg())
    plan = km.diffusers_to_comfy_plan(family, d)
    comfy = {op.out: op.shape for op in plan}
    assert set(comfy) == expected
    assert len(plan) == len(comfy)  # no key produced twice
    back = {op.out: op.shape for op in km.comfy_to_diffusers_plan(family, comfy)}
    assert back == d


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_tensor_roundtrip_is_exact(family):
    cfg = tiny.wan_config(num_layers=1, image_dim=1280) if family == "wan" else tiny.hunyuan_config()
    sd = tiny.build_transformer(family, cfg, seed=5).state_dict()
    comfy = diffusers_to_comfy(family, sd)
    back = comfy_to_diffusers(family, {"diffusion_model." + k: v for k, v in comfy.items()})
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_wan_specific_renames():
    sd = tiny.build_transformer("wan", tiny.wan_config(num_layers=1), seed=1).state_dict()
    c = diffusers_to_comfy("wan", sd)
    assert torch.equal(c["blocks.0.norm3.weight"], sd["blocks.0.norm2.weight"])  # the norm2/norm3 swap
    assert torch.equal(c["head.modulation"], sd["scale_shift_table"])
    assert torch.equal(c["blocks.0.modulation"], sd["blocks.0.scale_shift_table"])
    assert torch.equal(c["head.head.weight"], sd["proj_out.weight"])
    assert torch.equal(c["time_projection.1.weight"], sd["condition_embedder.time_proj.weight"])
    assert not any(k.startswith("blocks.0.norm2") for k in c)


def test_hunyuan_fused_rows_and_half_swap():
    sd = tiny.build_transformer("hunyuan_video", tiny.hunyuan_config(), seed=2).state_dict()
    c = diffusers_to_comfy("hunyuan_video", sd)
    H = 128
    for p in ("weight", "bias"):
        qkv = c[f"double_blocks.0.img_attn.qkv.{p}"]
        for i, x in enumerate("qkv"):
            assert torch.equal(qkv[i * H : (i + 1) * H], sd[f"transformer_blocks.0.attn.to_{x}.{p}"])
        txt = c[f"double_blocks.0.txt_attn.qkv.{p}"]
        assert torch.equal(txt[H : 2 * H], sd[f"transformer_blocks.0.attn.add_k_proj.{p}"])
        lin1 = c[f"single_blocks.0.linear1.{p}"]
        assert torch.equal(lin1[2 * H : 3 * H], sd[f"single_transformer_blocks.0.attn.to_v.{p}"])
        assert torch.equal(lin1[3 * H :], sd[f"single_transformer_blocks.0.proj_mlp.{p}"])
        ref = c[f"txt_in.individual_token_refiner.blocks.1.self_attn.qkv.{p}"]
        assert torch.equal(ref[:H], sd[f"context_embedder.token_refiner.refiner_blocks.1.attn.to_q.{p}"])
        fin, dif = c[f"final_layer.adaLN_modulation.1.{p}"], sd[f"norm_out.linear.{p}"]
        assert torch.equal(fin[:H], dif[H:]) and torch.equal(fin[H:], dif[:H])  # [scale; shift] -> [shift; scale]
    assert torch.equal(c["time_in.in_layer.weight"], sd["time_text_embed.timestep_embedder.linear_1.weight"])
    assert torch.equal(c["vector_in.in_layer.weight"], sd["time_text_embed.text_embedder.linear_1.weight"])
    assert torch.equal(c["guidance_in.out_layer.bias"], sd["time_text_embed.guidance_embedder.linear_2.bias"])
    assert torch.equal(
        c["double_blocks.0.txt_attn.norm.key_norm.scale"], sd["transformer_blocks.0.attn.norm_added_k.weight"]
    )


@pytest.mark.parametrize(
    "family,cfg,label,dims",
    [
        ("wan", tiny.wan_config(**tiny.WAN_1_3B), "Wan2.1 1.3B", dict(dim=1536, num_layers=30, ffn_dim=8960, num_heads=12)),
        ("wan", tiny.wan_config(**tiny.WAN_14B), "Wan2.1 14B", dict(dim=5120, num_layers=40, ffn_dim=13824, num_heads=40)),
        (
            "wan",
            tiny.wan_config(**tiny.WAN_14B, image_dim=1280, in_channels=36),
            "Wan2.1 14B",
            dict(dim=5120, in_dim=36, image_dim=1280),
        ),
        (
            "hunyuan_video",
            tiny.hunyuan_config(hidden=3072, num_layers=20, num_single_layers=40),
            "HunyuanVideo 13B",
            dict(dim=3072, num_layers=20, num_single_layers=40, num_refiner_layers=2, ffn_dim=12288, pooled_dim=768),
        ),
    ],
)
def test_full_size_shapes(family, cfg, label, dims):
    d = meta_shapes(family, cfg)
    comfy = {op.out: op.shape for op in km.diffusers_to_comfy_plan(family, d)}
    got = km.dims_from_comfy_shapes(family, comfy)
    for k, v in dims.items():
        assert got[k] == v, k
    assert km.size_label(family, got).startswith(label)
    assert km.detect_family_comfy(comfy) == family
    assert km.detect_family_diffusers(d) == family
    assert km.variant_from_dims(family, got) == ("i2v" if "image_dim" in dims else "t2v")


def test_unknown_and_incomplete_keys_are_named():
    d = meta_shapes("wan", tiny.wan_config(num_layers=1))
    d["vace_blocks.0.proj.weight"] = (4, 4)
    with pytest.raises(DCMFormatError, match="vace_blocks.0.proj.weight"):
        km.diffusers_to_comfy_plan("wan", d, where="f.safetensors")
    h = meta_shapes("hunyuan_video", tiny.hunyuan_config())
    del h["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(DCMFormatError, match="to_k.weight.*missing"):
        km.diffusers_to_comfy_plan("hunyuan_video", h)
    with pytest.raises(DCMFormatError, match="family"):
        km.diffusers_to_comfy_plan("sdxl", {})
