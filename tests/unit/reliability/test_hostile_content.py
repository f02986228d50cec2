"""Well-formed files with hostile content, property-based: missing tensors, NaN/Inf weights, LoRA rank
mismatches, an expert on the wrong base (family / size), plain base models, arbitrary style LoRAs and
pickles (never unpickled).

Decision on NaN/Inf (documented in dcm_core/formats/safetensors_io.py): ``inspect`` reads the header
only and describes the file; every loader and the converter read tensors through ``SafeReader``,
which refuses a float tensor holding NaN or ±Inf with a DCMFormatError naming the file, the tensor
and how many values are bad. An expert with NaN weights never loads.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import zipfile

import pytest
import rel_hostile as H
import rel_registry as R
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dcm_core import tiny
from dcm_core.errors import DCMIncompatibleModelError, DCMUnsupportedFileError
from dcm_core.formats import DetailExpert, FileInfo, check_compatible, diffusers_to_comfy
from dcm_core.formats import keymaps as km
from dcm_core.formats.detect import info_from_header
from dcm_core.formats.experts import plan_official
from dcm_core.formats.safetensors_io import Header, TensorEntry
from dcm_core.modeling import EXPERT_MODULES

CAT_MISSING = "missing tensors"
CAT_NAN = "NaN/Inf tensors"
CAT_RANK = "LoRA rank mismatch"
CAT_BASE = "expert on the wrong base"
CAT_PLAIN = "plain base models"
CAT_STYLE = "style LoRAs"
CAT_PICKLE = "pickle files"

OFFICIAL = sorted(f"official_{n}" for n in H.OFFICIAL_SEEDS)
seeds = st.sampled_from(H.SEEDS)

# --------------------------------------------------------------------------- missing tensors

_BLOCK_RX = re.compile(r"^(.*?(?:blocks|refiner_blocks)\.\d+\.)")


def _stem(key: str) -> str:
    for suf in (".lora_A.lora1.weight", ".lora_B.lora1.weight", ".lora_A.weight", ".lora_B.weight", ".alpha",
                ".diff_b", ".diff", ".weight", ".bias", ".scale"):
        if key.endswith(suf):
            return key[: -len(suf)]
    return key


@R.settings(short=20, full=1000)
@given(seed=seeds, data=st.data())
def test_missing_tensors(world, cases, seed, data):
    s = world.seed(seed)
    raw = s.raw
    keys = list(raw.tensors)
    mode = data.draw(st.sampled_from(["random", "module", "block", "all_lora", "expert_group"]), label="mode")
    if mode == "random":
        drop = set(data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=6, unique=True), label="drop"))
    elif mode == "module":
        stem = _stem(data.draw(st.sampled_from(keys), label="of"))
        drop = {k for k in keys if _stem(k) == stem or k.startswith(stem + ".")}
    elif mode == "block":
        blocks = sorted({m.group(1) for k in keys if (m := _BLOCK_RX.match(k))})
        pre = data.draw(st.sampled_from(blocks), label="block")
        drop = {k for k in keys if k.startswith(pre)}
    elif mode == "all_lora":
        drop = {k for k in keys if ".lora_" in k or k.endswith(".alpha")}
    else:
        groups = sorted({x for fam in EXPERT_MODULES.values() for x in fam.values()})
        g = data.draw(st.sampled_from(groups), label="group")
        drop = {k for k in keys if k.startswith(g + ".")} or {k for k in keys if k.endswith((".diff", ".diff_b"))}
    keep = [k for k in keys if k not in drop]
    assume(keep and drop)
    with R.case(CAT_MISSING, f"drop tensors ({'random' if mode == 'random' else 'groups'})"), cases.new() as d:
        p = H.place(s, d, H.rebuild(raw, keep))
        outs = H.probe(p)
        for o in outs.values():
            if not o.ok and o.entry != "load_detail_expert" and "is a" not in o.message[:400]:
                assert re.search(r"missing|incomplete|has no|no base|not found|lacks|only|partial|does not|not part"
                                 r"|not an?\b|cannot|\bno\b", o.message), o.message
        if s.kind == "official_dcm" and mode == "all_lora":
            # without its LoRA the official file is not a DCM file any more: never loaded as one
            assert not outs["load_experts"].ok and not outs["convert"].ok


# --------------------------------------------------------------------------- NaN / Inf


@R.settings(short=20, full=1000)
@given(seed=seeds, data=st.data())
def test_nan_inf_weights_never_load(world, cases, seed, data):
    s = world.seed(seed)
    raw = s.raw
    floats = [k for k, e in raw.tensors.items() if e["dtype"] in H.TORCH_DT and math.prod(e["shape"]) > 0]
    key = data.draw(st.sampled_from(floats), label="tensor")
    numel = math.prod(raw.header[key]["shape"])
    value = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]), label="value")
    idx = data.draw(st.lists(st.integers(0, numel - 1), min_size=1, max_size=3, unique=True), label="elements")
    blob = s.blob
    for i in idx:
        blob = H.with_element(blob, key, i, value)
    with R.case(CAT_NAN, "NaN/±Inf in a random weight"), cases.new() as d:
        p = H.place(s, d, blob)
        outs = H.probe(p)
        assert outs["inspect"].ok  # header-only: describes the file
        want = re.escape(key) + r".*(NaN|Inf)|(NaN|Inf).*" + re.escape(key)
        H.all_refused(outs, entries=("load_experts",), match=want)
        H.all_refused(outs, entries=("convert",), match=want if s.kind == "official_dcm" else None)
        if s.kind == "dcm_detail_expert":
            H.all_refused(outs, entries=("load_detail_expert",), match=want)


# --------------------------------------------------------------------------- LoRA ranks


def _randn_bytes(shape, st_dtype: str, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(H.TORCH_DT[st_dtype]).contiguous().view(torch.uint8).numpy().tobytes()


@R.settings(short=15, full=600)
@given(seed=st.sampled_from(OFFICIAL + sorted(f"detail_{n}" for n in H.OFFICIAL_SEEDS)), data=st.data())
def test_lora_rank_mismatch(world, cases, seed, data):
    s = world.seed(seed)
    raw = s.raw
    a_keys = [k for k in raw.tensors if ".lora_A." in k]
    a = data.draw(st.sampled_from(a_keys), label="module")
    b = a.replace(".lora_A.", ".lora_B.")
    r = raw.header[a]["shape"][0]
    new_r = data.draw(st.integers(1, 3 * r + 4).filter(lambda x: x != r), label="rank")
    side = data.draw(st.sampled_from(["A", "B", "both"]), label="side")
    rep = {}
    if side in ("A", "both"):
        shp = [new_r, raw.header[a]["shape"][1]]
        rep[a] = (raw.header[a]["dtype"], shp, _randn_bytes(shp, raw.header[a]["dtype"], 1))
    if side in ("B", "both"):
        shp = [raw.header[b]["shape"][0], new_r]
        rep[b] = (raw.header[b]["dtype"], shp, _randn_bytes(shp, raw.header[b]["dtype"], 2))
    stem = a.split(".lora_A.")[0]
    with R.case(CAT_RANK, "lora_A / lora_B rank disagree" if side != "both" else "one module with another (consistent) rank"), \
            cases.new() as d:
        p = H.place(s, d, H.rebuild(raw, replace=rep))
        outs = H.probe(p)
        if side == "both":
            return  # ranks may differ between modules: accepted, soundly (checked by probe), or refused
        want = re.escape(stem) + r".*rank"
        if s.kind == "official_dcm":
            H.all_refused(outs, match=want)
        else:
            H.all_refused(outs, entries=("load_experts", "load_detail_expert"), match=want)


# --------------------------------------------------------------------------- expert on the wrong base


def _meta_official_shapes(family: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    from dcm_core.modeling import add_detail_expert

    cls = WanTransformer3DModel if family == "wan" else HunyuanVideoTransformer3DModel
    with torch.device("meta"):
        m = cls(**cfg)
        add_detail_expert(m, rank=128, alpha=256.0)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


ZOO_CFGS = {
    "wan_tiny": ("wan", lambda: H.wan_cfg()),
    "wan_1.3b": ("wan", lambda: tiny.wan_config(**tiny.WAN_1_3B)),
    "wan_14b": ("wan", lambda: tiny.wan_config(**tiny.WAN_14B)),
    "hy_tiny": ("hunyuan_video", lambda: H.hy_cfg()),
    "hy_13b": ("hunyuan_video", lambda: tiny.hunyuan_config(hidden=3072, num_layers=20, num_single_layers=40)),
}


@pytest.fixture(scope="module")
def zoo():
    """Full-size shapes without allocating: meta-device diffusers models -> official-layout header ->
    the real planner -> a DetailExpert whose patches are meta tensors; and each model's ComfyUI shapes."""
    out = {}
    for name, (family, cfg) in ZOO_CFGS.items():
        shapes = _meta_official_shapes(family, cfg())
        entries = {k: TensorEntry(k, "BF16", v, 0, 0) for k, v in shapes.items()}
        header = Header(path=f"/experts/dcm_{name}_official.safetensors", file_size=0, header_size=0,
                        metadata={"lora_alpha": "256"}, entries=entries)
        info = info_from_header(header)
        plan = plan_official(header)
        patches = {op.out: torch.empty(op.shape, device="meta") for op in plan.detail}
        dinfo = FileInfo(path=f"/experts/dcm_{name}_detail_expert.safetensors", kind="dcm_detail_expert",
                         family=family, dims=plan.dims)
        from dcm_core.formats import targets_of

        det = DetailExpert(info=dinfo, family=family, patches=patches, expected_targets=targets_of(patches), dims=plan.dims)
        base = {"diffusion_model." + op.out: op.shape for op in plan.semantic}
        out[name] = (family, info, det, base)
    return out


@R.settings(short=30, full=2000)
@given(expert=st.sampled_from(sorted(ZOO_CFGS)), base=st.sampled_from(sorted(ZOO_CFGS)), data=st.data())
def test_expert_on_wrong_base(zoo, expert, base, data):
    fam_e, _, det, _ = zoo[expert]
    fam_b, _, _, shapes = zoo[base]
    shapes = dict(shapes)
    perturb = data.draw(st.sampled_from(["none", "none", "drop", "reshape", "bare"]), label="perturb")
    targets = sorted(det.expected_targets)
    if perturb == "drop":
        gone = data.draw(st.lists(st.sampled_from(targets), min_size=1, max_size=4, unique=True), label="dropped")
        for k in gone:
            shapes.pop(k, None)
    elif perturb == "reshape":
        k = data.draw(st.sampled_from(targets), label="reshaped")
        if k in shapes:
            shapes[k] = tuple(x + data.draw(st.integers(1, 64), label="by") for x in shapes[k])
    elif perturb == "bare":
        shapes = {k[len("diffusion_model."):]: v for k, v in shapes.items()}
    same = fam_e == fam_b and all(det.dims.get(k) == zoo[base][2].dims.get(k) for k in ("dim", "num_layers", "num_single_layers"))
    ok_expected = same and perturb in ("none", "bare")
    with R.case(CAT_BASE, "detail expert x base model (family, size, missing / reshaped layers)"):
        with H.bounded("check_compatible", cpu_s=2.0):
            try:
                check_compatible(det, shapes, name=f"base_{base}.safetensors")
                err = None
            except DCMIncompatibleModelError as e:
                err = e
        if ok_expected:
            assert err is None, f"{expert} on {base}: {err}"
            return
        if same and perturb == "reshape" and k not in zoo[base][3]:
            return
        assert err is not None, f"{expert} expert accepted on {base} base ({perturb})"
        msg = str(err)
        assert f"dcm_{expert}_detail_expert.safetensors" in msg and f"base_{base}.safetensors" in msg, msg
        if fam_e != fam_b:
            assert "Wan2.x" in msg and "HunyuanVideo" in msg, msg
        elif not same and perturb != "drop":  # (a base missing layers may be refused for those first)
            assert km.size_label(fam_e, det.dims).split(" (")[0] in msg, msg


@R.settings(short=4, full=300)
@given(sem=st.sampled_from(sorted(H.OFFICIAL_SEEDS)), det=st.sampled_from(sorted(H.OFFICIAL_SEEDS)))
def test_mismatched_pair_on_disk(world, cases, sem, det):
    """A semantic file whose detail-expert partner (same file name) is another model's expert."""
    assume(sem != det)
    s, dd = world.seed(f"semantic_{sem}"), world.seed(f"detail_{det}")
    with R.case(CAT_BASE, "semantic file + another model's detail file under the partner name"), cases.new() as d:
        p = d / f"hostile_{sem}_semantic.safetensors"
        p.write_bytes(s.blob)
        os.symlink(dd.path, d / s.partner.name)
        outs = H.probe(p, entries=("load_experts",))
        H.all_refused(outs, entries=("load_experts",), match=r"detail expert|does not fit|patches|made for")
        assert isinstance(outs["load_experts"].error, DCMIncompatibleModelError), outs["load_experts"].error


# --------------------------------------------------------------------------- plain base models


def _base_sd(world, name: str) -> tuple[str, dict[str, torch.Tensor]]:
    family = H.OFFICIAL_SEEDS[name][0]
    extras = tuple(EXPERT_MODULES[family].values())
    sd = {}
    for k, v in world.models[name].state_dict().items():
        if ".lora_" in k or k.startswith(tuple(x + "." for x in extras)):
            continue
        sd[k.replace(".base_layer.", ".")] = v.detach()
    return family, sd


@R.settings(short=12, full=400)
@given(
    model=st.sampled_from(sorted(H.OFFICIAL_SEEDS)),
    layout=st.sampled_from(["diffusers", "transformer.", "comfy", "diffusion_model.", "model.diffusion_model."]),
    dtype=st.sampled_from(["F32", "BF16", "F16", "F8_E4M3"]),
    drop=st.integers(0, 3),
    data=st.data(),
)
def test_plain_base_model(world, cases, model, layout, dtype, drop, data):
    from safetensors.torch import save

    family, sd = _base_sd(world, model)
    if layout in ("diffusers", "transformer."):
        sd = {(layout if layout != "diffusers" else "") + k: v for k, v in sd.items()}
    else:
        pre = "" if layout == "comfy" else layout
        sd = {pre + k: v for k, v in diffusers_to_comfy(family, sd).items()}
    if drop:
        for k in data.draw(st.lists(st.sampled_from(sorted(sd)), min_size=drop, max_size=drop, unique=True), label="drop"):
            del sd[k]
    sd = {k: v.to(H.TORCH_DT[dtype]).contiguous() for k, v in sd.items()}
    with R.case(CAT_PLAIN, "plain Wan / HunyuanVideo model (diffusers / ComfyUI layouts, dtypes)"), cases.new() as d:
        p = d / f"plain_{model}_{layout.strip('.') or 'bare'}.safetensors"
        p.write_bytes(save(sd, metadata={"format": "pt"}))
        outs = H.probe(p)
        info = outs["inspect"]
        if drop and info.ok and info.value.kind == "unknown":  # a damaged plain model may not be recognised at all
            H.all_refused(outs, entries=("load_experts", "load_detail_expert", "convert"), match="not a model DCM recognises")
        else:
            assert info.ok and info.value.kind == "base_model" and info.value.family == family, info.value
            H.all_refused(outs, entries=("load_experts", "load_detail_expert", "convert"),
                          match=r"plain .*Load Diffusion Model|UNETLoader")
        for e in ("load_experts", "load_detail_expert", "convert"):
            assert isinstance(outs[e].error, DCMUnsupportedFileError)


# --------------------------------------------------------------------------- style LoRAs

WAN_MODULES = [f"blocks.{{n}}.{a}.{x}" for a in ("self_attn", "cross_attn") for x in "qkvo"] + ["blocks.{n}.ffn.0", "blocks.{n}.ffn.2"]
WAN_DIFFUSERS = [f"blocks.{{n}}.{a}.{x}" for a in ("attn1", "attn2") for x in ("to_q", "to_k", "to_v", "to_out.0")] + [
    "blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.net.2"]
HY_MODULES = ["double_blocks.{n}.img_attn.qkv", "double_blocks.{n}.img_attn.proj", "double_blocks.{n}.txt_attn.qkv",
              "double_blocks.{n}.img_mlp.0", "single_blocks.{n}.linear1", "single_blocks.{n}.linear2"]
HY_DIFFUSERS = ["transformer_blocks.{n}.attn.to_q", "transformer_blocks.{n}.attn.to_k", "transformer_blocks.{n}.attn.add_q_proj",
                "transformer_blocks.{n}.ff.net.0.proj", "single_transformer_blocks.{n}.attn.to_q", "single_transformer_blocks.{n}.proj_out"]


def _style_lora(family: str, naming: str, modules: list[str], rank: int, alpha: bool, g) -> tuple[dict, dict]:
    sd, meta = {}, {"format": "pt"}
    for m in modules:
        if naming == "kohya":
            base = "lora_unet_" + m.replace(".", "_")
        elif naming in ("diffusers", "peft_default"):
            base = "transformer." + m if naming == "diffusers" else "base_model.model." + m
        else:
            base = "diffusion_model." + m
        a, b = torch.randn(rank, 128, generator=g), torch.randn(128, rank, generator=g)
        if naming in ("comfy", "diffusers"):
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a, b
        elif naming == "peft_default":
            sd[f"{base}.lora_A.default.weight"], sd[f"{base}.lora_B.default.weight"] = a, b
        elif naming in ("comfy_updown", "kohya"):
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = a, b
        elif naming == "lycoris_hada":
            for x in ("hada_w1_a", "hada_w2_a"):
                sd[f"{base}.{x}"] = b.clone()
            for x in ("hada_w1_b", "hada_w2_b"):
                sd[f"{base}.{x}"] = a.clone()
        elif naming == "lycoris_lokr":
            sd[f"{base}.lokr_w1"], sd[f"{base}.lokr_w2"] = torch.randn(4, 4, generator=g), torch.randn(32, 32, generator=g)
        elif naming == "diff":
            sd[f"{base}.diff"] = torch.randn(128, 128, generator=g)
        if alpha and naming not in ("diff",):
            sd[f"{base}.alpha"] = torch.tensor(float(rank))
    if naming == "kohya":
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    return sd, meta


@R.settings(short=20, full=800)
@given(
    family=st.sampled_from(["wan", "hunyuan_video"]),
    naming=st.sampled_from(["comfy", "comfy_updown", "kohya", "diffusers", "peft_default", "lycoris_hada", "lycoris_lokr", "diff"]),
    data=st.data(),
    rank=st.integers(1, 16),
    alpha=st.booleans(),
    dtype=st.sampled_from(["F32", "BF16", "F16"]),
)
def test_style_lora(cases, family, naming, data, rank, alpha, dtype):
    from safetensors.torch import save

    if naming in ("diffusers", "peft_default"):
        pool = WAN_DIFFUSERS if family == "wan" else HY_DIFFUSERS
    else:
        pool = WAN_MODULES if family == "wan" else HY_MODULES
    mods = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=6, unique=True), label="modules")
    n = data.draw(st.integers(0, 39), label="block")
    mods = [m.replace("{n}", str(n)) for m in mods]
    sd, meta = _style_lora(family, naming, mods, rank, alpha, torch.Generator().manual_seed(rank))
    sd = {k: v.to(H.TORCH_DT[dtype]).contiguous() for k, v in sd.items()}
    with R.case(CAT_STYLE, "style LoRA (kohya / diffusers / PEFT / ComfyUI / LyCORIS naming)"), cases.new() as d:
        p = d / f"style_{family}_{naming}.safetensors"
        p.write_bytes(save(sd, metadata=meta))
        outs = H.probe(p)
        assert outs["inspect"].ok and outs["inspect"].value.kind == "lora", outs["inspect"]
        H.all_refused(outs, entries=("load_experts", "load_detail_expert", "convert"), match="LoraLoaderModelOnly")


# --------------------------------------------------------------------------- pickles


class Evil:
    """Creates the marker file when unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(marker: str) -> Evil:
    e = Evil()
    e.marker = marker
    return e


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    m = tmp_path_factory.mktemp("pwn") / "UNPICKLED"
    yield m
    assert not m.exists(), "a pickle was executed during the reliability suite"


@R.settings(short=20, full=600)
@given(
    form=st.sampled_from(["pickle", "torch_zip", "torch_legacy", "zip_evil", "pickle_then_padding"]),
    proto=st.integers(0, 5),
    evil=st.booleans(),
    ext=st.sampled_from([".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".pkl"]),
)
def test_pickle_files_are_never_unpickled(cases, marker, form, proto, evil, ext):
    payload = {"state_dict": {"w": torch.zeros(2, 2)}, "x": _evil(str(marker)) if evil else 1}
    buf = io.BytesIO()
    if form == "pickle":
        pickle.dump(payload, buf, protocol=proto)
    elif form == "torch_zip":
        torch.save(payload, buf, pickle_protocol=max(proto, 2))
    elif form == "torch_legacy":
        torch.save(payload, buf, _use_new_zipfile_serialization=False, pickle_protocol=max(proto, 2))
    elif form == "zip_evil":
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=proto))
            z.writestr("archive/version", "3\n")
    else:
        buf.write(pickle.dumps(payload, protocol=proto) + b"\x00" * 4096)
    with R.case(CAT_PICKLE, "pickle / torch.save / zip (malicious __reduce__) under any extension"), cases.new() as d:
        p = d / f"model{ext}"
        p.write_bytes(buf.getvalue())
        outs = H.probe(p)
        H.all_refused(outs, match=r"pickle|zip|not safetensors|safetensors")
        assert not marker.exists(), "the malicious pickle ran"
