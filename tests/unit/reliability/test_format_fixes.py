"""Regression tests, one per bug the hostile-file properties found in dcm_core/formats (each failed
before its fix): every one used to load silently or fail without naming the file."""

from __future__ import annotations

import json
import os

import pytest
import rel_hostile as H
import torch

from dcm_core.errors import DCMFormatError
from dcm_core.formats import (
    convert_official,
    export_official_state_dict,
    inspect_file,
    load_detail_expert,
    load_experts,
)


def _case(tmp_path, seed, blob, name=None):
    d = tmp_path / "case"
    d.mkdir(exist_ok=True)
    return H.place(seed, d, blob, name)


def test_integer_weight_is_refused(world, tmp_path):
    """Bug 1: a header claiming I32 for a weight (same width as F32) loaded as integer garbage."""
    s = world.seed("official_wan")
    hdr = json.loads(s.raw.header_bytes)
    hdr["blocks.0.ffn.net.2.weight"]["dtype"] = "I32"
    p = _case(tmp_path, s, H.pack_raw(json.dumps(hdr).encode(), s.raw.data))
    with pytest.raises(DCMFormatError, match=r"blocks\.0\.ffn\.net\.2\.weight.*I32.*not float") as ei:
        inspect_file(p)
    assert p.name in str(ei.value)


@pytest.mark.parametrize("seed,key", [("official_hy", "context_embedder.proj_in.bias"),
                                      ("semantic_wan_i2v", "blocks.0.self_attn.k.weight"),
                                      ("detail_wan", "diffusion_model.blocks.1.self_attn.q.alpha")])
def test_nan_inf_weight_is_refused(world, tmp_path, seed, key):
    """Bug 2: NaN / Inf weights (incl. fp8 and a LoRA alpha) loaded silently."""
    s = world.seed(seed)
    p = _case(tmp_path, s, H.with_element(s.blob, key, 0, float("nan")))
    assert inspect_file(p).kind == s.kind  # header only
    with pytest.raises(DCMFormatError, match=rf"{p.name}: tensor '{key}' holds 1 NaN/Inf"):
        load_experts(p)
    if s.kind == "official_dcm":
        with pytest.raises(DCMFormatError, match="NaN"):
            convert_official(p, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_export_refuses_nan_state_dict(world, tmp_path):
    m = world.models["wan"]
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    sd["proj_out_lora.weight"][0, 0] = float("inf")
    with pytest.raises(DCMFormatError, match=r"proj_out_lora\.weight.*NaN/Inf"):
        export_official_state_dict(sd, tmp_path / "out", name="x", lora_alpha=8.0)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("seed,drop,want", [
    ("official_wan", "blocks.0.norm2.weight", "blocks.0.norm3.weight"),
    ("official_hy", "context_embedder.time_text_embed.text_embedder.linear_1.bias", "txt_in.c_embedder.in_layer.bias"),
    ("semantic_wan", "blocks.1.ffn.2.bias", "blocks.1.ffn.2.bias"),
    ("official_hy", "context_embedder.token_refiner.refiner_blocks.0.norm1.weight", "refiner.blocks.0.norm1.weight"),
])  # fmt: skip
def test_missing_weight_is_refused(world, tmp_path, seed, drop, want):
    """Bug 3: a file missing a semantic weight loaded (ComfyUI would leave the weight uninitialised)."""
    s = world.seed(seed)
    p = _case(tmp_path, s, H.rebuild(s.raw, [k for k in s.raw.tensors if k != drop]))
    with pytest.raises(DCMFormatError, match=rf"{p.name}: 1 weight\(s\) of a .* are missing: .*{want}"):
        load_experts(p)


def test_garbled_key_in_semantic_file_is_refused(world, tmp_path):
    """Bug 4: one garbled character in a key name of a semantic file loaded with an unknown key."""
    s = world.seed("semantic_hy")
    hb = s.raw.header_bytes.replace(b'"txt_in.c_embedder.in_layer.bias"', b'" xt_in.c_embedder.in_layer.bias"')
    p = _case(tmp_path, s, H.pack_raw(hb, s.raw.data))
    with pytest.raises(DCMFormatError, match=r"missing: 'txt_in\.c_embedder\.in_layer\.bias'"):
        inspect_file(p)


def test_semantic_metadata_dims_must_match_tensors(world, tmp_path):
    s = world.seed("semantic_wan")
    raw = s.raw
    keep = [k for k in raw.tensors if not k.startswith("blocks.1.")]  # a consistent 1-block model...
    p = _case(tmp_path, s, H.rebuild(raw, keep))  # ...whose metadata still says 2 blocks
    with pytest.raises(DCMFormatError, match=r"dcm.dims says num_layers=2"):
        inspect_file(p)


def test_dims_error_names_the_file(world, tmp_path):
    """Bug 5: 'cannot read the model dimensions' did not say which file."""
    s = world.seed("official_hy")
    p = _case(tmp_path, s, H.rebuild(s.raw, [k for k in s.raw.tensors if not k.startswith("context_embedder.proj_in.")]))
    with pytest.raises(DCMFormatError) as ei:
        inspect_file(p)
    assert p.name in str(ei.value) and "txt_in.input_embedder.weight" in str(ei.value)


def test_official_wrapped_layer_without_lora(world, tmp_path):
    """Bug 6a: dropping one module's LoRA pair left a detail expert silently missing that LoRA."""
    s = world.seed("official_wan")
    keep = [k for k in s.raw.tensors if not k.startswith("blocks.1.attn2.to_k.lora_")]
    p = _case(tmp_path, s, H.rebuild(s.raw, keep))
    with pytest.raises(DCMFormatError, match=r"PEFT-wrapped layer\(s\) have no LoRA tensors: 'blocks\.1\.attn2\.to_k'"):
        inspect_file(p)


def test_official_partial_expert_module_copy(world, tmp_path):
    """Bug 6b: a partial *_lora module silently mixed detail and semantic weights in one module."""
    s = world.seed("official_hy")
    keep = [k for k in s.raw.tensors if k != "norm_out_lora.linear.bias"]
    p = _case(tmp_path, s, H.rebuild(s.raw, keep))
    with pytest.raises(DCMFormatError, match=r"copy of 'norm_out' \('norm_out_lora'\) lacks 'norm_out_lora\.linear\.bias'"):
        inspect_file(p)


@pytest.mark.parametrize("drop,match", [
    (("diffusion_model.single_blocks.0.linear1.lora_A.weight", "diffusion_model.single_blocks.0.linear1.lora_B.weight",
      "diffusion_model.single_blocks.0.linear1.alpha"), r"no LoRA for 1 attention layer.*single_blocks\.0\.linear1"),
    (("diffusion_model.guidance_in.in_layer.diff",), r"copy of 'time_text_embed' is partial: 'guidance_in\.in_layer\.diff'"),
])  # fmt: skip
def test_native_detail_must_be_complete(world, tmp_path, drop, match):
    """Bug 6c: a detail file missing a LoRA module or part of a replaced layer loaded silently."""
    s = world.seed("detail_hy")
    p = _case(tmp_path, s, H.rebuild(s.raw, [k for k in s.raw.tensors if k not in drop]))
    with pytest.raises(DCMFormatError, match=match):
        load_detail_expert(p)
    with pytest.raises(DCMFormatError, match=match):
        load_experts(p)


def test_valid_seed_files_still_load(world):
    for name, s in world.seeds.items():
        if s.kind == "dcm_detail_expert":
            H.check_detail(load_detail_expert(s.path), name)
        else:
            H.check_bundle(load_experts(s.path), name)
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("seed,where", [("official_wan", "key"), ("detail_hy", "dims")])
def test_absurd_block_count_is_refused_quickly(world, tmp_path, seed, where):
    """Bug 7 (in the completeness check added for bug 3/6, caught by the suite before it shipped): a key
    renamed to block 10^9, or dcm.dims claiming 10^9 blocks, made the check build a 10^9-block key list."""
    s = world.seed(seed)
    hdr = json.loads(s.raw.header_bytes)
    if where == "key":
        hdr = {("blocks.999999999.norm2.weight" if k == "blocks.1.norm2.weight" else k): v for k, v in hdr.items()}
    else:
        dims = json.loads(hdr["__metadata__"]["dcm.dims"])
        dims["num_single_layers"] = 10**9
        hdr["__metadata__"]["dcm.dims"] = json.dumps(dims)
    p = _case(tmp_path, s, H.pack_raw(json.dumps(hdr).encode(), s.raw.data))
    with H.bounded("absurd", cpu_s=1.0):
        with pytest.raises(DCMFormatError, match=r"block count of \d+ is implausible") as ei:
            load_experts(p)
    assert p.name in str(ei.value)


@pytest.mark.parametrize("change", ["drop_alpha", "move_alpha"])
def test_detail_lora_needs_its_alpha(world, tmp_path, change):
    """Bug 8: a detail file whose LoRA lost its .alpha (ComfyUI would then use scale 1 instead of alpha/rank),
    or with an .alpha belonging to no LoRA, loaded silently."""
    s = world.seed("detail_hy")
    key = "diffusion_model.double_blocks.0.img_attn.proj.alpha"
    hdr = json.loads(s.raw.header_bytes)
    if change == "drop_alpha":
        blob = H.rebuild(s.raw, [k for k in s.raw.tensors if k != key])
    else:
        hdr = {(key.replace(".0.", ".7.") if k == key else k): v for k, v in hdr.items()}
        blob = H.pack_raw(json.dumps(hdr).encode(), s.raw.data)
    p = _case(tmp_path, s, blob)
    with pytest.raises(DCMFormatError, match=r"double_blocks\.\d\.img_attn\.proj' has (no \.alpha|an \.alpha but no lora_A)"):
        load_detail_expert(p)
