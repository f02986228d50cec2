"""Official DCM parsing, conversion to the pack-native files, loaders, errors and compatibility checks."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dcm_core import tiny
from dcm_core.errors import (
    DCMFileNotFoundError,
    DCMFormatError,
    DCMIncompatibleModelError,
    DCMUnsupportedFileError,
)
from dcm_core.formats import (
    DetailExpert,
    check_compatible,
    convert_official,
    diffusers_to_comfy,
    inspect_file,
    load_detail_expert,
    load_experts,
    read_header,
)
from dcm_core.formats import (
    keymaps as km,
)
from dcm_core.formats.experts import plan_official
from dcm_core.modeling import DETAIL_ADAPTER, EXPERT_MODULES

RANK, ALPHA = 4, 8.0
VARIANTS = {
    "wan": ("wan", lambda: tiny.wan_config(num_layers=2)),
    "wan_i2v": ("wan", lambda: tiny.wan_config(num_layers=1, image_dim=1280)),
    "hunyuan_video": ("hunyuan_video", lambda: tiny.hunyuan_config()),
}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """variant -> (diffusers model with the official layout, path of its official checkpoint)."""
    root = tmp_path_factory.mktemp("official")
    out = {}
    for name, (family, cfg) in VARIANTS.items():
        m = tiny.make_official_model(family, cfg(), rank=RANK, alpha=ALPHA, seed=7)
        p = tiny.save_official_checkpoint(m, root / name / "diffusion_pytorch_model.safetensors", metadata={"lora_alpha": str(ALPHA)})
        out[name] = (m, p)
    return out


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {name: convert_official(p, root, dtype="fp32", name=name, progress=False) for name, (_, p) in official.items()}


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inspect_official(official, variant):
    family = VARIANTS[variant][0]
    _, p = official[variant]
    info = inspect_file(p)
    assert info.kind == "official_dcm" and info.family == family
    assert info.variant == ("i2v" if variant == "wan_i2v" else "t2v")
    assert (info.lora_rank, info.lora_alpha, info.alpha_source) == (RANK, ALPHA, "metadata:lora_alpha")
    assert info.tensor_count == len(read_header(p).entries)
    assert info.dtype == "fp32"
    assert info.boundary_timestep == {"wan": 978.0, "hunyuan_video": 981.0}[family]
    assert info.schedule == {"wan": "wan2.1-t2v-6step", "hunyuan_video": "hunyuan-t2v-4step"}[family]
    assert info.dims["dim"] == 128
    text = info.describe()
    for word in ("official_dcm", "lora rank:  4", "metadata:lora_alpha", "boundary", "preset"):
        assert word in text


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_official_key_is_accounted_for(official, variant):
    _, p = official[variant]
    header = read_header(p)
    plan = plan_official(header)
    used = {s for op in plan.semantic for s in op.sources}
    for op in plan.detail:
        used.update(x for part in op.parts for x in part[2:4] if x)
        used.update(x for x in (op.src, op.base) if x)
    assert used == set(header.entries)
    n_lora = sum(1 for k in header.entries if f".lora_A.{DETAIL_ADAPTER}." in k)
    assert n_lora == len(plan.layout.lora)


def _resave(model, path, metadata):
    return tiny.save_official_checkpoint(model, path, metadata=metadata)


def test_alpha_sources(official, tmp_path, caplog):
    m, _ = official["wan"]
    p = _resave(m, tmp_path / "a" / "x.safetensors", {"format": "pt"})
    with caplog.at_level(logging.INFO, logger="DCM.formats"):
        info = inspect_file(p)
    assert (info.lora_alpha, info.alpha_source) == (256.0, "dcm-recipe-default")
    assert any("rank is 4, not the recipe's 128" in r.getMessage() for r in caplog.records)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 16}))
    info = inspect_file(p)
    assert (info.lora_alpha, info.alpha_source) == (16.0, "adapter_config.json")
    p2 = _resave(m, tmp_path / "a" / "y.safetensors", {"dcm.lora_alpha": "12"})  # metadata wins over the json
    assert (inspect_file(p2).lora_alpha, inspect_file(p2).alpha_source) == (12.0, "metadata:dcm.lora_alpha")
    p3 = _resave(m, tmp_path / "b" / "z.safetensors", {"lora_adapter_metadata": json.dumps({"lora_alpha": 5, "r": 4})})
    assert inspect_file(p3).lora_alpha == 5.0


def test_rank_comes_from_tensor_shapes(tmp_path):
    m = tiny.make_official_model("wan", tiny.wan_config(num_layers=1), rank=6, alpha=3.0)
    info = inspect_file(tiny.save_official_checkpoint(m, tmp_path / "r6.safetensors", metadata={"lora_alpha": "3"}))
    assert info.lora_rank == 6 and info.lora_alpha == 3.0


# --------------------------------------------------------------------------- conversion + math


def _apply_patches(sem: dict, patches: dict) -> dict:
    """What ComfyUI's LoRA loader does at strength 1: W + (alpha/rank)·B@A, W + diff, b + diff_b."""
    out = {k: v.clone().float() for k, v in sem.items()}
    stems = {k.rsplit(".lora_A.weight", 1)[0] for k in patches if k.endswith(".lora_A.weight")}
    for s in stems:
        a, b = patches[s + ".lora_A.weight"].float(), patches[s + ".lora_B.weight"].float()
        alpha = patches[s + ".alpha"].item() if s + ".alpha" in patches else a.shape[0]
        key = s[len("diffusion_model.") :] + ".weight"
        out[key] += (alpha / a.shape[0]) * (b @ a)
    for k, v in patches.items():
        if k.endswith(".diff_b"):
            out[k[len("diffusion_model.") : -len(".diff_b")] + ".bias"] += v.float()
        elif k.endswith(".diff"):
            stem = k[len("diffusion_model.") : -len(".diff")]
            out[stem if stem in out else stem + ".weight"] += v.float()
    return out


def _expected_experts(model, family):
    """Semantic and detail weights in ComfyUI keys, computed independently from the diffusers model."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    plain, detail = {}, {}
    extras = EXPERT_MODULES[family]
    for k, v in sd.items():
        if ".lora_" in k or any(k.startswith(x + ".") for x in extras.values()):
            continue
        plain[k.replace(".base_layer.", ".")] = v
    detail = dict(plain)
    for k, v in sd.items():
        if f".lora_A.{DETAIL_ADAPTER}." in k:
            stem = k.split(".lora_A.")[0]
            b = sd[f"{stem}.lora_B.{DETAIL_ADAPTER}.weight"]
            detail[stem + ".weight"] = detail[stem + ".weight"] + (ALPHA / RANK) * (b @ v)
        for base, extra in extras.items():
            if k.startswith(extra + "."):
                detail[base + k[len(extra) :]] = v
    return diffusers_to_comfy(family, plain), diffusers_to_comfy(family, detail)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detail_patches_reproduce_the_detail_expert(official, converted, variant):
    family = VARIANTS[variant][0]
    model, p = official[variant]
    exp_sem, exp_det = _expected_experts(model, family)
    bundle = load_experts(converted[variant].semantic_path)
    assert bundle.family == family
    assert set(bundle.semantic_sd) == set(exp_sem)
    for k in exp_sem:
        assert torch.equal(bundle.semantic_sd[k].float(), exp_sem[k]), k
    got = _apply_patches(bundle.semantic_sd, bundle.detail.patches)
    worst = max((got[k] - exp_det[k]).abs().max().item() for k in exp_det)
    assert worst < 1e-5, worst
    changed = {"diffusion_model." + k for k in exp_det if not torch.equal(exp_det[k], exp_sem[k])}
    assert changed <= bundle.detail.expected_targets
    # the in-memory path gives the very same tensors as the files
    mem = load_experts(p)
    for k in exp_sem:
        assert torch.equal(mem.semantic_sd[k], bundle.semantic_sd[k]), k
    assert set(mem.detail.patches) == set(bundle.detail.patches)
    for k, v in mem.detail.patches.items():
        assert torch.equal(v, bundle.detail.patches[k]), k


def test_hunyuan_qkv_lora_is_fused_to_rank_3r(converted):
    d = load_detail_expert(converted["hunyuan_video"].detail_path)
    pre = "diffusion_model.single_blocks.0.linear1"
    assert d.patches[f"{pre}.lora_A.weight"].shape == (3 * RANK, 128)
    assert d.patches[f"{pre}.lora_B.weight"].shape == (3 * 128 + 512, 3 * RANK)
    assert d.patches[f"{pre}.alpha"].item() == 3 * RANK
    assert torch.count_nonzero(d.patches[f"{pre}.lora_B.weight"][3 * 128 :]) == 0  # mlp rows untouched
    assert d.patches["diffusion_model.double_blocks.0.img_attn.proj.alpha"].item() == ALPHA
    assert "diffusion_model.final_layer.adaLN_modulation.1.diff" in d.patches
    assert not any("txt_attn" in k for k in d.patches)  # add_*_proj are not LoRA targets


def test_wan_detail_targets(converted):
    d = load_detail_expert(converted["wan_i2v"].detail_path)
    t = d.expected_targets
    assert "diffusion_model.blocks.0.cross_attn.k.weight" in t
    assert "diffusion_model.time_projection.1.bias" in t
    assert "diffusion_model.head.head.weight" in t
    assert "diffusion_model.img_emb.proj.1.weight" in t
    assert not any("modulation" in k for k in t)  # DCM does not duplicate head.modulation
    assert d.patches["diffusion_model.blocks.0.self_attn.q.alpha"].dtype == torch.float32


def test_native_metadata(converted):
    r = converted["wan"]
    sm, dm = read_header(r.semantic_path).metadata, read_header(r.detail_path).metadata
    for m, role in ((sm, "semantic"), (dm, "detail_expert")):
        assert m["dcm.format_version"] == "1" and m["dcm.family"] == "wan" and m["dcm.role"] == role
        assert m["dcm.boundary_timestep"] == "978" and m["dcm.schedule"] == "wan2.1-t2v-6step"
        assert m["dcm.lora_rank"] == "4" and m["dcm.lora_alpha"] == "8" and m["dcm.variant"] == "t2v"
        assert json.loads(m["dcm.dims"])["num_layers"] == 2
    assert sm["dcm.detail_expert"] == r.detail_path.name
    assert dm["dcm.semantic"] == r.semantic_path.name
    assert r.semantic_info.kind == "dcm_semantic" and r.detail_info.kind == "dcm_detail_expert"


@pytest.mark.parametrize("dtype,sem_big,sem_small,det", [
    ("bf16", "BF16", "BF16", "BF16"),
    ("fp16", "F16", "F16", "F16"),
    ("fp8_e4m3fn", "F8_E4M3", "BF16", "BF16"),
])  # fmt: skip
def test_output_dtypes(official, tmp_path, dtype, sem_big, sem_small, det):
    _, p = official["hunyuan_video"]
    r = convert_official(p, tmp_path, dtype=dtype, name="x", progress=False)
    sh, dh = read_header(r.semantic_path), read_header(r.detail_path)
    assert sh.entries["double_blocks.0.img_attn.qkv.weight"].dtype == sem_big
    assert sh.entries["double_blocks.0.img_attn.qkv.bias"].dtype == sem_small
    assert sh.entries["img_in.proj.weight"].dtype == sem_small  # conv kernel, not a matrix
    for k, e in dh.entries.items():
        assert e.dtype == ("F32" if k.endswith(".alpha") else det), k
    # diffs are relative to the semantic weight *as stored*: semantic + diff reproduces the fp32 detail weight
    b = load_experts(r.semantic_path, dtype=torch.float32)
    m, _ = official["hunyuan_video"]
    want = m.state_dict()["proj_out_lora.weight"].float()
    got = b.semantic_sd["final_layer.linear.weight"] + b.detail.patches["diffusion_model.final_layer.linear.diff"]
    assert (got - want).abs().max().item() < {"bf16": 2e-3, "fp16": 2e-4, "fp8_e4m3fn": 2e-3}[dtype]


def test_bf16_source_kept_when_dtype_is_none(official, tmp_path):
    m, _ = official["hunyuan_video"]
    p = tiny.save_official_checkpoint(m, tmp_path / "bf.safetensors", dtype=torch.bfloat16, metadata={"lora_alpha": "8"})
    assert inspect_file(p).dtype == "bf16"
    b = load_experts(p)
    assert b.semantic_sd["double_blocks.0.img_attn.qkv.weight"].dtype == torch.bfloat16
    assert b.detail.patches["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"].dtype == torch.bfloat16
    b32 = load_experts(p, dtype=torch.float32)
    assert b32.semantic_sd["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float32


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn], ids=["bf16", "fp16", "fp8"])
def test_load_with_dtype_reads_and_converts_in_one_pass_bit_identically(official, variant, dtype, monkeypatch):
    """Loading an fp32 official file as bf16/fp16/fp8 converts plain copies while reading (the reader's scratch
    buffer, no fp32 tensor per weight) and gives exactly the tensors of "read fp32, then .to(dtype)"."""
    from dcm_core.formats import experts as ex
    from dcm_core.formats.safetensors_io import SafeReader

    _, p = official[variant]
    ref = load_experts(p)  # fp32, nothing converted
    asked = []
    real_get = SafeReader.get

    def spy(self, key, dtype=None):
        asked.append(dtype)
        return real_get(self, key, dtype)

    monkeypatch.setattr(SafeReader, "get", spy)
    got = load_experts(p, dtype=dtype)
    assert sum(d is not None for d in asked) >= len([op for op in plan_official(read_header(p), inspect_file(p).layout).semantic
                                                     if op.kind == "copy"]), "plain copies were not converted while reading"
    assert got.semantic_sd.keys() == ref.semantic_sd.keys()
    for k, t in ref.semantic_sd.items():
        want = t.to(ex.semantic_out_dtype(t.dtype, dtype, k, t.ndim))
        assert got.semantic_sd[k].dtype == want.dtype, k
        assert torch.equal(got.semantic_sd[k].view(torch.uint8), want.view(torch.uint8)) if want.ndim and want.element_size() == 1 \
            else torch.equal(got.semantic_sd[k], want), k


# --------------------------------------------------------------------------- partner lookup


def test_partner_lookup(converted, tmp_path):
    r = converted["wan"]
    lone = tmp_path / "diffusion_models"
    lone.mkdir()
    shutil.copy(r.semantic_path, lone)
    with pytest.raises(DCMFileNotFoundError) as ei:
        load_experts(lone / r.semantic_path.name)
    msg = str(ei.value)
    assert r.detail_path.name in msg and "models/loras" in msg
    b = load_experts(lone / r.semantic_path.name, search_dirs=[r.detail_path.parent])
    assert b.detail.info.kind == "dcm_detail_expert"
    b2 = load_experts(r.detail_path)  # a detail file finds its semantic partner too
    assert set(b2.semantic_sd) == set(b.semantic_sd)


# --------------------------------------------------------------------------- wrong files


def test_plain_base_models(tmp_path):
    m = tiny.build_transformer("wan", tiny.wan_config(num_layers=1))
    diff_p = tmp_path / "wan_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(diff_p))
    comfy_p = tmp_path / "wan_comfy.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in diffusers_to_comfy("wan", m.state_dict()).items()}, str(comfy_p))
    for p in (diff_p, comfy_p):
        info = inspect_file(p)
        assert (info.kind, info.family, info.dims["dim"]) == ("base_model", "wan", 128)
        with pytest.raises(DCMUnsupportedFileError, match="plain Wan2.x model.*Load Diffusion Model") as ei:
            load_experts(p)
        assert str(p) in str(ei.value)
        with pytest.raises(DCMUnsupportedFileError, match="UNETLoader"):
            load_detail_expert(p)
        with pytest.raises(DCMUnsupportedFileError):
            convert_official(p, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_style_lora_and_unknown_files(tmp_path):
    lora = {}
    for i in range(2):
        for x in "qkvo":
            s = f"diffusion_model.blocks.{i}.self_attn.{x}"
            lora[f"{s}.lora_A.weight"] = torch.randn(8, 128)
            lora[f"{s}.lora_B.weight"] = torch.randn(128, 8)
            lora[f"{s}.alpha"] = torch.tensor(8.0)
    p = tmp_path / "style.safetensors"
    save_file(lora, str(p))
    info = inspect_file(p)
    assert (info.kind, info.family) == ("lora", "wan")
    with pytest.raises(DCMUnsupportedFileError, match="LoraLoaderModelOnly"):
        load_experts(p)
    with pytest.raises(DCMUnsupportedFileError, match="LoraLoaderModelOnly"):
        load_detail_expert(p)
    q = tmp_path / "weird.safetensors"
    save_file({"foo.bar": torch.zeros(3)}, str(q))
    assert inspect_file(q).kind == "unknown"
    with pytest.raises(DCMUnsupportedFileError, match="not a model DCM recognises"):
        load_experts(q)


def test_official_file_into_detail_loader(official):
    _, p = official["wan"]
    with pytest.raises(DCMUnsupportedFileError, match="DCMCheckpointLoader"):
        load_detail_expert(p)


def test_ab_rank_mismatch(official, tmp_path):
    m, _ = official["wan"]
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    k = f"blocks.1.attn2.to_v.lora_B.{DETAIL_ADAPTER}.weight"
    sd[k] = torch.randn(128, RANK + 2)
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    with pytest.raises(DCMFormatError, match=r"blocks\.1\.attn2\.to_v.*rank 4.*rank 6") as ei:
        inspect_file(p)
    assert str(p) in str(ei.value)
    with pytest.raises(DCMFormatError):
        load_experts(p)


def test_missing_lora_half_and_newer_format(official, converted, tmp_path):
    m, _ = official["wan"]
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != f"blocks.0.attn1.to_q.lora_B.{DETAIL_ADAPTER}.weight"}
    p = tmp_path / "half.safetensors"
    save_file(sd, str(p))
    with pytest.raises(DCMFormatError, match="blocks.0.attn1.to_q.*lora_B"):
        inspect_file(p)
    from dcm_core.formats import load_state_dict

    r = converted["wan"]
    meta = dict(read_header(r.detail_path).metadata, **{"dcm.format_version": "99"})
    q = tmp_path / "future.safetensors"
    save_file(load_state_dict(r.detail_path), str(q), metadata=meta)
    with pytest.raises(DCMUnsupportedFileError, match="newer DCM pack"):
        inspect_file(q)


# --------------------------------------------------------------------------- check_compatible


def _comfy_shapes(family, cfg):
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if family == "wan" else HunyuanVideoTransformer3DModel
    with torch.device("meta"):
        d = {k: tuple(v.shape) for k, v in cls(**cfg).state_dict().items()}
    return {"diffusion_model." + op.out: op.shape for op in km.diffusers_to_comfy_plan(family, d)}


def test_check_compatible_accepts_its_own_semantic_model(converted):
    b = load_experts(converted["hunyuan_video"].semantic_path)
    check_compatible(b.detail, {"diffusion_model." + k: tuple(v.shape) for k, v in b.semantic_sd.items()})
    check_compatible(b.detail, {k: tuple(v.shape) for k, v in b.semantic_sd.items()})  # bare keys are fine


def test_check_compatible_family_mismatch(converted):
    hy = load_detail_expert(converted["hunyuan_video"].detail_path)
    wan_shapes = _comfy_shapes("wan", tiny.wan_config(num_layers=2))
    with pytest.raises(DCMIncompatibleModelError, match="HunyuanVideo detail expert but base is a Wan2.x model"):
        check_compatible(hy, wan_shapes, name="base")
    wan = load_detail_expert(converted["wan"].detail_path)
    with pytest.raises(DCMIncompatibleModelError, match="Wan2.x detail expert.*HunyuanVideo model"):
        check_compatible(wan, _comfy_shapes("hunyuan_video", tiny.hunyuan_config()))


def test_check_compatible_1_3b_expert_on_14b_base():
    small = _comfy_shapes("wan", tiny.wan_config(**tiny.WAN_1_3B))
    big = _comfy_shapes("wan", tiny.wan_config(**tiny.WAN_14B))
    dims = km.dims_from_comfy_shapes("wan", small)
    patches = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 1536),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(1536, 2),
        "diffusion_model.head.head.diff": torch.zeros(64, 1536),
    }
    from dcm_core.formats import FileInfo, targets_of

    info = FileInfo(path="/x/dcm_1.3b_detail_expert.safetensors", kind="dcm_detail_expert", family="wan", dims=dims)
    det = DetailExpert(info=info, family="wan", patches=patches, expected_targets=targets_of(patches), dims=dims)
    check_compatible(det, small)
    with pytest.raises(DCMIncompatibleModelError) as ei:
        check_compatible(det, big, name="wan2.1_t2v_14B.safetensors")
    msg = str(ei.value)
    assert "1.3B" in msg and "14B" in msg and "dcm_1.3b_detail_expert.safetensors" in msg


def test_check_compatible_missing_targets_and_shapes(converted):
    b = load_experts(converted["wan"].semantic_path)
    shapes = {"diffusion_model." + k: tuple(v.shape) for k, v in b.semantic_sd.items()}
    missing = dict(shapes)
    del missing["diffusion_model.blocks.1.cross_attn.v.weight"]
    with pytest.raises(DCMIncompatibleModelError, match="blocks.1.cross_attn.v.weight"):
        check_compatible(b.detail, missing)
    wrong = dict(shapes)
    wrong["diffusion_model.time_projection.1.weight"] = (640, 128)
    with pytest.raises(DCMIncompatibleModelError, match="shape mismatch.*time_projection.1.weight"):
        check_compatible(b.detail, wrong)
    with pytest.raises(DCMIncompatibleModelError, match="not a Wan2.x or HunyuanVideo"):
        check_compatible(b.detail, {"diffusion_model.foo.weight": (3, 3)})


def test_export_from_state_dict_equals_file_conversion(official, converted, tmp_path):
    from dcm_core.formats import export_official_state_dict, load_state_dict

    m, _ = official["hunyuan_video"]
    r = export_official_state_dict(m.state_dict(), tmp_path, name="hunyuan_video", lora_alpha=ALPHA, dtype="fp32")
    ref = converted["hunyuan_video"]
    for mine, theirs in ((r.semantic_path, ref.semantic_path), (r.detail_path, ref.detail_path)):
        a, b = load_state_dict(mine), load_state_dict(theirs)
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
        ma, mb = read_header(mine).metadata, read_header(theirs).metadata
        assert {k: v for k, v in ma.items() if k != "dcm.source"} == {
            k: v for k, v in mb.items() if k not in ("dcm.source", "dcm.alpha_source")
        } | {"dcm.alpha_source": "metadata:dcm.lora_alpha"}
    plain = tiny.build_transformer("wan", tiny.wan_config(num_layers=1)).state_dict()
    with pytest.raises(DCMUnsupportedFileError, match="add_detail_expert"):
        export_official_state_dict(plain, tmp_path / "x", name="x", lora_alpha=1.0)


def test_transformer_prefix_and_duplicate_base(official, tmp_path):
    m, _ = official["wan"]
    sd = {"transformer." + k: v.contiguous() for k, v in m.state_dict().items()}
    p = tmp_path / "prefixed.safetensors"
    save_file(sd, str(p), metadata={"lora_alpha": "8"})
    info = inspect_file(p)
    assert info.kind == "official_dcm" and info.lora_rank == RANK
    assert len(load_experts(p).semantic_sd) == len(load_experts(official["wan"][1]).semantic_sd)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd["blocks.0.attn1.to_q.weight"] = sd["blocks.0.attn1.to_q.base_layer.weight"].clone()
    q = tmp_path / "dup.safetensors"
    save_file(sd, str(q))
    with pytest.raises(DCMFormatError, match="blocks.0.attn1.to_q.weight"):
        inspect_file(q)
