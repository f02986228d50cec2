"""Base-model key maps between diffusers and ComfyUI, both directions, for Wan2.x and HunyuanVideo.

The maps are expressed as *plans*: a list of :class:`Op` (output key, output shape, how to build
it from which source keys). A plan is computed from shapes alone, so the converter can write a
safetensors header before reading any tensor, and the same plan drives the in-memory loaders.

Name sources: diffusers 0.42.1 ``WanTransformer3DModel`` / ``HunyuanVideoTransformer3DModel`` and
ComfyUI (a125cd84) ``comfy/ldm/wan/model.py`` / ``comfy/ldm/hunyuan_video/model.py``, checked by
instantiating both sides (tests/unit/test_keymaps.py holds the key lists, tests/comfy checks them
against the real ComfyUI classes).

Traps handled here:

* Wan ``blocks.N.norm2`` (affine) is ComfyUI ``blocks.N.norm3``;
* Wan ``scale_shift_table`` -> ``head.modulation``, ``blocks.N.scale_shift_table`` -> ``blocks.N.modulation``;
* HunyuanVideo q/k/v (and ``add_q/k/v_proj``, refiner q/k/v) are fused row-wise into one ``qkv``;
  single-block ``linear1`` is rows ``[q; k; v; mlp]``;
* HunyuanVideo ``norm_out.linear`` is ``[scale; shift]``, ComfyUI ``final_layer.adaLN_modulation.1``
  is ``[shift; scale]``: the two row halves are swapped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from ..errors import DCMFormatError
from ..schedule import FAMILY_HUNYUAN, FAMILY_WAN

Shape = tuple[int, ...]

# --------------------------------------------------------------------------- rule tables

#: Wan: (diffusers stem, ComfyUI stem). A stem matches ``stem``, ``stem.weight`` or ``stem.bias``.
WAN_RULES: tuple[tuple[str, str], ...] = (
    ("scale_shift_table", "head.modulation"),
    ("patch_embedding", "patch_embedding"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
    ("blocks.{n}.attn1.to_q", "blocks.{n}.self_attn.q"),
    ("blocks.{n}.attn1.to_k", "blocks.{n}.self_attn.k"),
    ("blocks.{n}.attn1.to_v", "blocks.{n}.self_attn.v"),
    ("blocks.{n}.attn1.to_out.0", "blocks.{n}.self_attn.o"),
    ("blocks.{n}.attn1.norm_q", "blocks.{n}.self_attn.norm_q"),
    ("blocks.{n}.attn1.norm_k", "blocks.{n}.self_attn.norm_k"),
    ("blocks.{n}.attn2.to_q", "blocks.{n}.cross_attn.q"),
    ("blocks.{n}.attn2.to_k", "blocks.{n}.cross_attn.k"),
    ("blocks.{n}.attn2.to_v", "blocks.{n}.cross_attn.v"),
    ("blocks.{n}.attn2.to_out.0", "blocks.{n}.cross_attn.o"),
    ("blocks.{n}.attn2.norm_q", "blocks.{n}.cross_attn.norm_q"),
    ("blocks.{n}.attn2.norm_k", "blocks.{n}.cross_attn.norm_k"),
    ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    ("blocks.{n}.attn2.norm_added_k", "blocks.{n}.cross_attn.norm_k_img"),
    ("blocks.{n}.norm2", "blocks.{n}.norm3"),
    ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
    ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ("proj_out", "head.head"),
)

_HR = "context_embedder.token_refiner.refiner_blocks.{n}"
_CR = "txt_in.individual_token_refiner.blocks.{n}"

#: HunyuanVideo one-to-one renames.
HY_RULES: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj", "img_in.proj"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("context_embedder.proj_in", "txt_in.input_embedder"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.in_layer"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.out_layer"),
    ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.in_layer"),
    ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.out_layer"),
    (f"{_HR}.norm1", f"{_CR}.norm1"),
    (f"{_HR}.norm2", f"{_CR}.norm2"),
    (f"{_HR}.attn.to_out.0", f"{_CR}.self_attn.proj"),
    (f"{_HR}.ff.net.0.proj", f"{_CR}.mlp.0"),
    (f"{_HR}.ff.net.2", f"{_CR}.mlp.2"),
    (f"{_HR}.norm_out.linear", f"{_CR}.adaLN_modulation.1"),
    ("transformer_blocks.{n}.norm1.linear", "double_blocks.{n}.img_mod.lin"),
    ("transformer_blocks.{n}.norm1_context.linear", "double_blocks.{n}.txt_mod.lin"),
    ("transformer_blocks.{n}.attn.norm_q.weight", "double_blocks.{n}.img_attn.norm.query_norm.scale"),
    ("transformer_blocks.{n}.attn.norm_k.weight", "double_blocks.{n}.img_attn.norm.key_norm.scale"),
    ("transformer_blocks.{n}.attn.norm_added_q.weight", "double_blocks.{n}.txt_attn.norm.query_norm.scale"),
    ("transformer_blocks.{n}.attn.norm_added_k.weight", "double_blocks.{n}.txt_attn.norm.key_norm.scale"),
    ("transformer_blocks.{n}.attn.to_out.0", "double_blocks.{n}.img_attn.proj"),
    ("transformer_blocks.{n}.attn.to_add_out", "double_blocks.{n}.txt_attn.proj"),
    ("transformer_blocks.{n}.ff.net.0.proj", "double_blocks.{n}.img_mlp.0"),
    ("transformer_blocks.{n}.ff.net.2", "double_blocks.{n}.img_mlp.2"),
    ("transformer_blocks.{n}.ff_context.net.0.proj", "double_blocks.{n}.txt_mlp.0"),
    ("transformer_blocks.{n}.ff_context.net.2", "double_blocks.{n}.txt_mlp.2"),
    ("single_transformer_blocks.{n}.proj_out", "single_blocks.{n}.linear2"),
    ("single_transformer_blocks.{n}.norm.linear", "single_blocks.{n}.modulation.lin"),
    ("single_transformer_blocks.{n}.attn.norm_q.weight", "single_blocks.{n}.norm.query_norm.scale"),
    ("single_transformer_blocks.{n}.attn.norm_k.weight", "single_blocks.{n}.norm.key_norm.scale"),
    ("proj_out", "final_layer.linear"),
)

#: HunyuanVideo row-fused layers: ComfyUI stem <- diffusers stems, in row order. ``None`` marks the
#: rest-of-rows part sized from the weight's input width (single-block mlp rows).
HY_FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("double_blocks.{n}.img_attn.qkv", tuple(f"transformer_blocks.{{n}}.attn.to_{c}" for c in "qkv")),
    ("double_blocks.{n}.txt_attn.qkv", tuple(f"transformer_blocks.{{n}}.attn.add_{c}_proj" for c in "qkv")),
    (f"{_CR}.self_attn.qkv", tuple(f"{_HR}.attn.to_{c}" for c in "qkv")),
    (
        "single_blocks.{n}.linear1",
        tuple(f"single_transformer_blocks.{{n}}.attn.to_{c}" for c in "qkv") + ("single_transformer_blocks.{n}.proj_mlp",),
    ),
)

#: HunyuanVideo layers whose two row halves are swapped ([scale; shift] <-> [shift; scale]).
HY_SWAPPED: tuple[tuple[str, str], ...] = (("norm_out.linear", "final_layer.adaLN_modulation.1"),)



# --------------------------------------------------------------------------- plan ops


@dataclass(frozen=True)
class Op:
    """How to build one output tensor.

    kind: ``copy`` (sources[0]), ``cat`` (row-concatenate sources), ``swap`` (swap the two row
    halves of sources[0]), ``slice`` (rows ``args[0] : args[0] + args[1]`` of sources[0]).
    """

    out: str
    shape: Shape
    kind: str
    sources: tuple[str, ...]
    args: tuple[int, ...] = ()


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of dim 0 (HunyuanVideo final-layer modulation order)."""
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]], dim=0)


def run_op(op: Op, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Materialise one op; ``get(key)`` returns a source tensor."""
    if op.kind == "copy":
        t = get(op.sources[0])
    elif op.kind == "cat":
        parts = [get(s) for s in op.sources]
        dt = parts[0].dtype
        t = torch.cat([p.to(dt) for p in parts], dim=0)
    elif op.kind == "swap":
        t = swap_halves(get(op.sources[0]))
    elif op.kind == "slice":
        start, length = op.args
        t = get(op.sources[0])[start : start + length].clone()
    else:  # pragma: no cover - internal
        raise ValueError(f"unknown op kind {op.kind}")
    if tuple(t.shape) != op.shape:
        raise DCMFormatError(
            f"tensor for {op.out!r} has shape {tuple(t.shape)}, expected {op.shape} from the header; the file is damaged."
        )
    return t


def run_plan(plan: Iterable[Op], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    return {op.out: run_op(op, get) for op in plan}


# --------------------------------------------------------------------------- pattern matching


def _compile(stem: str) -> re.Pattern:
    rx = re.escape(stem).replace(re.escape("{n}"), r"(?P<n>\d+)")
    if stem.endswith((".weight", ".bias", "scale")) or stem in ("scale_shift_table",) or stem.endswith(
        ("scale_shift_table", "modulation", "pos_embed", "emb_pos")
    ):
        return re.compile(rx + r"$")
    return re.compile(rx + r"(?P<p>\.weight|\.bias)$")


class _RuleSet:
    def __init__(self, rules: Iterable[tuple[str, str]]):
        self.fwd = [(_compile(a), b) for a, b in rules]
        self.bwd = [(_compile(b), a) for a, b in rules]

    @staticmethod
    def _apply(table, key: str) -> str | None:
        for rx, tpl in table:
            m = rx.match(key)
            if m:
                gd = m.groupdict()
                out = tpl.replace("{n}", gd["n"]) if gd.get("n") is not None else tpl
                return out + (gd.get("p") or "")
        return None

    def forward(self, key: str) -> str | None:
        return self._apply(self.fwd, key)

    def backward(self, key: str) -> str | None:
        return self._apply(self.bwd, key)


_WAN = _RuleSet(WAN_RULES)
_HY = _RuleSet(HY_RULES)
_HY_SWAP = _RuleSet(HY_SWAPPED)
_HY_FUSED_FWD = [
    ([(_compile(s), i) for i, s in enumerate(srcs)], comfy, srcs) for comfy, srcs in HY_FUSED
]
_HY_FUSED_BWD = [(_compile(comfy), comfy, srcs) for comfy, srcs in HY_FUSED]


def _unknown(family: str, keys: list[str], direction: str, where: str) -> DCMFormatError:
    shown = ", ".join(repr(k) for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    fam = "Wan2.x" if family == FAMILY_WAN else "HunyuanVideo"
    return DCMFormatError(
        f"{where}: {len(keys)} key(s) are not part of a {fam} transformer in {direction} layout: {shown}. "
        f"The file is another model variant (VACE, camera, audio, ...) that DCM does not support, or it is "
        f"not a {fam} transformer."
    )


def _check_family(family: str) -> None:
    if family not in (FAMILY_WAN, FAMILY_HUNYUAN):
        raise DCMFormatError(f"unknown model family {family!r}; DCM supports 'wan' and 'hunyuan_video'.")


# --------------------------------------------------------------------------- plans


def diffusers_to_comfy_plan(family: str, shapes: Mapping[str, Shape], *, where: str = "state dict") -> list[Op]:
    """Plan converting plain diffusers keys (no PEFT wrappers) to bare ComfyUI keys.

    Raises :class:`DCMFormatError` if any key is not accounted for or a fused group is incomplete.
    """
    _check_family(family)
    plan: list[Op] = []
    unknown: list[str] = []
    if family == FAMILY_WAN:
        for k, shp in shapes.items():
            out = _WAN.forward(k)
            if out is None:
                unknown.append(k)
            else:
                plan.append(Op(out, tuple(shp), "copy", (k,)))
        if unknown:
            raise _unknown(family, unknown, "diffusers", where)
        return plan

    groups: dict[str, dict[int, str]] = {}
    group_srcs: dict[str, tuple[str, ...]] = {}
    for k, shp in shapes.items():
        out = _HY.forward(k)
        if out is not None:
            plan.append(Op(out, tuple(shp), "copy", (k,)))
            continue
        out = _HY_SWAP.forward(k)
        if out is not None:
            if shp[0] % 2:
                raise DCMFormatError(f"{where}: {k!r} has {shp[0]} rows; the final-layer modulation must have an even count.")
            plan.append(Op(out, tuple(shp), "swap", (k,)))
            continue
        for pats, comfy, srcs in _HY_FUSED_FWD:
            hit = None
            for rx, i in pats:
                m = rx.match(k)
                if m:
                    hit = (m, i)
                    break
            if hit:
                m, i = hit
                n, p = m.group("n"), m.group("p")
                okey = comfy.replace("{n}", n) + p
                groups.setdefault(okey, {})[i] = k
                group_srcs[okey] = tuple(s.replace("{n}", n) + p for s in srcs)
                break
        else:
            unknown.append(k)
    if unknown:
        raise _unknown(family, unknown, "diffusers", where)
    for okey, parts in groups.items():
        want = group_srcs[okey]
        missing = [s for i, s in enumerate(want) if i not in parts]
        if missing:
            raise DCMFormatError(
                f"{where}: {okey!r} is fused from {', '.join(want)}, but {', '.join(missing)} is missing. "
                f"The file is incomplete."
            )
        srcs = tuple(parts[i] for i in range(len(want)))
        tails = {tuple(shapes[s][1:]) for s in srcs}
        if len(tails) != 1:
            raise DCMFormatError(f"{where}: parts of {okey!r} have mismatched shapes {[shapes[s] for s in srcs]}.")
        rows = sum(shapes[s][0] for s in srcs)
        plan.append(Op(okey, (rows,) + tails.pop(), "cat", srcs))
    return plan


def comfy_to_diffusers_plan(family: str, shapes: Mapping[str, Shape], *, where: str = "state dict") -> list[Op]:
    """Plan converting bare ComfyUI keys to plain diffusers keys (splitting fused layers)."""
    _check_family(family)
    plan: list[Op] = []
    unknown: list[str] = []
    table = _WAN if family == FAMILY_WAN else _HY
    for k, shp in shapes.items():
        out = table.backward(k)
        if out is not None:
            plan.append(Op(out, tuple(shp), "copy", (k,)))
            continue
        if family == FAMILY_HUNYUAN:
            out = _HY_SWAP.backward(k)
            if out is not None:
                plan.append(Op(out, tuple(shp), "swap", (k,)))
                continue
            done = False
            for rx, comfy, srcs in _HY_FUSED_BWD:
                m = rx.match(k)
                if not m:
                    continue
                n, p = m.group("n"), m.group("p")
                rows = shp[0]
                if len(srcs) == 3:
                    if rows % 3:
                        raise DCMFormatError(f"{where}: fused {k!r} has {rows} rows, not divisible by 3.")
                    sizes = [rows // 3] * 3
                else:  # linear1: [q; k; v; mlp], hidden = the weight's input width
                    wkey = k[: -len(p)] + ".weight"
                    if wkey not in shapes or len(shapes[wkey]) != 2:
                        raise DCMFormatError(f"{where}: cannot split {k!r} without {wkey!r}.")
                    h = shapes[wkey][1]
                    if rows <= 3 * h:
                        raise DCMFormatError(f"{where}: {k!r} has {rows} rows; expected 3×{h} + mlp rows.")
                    sizes = [h, h, h, rows - 3 * h]
                start = 0
                for s, size in zip(srcs, sizes):
                    plan.append(Op(s.replace("{n}", n) + p, (size,) + tuple(shp[1:]), "slice", (k,), (start, size)))
                    start += size
                done = True
                break
            if done:
                continue
        unknown.append(k)
    if unknown:
        raise _unknown(family, unknown, "ComfyUI", where)
    return plan


def diffusers_to_comfy(family: str, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a plain diffusers transformer state dict (Wan / HunyuanVideo) to bare ComfyUI keys."""
    plan = diffusers_to_comfy_plan(family, {k: tuple(v.shape) for k, v in sd.items()})
    return run_plan(plan, sd.__getitem__)


def comfy_to_diffusers(family: str, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a ComfyUI transformer state dict (bare or ``diffusion_model.``-prefixed) to diffusers keys."""
    sd = strip_prefix(sd)
    plan = comfy_to_diffusers_plan(family, {k: tuple(v.shape) for k, v in sd.items()})
    return run_plan(plan, sd.__getitem__)


COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_prefix(sd: Mapping[str, object], prefixes: Iterable[str] = COMFY_PREFIXES) -> dict:
    """Remove a common ComfyUI prefix (``diffusion_model.`` / ``model.diffusion_model.``) if every key has it."""
    keys = list(sd)
    for pre in prefixes:
        if keys and all(k.startswith(pre) for k in keys):
            return {k[len(pre) :]: v for k, v in sd.items()}
    return dict(sd)


# --------------------------------------------------------------------------- family / dims


def detect_family_diffusers(keys: Iterable[str]) -> str | None:
    ks = list(keys)
    if any(k.startswith("condition_embedder.") for k in ks) and any(k.startswith("blocks.") for k in ks):
        return FAMILY_WAN
    if any(k.startswith(("time_text_embed.", "transformer_blocks.", "single_transformer_blocks.")) for k in ks) and any(
        k.startswith("x_embedder.") for k in ks
    ):
        return FAMILY_HUNYUAN
    return None


def detect_family_comfy(keys: Iterable[str]) -> str | None:
    ks = set(keys)
    if "head.modulation" in ks:
        return FAMILY_WAN
    if any(k.startswith("txt_in.individual_token_refiner.") for k in ks) and "img_in.proj.weight" in ks:
        return FAMILY_HUNYUAN
    return None


def _count(keys: Iterable[str], prefix: str) -> int:
    idx = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                idx.add(int(head))
    return max(idx) + 1 if idx else 0


def dims_from_comfy_shapes(family: str, shapes: Mapping[str, Shape], *, where: str | None = None) -> dict:
    """Architecture numbers from bare ComfyUI keys (what ComfyUI's model detection reads).

    ``where`` (a file name) prefixes the error message."""
    s = strip_prefix(shapes)
    g = s.get
    try:
        if family == FAMILY_WAN:
            dim = s["head.modulation"][-1]
            d = dict(
                dim=dim,
                num_layers=_count(s, "blocks."),
                ffn_dim=s["blocks.0.ffn.0.weight"][0],
                in_dim=s["patch_embedding.weight"][1],
                out_dim=s["head.head.weight"][0] // 4,
                text_dim=s["text_embedding.0.weight"][1],
                freq_dim=s["time_embedding.0.weight"][1],
                num_heads=dim // 128,
            )
            if g("img_emb.proj.0.weight") is not None:
                d["image_dim"] = s["img_emb.proj.0.weight"][0]
            if g("img_emb.emb_pos") is not None:
                d["flf_pos_tokens"] = s["img_emb.emb_pos"][1]
            return d
        if family == FAMILY_HUNYUAN:
            w = s["img_in.proj.weight"]
            dim = w[0]
            patch = list(w[2:])
            prod = math.prod(patch)
            d = dict(
                dim=dim,
                num_layers=_count(s, "double_blocks."),
                num_single_layers=_count(s, "single_blocks."),
                num_refiner_layers=_count(s, "txt_in.individual_token_refiner.blocks."),
                ffn_dim=s["double_blocks.0.img_mlp.0.weight"][0] if "double_blocks.0.img_mlp.0.weight" in s else None,
                in_dim=w[1],
                out_dim=s["final_layer.linear.weight"][0] // prod,
                text_dim=s["txt_in.input_embedder.weight"][1],
                pooled_dim=s["vector_in.in_layer.weight"][1] if "vector_in.in_layer.weight" in s else None,
                guidance_embeds="guidance_in.in_layer.weight" in s,
                num_heads=dim // 128,
                patch_size=patch,
            )
            return d
    except (KeyError, IndexError) as e:
        pre = f"{where}: " if where else ""
        raise DCMFormatError(
            f"{pre}cannot read the model dimensions: key {e} is missing or malformed. The file is incomplete or "
            f"not a {family_label(family)} model."
        ) from None
    raise DCMFormatError(f"unknown model family {family!r}")


# --------------------------------------------------------------------------- completeness

_CR_T = "txt_in.individual_token_refiner.blocks.{r}"

#: Every ComfyUI key of a model, by family and optional part ({n}: block, {s}: single block,
#: {r}: token-refiner block), as ComfyUI a125cd84's WanModel / HunyuanVideo create them.
COMFY_KEY_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    FAMILY_WAN: {
        "core": tuple(
            [f"{m}.{p}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                  "time_embedding.2", "time_projection.1", "head.head") for p in ("weight", "bias")]
            + ["head.modulation", "blocks.{n}.modulation", "blocks.{n}.norm3.weight", "blocks.{n}.norm3.bias"]
            + [f"blocks.{{n}}.{a}.{x}.{p}" for a in ("self_attn", "cross_attn") for x in "qkvo" for p in ("weight", "bias")]
            + [f"blocks.{{n}}.{a}.norm_{x}.weight" for a in ("self_attn", "cross_attn") for x in "qk"]
            + [f"blocks.{{n}}.ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
        ),
        "i2v": tuple(
            [f"blocks.{{n}}.cross_attn.{x}_img.{p}" for x in "kv" for p in ("weight", "bias")]
            + ["blocks.{n}.cross_attn.norm_k_img.weight"]
            + [f"img_emb.proj.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")]
        ),
        "flf": ("img_emb.emb_pos",),
    },
    FAMILY_HUNYUAN: {
        "core": tuple(
            [f"{m}.{p}" for m in ("img_in.proj", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                                  "vector_in.out_layer", "txt_in.input_embedder", "txt_in.t_embedder.in_layer",
                                  "txt_in.t_embedder.out_layer", "txt_in.c_embedder.in_layer",
                                  "txt_in.c_embedder.out_layer", "final_layer.linear",
                                  "final_layer.adaLN_modulation.1") for p in ("weight", "bias")]
            + [f"{_CR_T}.{m}.{p}" for m in ("adaLN_modulation.1", "norm1", "self_attn.qkv", "self_attn.proj", "norm2",
                                            "mlp.0", "mlp.2") for p in ("weight", "bias")]
            + [f"double_blocks.{{n}}.{x}_{m}.{p}" for x in ("img", "txt")
               for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2") for p in ("weight", "bias")]
            + [f"double_blocks.{{n}}.{x}_attn.norm.{q}_norm.scale" for x in ("img", "txt") for q in ("query", "key")]
            + [f"single_blocks.{{s}}.{m}.{p}" for m in ("linear1", "linear2", "modulation.lin") for p in ("weight", "bias")]
            + [f"single_blocks.{{s}}.norm.{q}_norm.scale" for q in ("query", "key")]
        ),
        "guidance": tuple(f"guidance_in.{m}.{p}" for m in ("in_layer", "out_layer") for p in ("weight", "bias")),
    },
}


def expand_templates(templates, counts: Mapping[str, int]) -> set[str]:
    """Templates with ``{n}`` / ``{s}`` / ``{r}`` expanded over ``range(counts[var])``."""
    out: set[str] = set()
    for t in templates:
        keys = [t]
        for var, n in counts.items():
            tok = "{" + var + "}"
            if tok in t:
                keys = [k.replace(tok, str(i)) for k in keys for i in range(int(n))]
        out.update(keys)
    return out


#: More blocks than any real model has (Wan 14B: 40, HunyuanVideo: 20 + 40). A larger count comes from a
#: damaged or crafted key / metadata and must not be expanded into a key list.
MAX_BLOCKS = 1024


def block_counts(family: str, dims: Mapping, *, where: str = "model") -> dict[str, int] | None:
    """``{n, s, r}`` block counts from dims (None if dims does not hold them)."""
    try:
        if family == FAMILY_WAN:
            counts = {"n": int(dims["num_layers"])}
        else:
            counts = {"n": int(dims["num_layers"]), "s": int(dims["num_single_layers"]), "r": int(dims["num_refiner_layers"])}
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    bad = {k: v for k, v in counts.items() if not 0 <= v <= MAX_BLOCKS}
    if bad:
        raise DCMFormatError(
            f"{where}: a block count of {max(bad.values(), key=abs)} is implausible (real models have at most a few "
            f"dozen blocks); a key name or the dcm.dims metadata is damaged or crafted."
        )
    return counts


def expected_comfy_keys(family: str, dims: Mapping, *, where: str = "model") -> set[str]:
    """Every ComfyUI key a model with these dims has (optional parts from dims: Wan I2V / FLF, HY guidance)."""
    _check_family(family)
    tpl = COMFY_KEY_TEMPLATES[family]
    parts = ["core"]
    if family == FAMILY_WAN:
        if dims.get("image_dim"):
            parts.append("i2v")
        if dims.get("flf_pos_tokens"):
            parts.append("flf")
    elif dims.get("guidance_embeds"):
        parts.append("guidance")
    counts = block_counts(family, dims, where=where)
    if counts is None:
        raise DCMFormatError(f"{where}: model dims {dict(dims)} lack the block counts")
    return expand_templates([t for p in parts for t in tpl[p]], counts)


def shown_keys(keys: list[str], n: int = 6) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_complete(family: str, shapes: Mapping[str, Shape], *, where: str) -> dict:
    """Dims of a bare ComfyUI state dict that holds *exactly* the keys of its architecture.

    A missing weight would be left uninitialised by ComfyUI's (non-strict) load, and an unknown key
    silently ignored; both mean a damaged or edited file, so both raise :class:`DCMFormatError`."""
    s = strip_prefix(shapes)
    dims = dims_from_comfy_shapes(family, s, where=where)
    want = expected_comfy_keys(family, dims, where=where)
    have = set(s)
    missing, unknown = sorted(want - have), sorted(have - want)
    label = size_label(family, dims)
    if missing:
        raise DCMFormatError(
            f"{where}: {len(missing)} weight(s) of a {label} are missing: {shown_keys(missing)}. The file is "
            f"incomplete (an interrupted download or an edited file); re-download or re-convert it."
        )
    if unknown:
        raise DCMFormatError(
            f"{where}: {len(unknown)} key(s) are not part of a {label}: {shown_keys(unknown)}. The file is damaged or "
            f"was edited; re-download or re-convert it."
        )
    return dims


def variant_from_dims(family: str, dims: Mapping) -> str:
    """``t2v``, ``i2v`` or ``ti2v`` (Wan: an image embedder or 36 input channels is i2v, 48 in / 48 out the
    Wan2.2 TI2V 5B; HunyuanVideo: more than 16 input channels is i2v)."""
    if family == FAMILY_WAN:
        if dims.get("image_dim") or dims.get("in_dim") == 36:
            return "i2v"
        return "ti2v" if dims.get("in_dim") == 48 and dims.get("out_dim") == 48 else "t2v"
    return "i2v" if int(dims.get("in_dim", 16)) > 16 else "t2v"


_KNOWN_SIZES = {
    (FAMILY_WAN, 1536, 30): "Wan2.1 1.3B",
    (FAMILY_WAN, 5120, 40): "Wan2.1 14B",
    (FAMILY_WAN, 3072, 30): "Wan2.2 5B",
    (FAMILY_HUNYUAN, 3072, 20): "HunyuanVideo 13B",
}


def size_label(family: str, dims: Mapping) -> str:
    """Human size label, e.g. ``Wan2.1 1.3B (dim 1536, 30 blocks)``."""
    dim, n = dims.get("dim"), dims.get("num_layers")
    base = _KNOWN_SIZES.get((family, dim, n))
    if family == FAMILY_WAN:
        detail = f"dim {dim}, {n} blocks"
        return f"{base} ({detail})" if base else f"Wan2.x-style model ({detail})"
    detail = f"hidden {dim}, {n} double + {dims.get('num_single_layers')} single blocks"
    return f"{base} ({detail})" if base else f"HunyuanVideo-style model ({detail})"


def family_label(family: str | None, unknown: str = "unknown family") -> str:
    """The name users know a family by (``unknown`` for anything else)."""
    return {FAMILY_WAN: "Wan2.x", FAMILY_HUNYUAN: "HunyuanVideo"}.get(family or "", unknown)
