"""The two experts in ComfyUI form: plans from the official file, loaders, compatibility checks.

Pack-native formats (what the converter and the trainer write; stock ComfyUI nodes load them):

* ``NAME_semantic.safetensors``: the semantic expert with bare ComfyUI diffusion-model keys
  (``blocks.0.self_attn.q.weight``, ``head.modulation``...): stock UNETLoader.
* ``NAME_detail_expert.safetensors``: the detail expert *relative to the semantic model* as a
  ComfyUI-native LoRA: ``diffusion_model.<stem>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``
  for the attention LoRAs and ``diffusion_model.<stem>.diff`` / ``.diff_b`` (W_detail − W_semantic,
  computed in fp32 against the semantic weight *as stored*) for the replaced embedder / head layers:
  stock LoraLoaderModelOnly on top of the semantic model.

HunyuanVideo's q/k/v LoRAs are fused exactly into one rank-3r LoRA on the fused ComfyUI weight
(down = [A_q; A_k; A_v], up = block-diagonal [s·B_q, s·B_k, s·B_v] with zero rows for the
single-block mlp part, s = α/r baked in, ``.alpha`` = 3r so ComfyUI's scale is 1).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .. import families as fm
from ..errors import DCMFileNotFoundError, DCMFormatError, DCMIncompatibleModelError, DCMUnsupportedFileError
from ..schedule import DEFAULT_BOUNDARY_TIMESTEP, DEFAULT_PRESET, FAMILY_HUNYUAN, FAMILY_WAN
from . import keymaps as km
from .detect import (
    FORMAT_VERSION,
    KIND_DETAIL,
    KIND_OFFICIAL,
    KIND_SEMANTIC,
    ROLE_SEMANTIC,
    FileInfo,
    OfficialLayout,
    info_from_header,
    meta_json,
    parse_official,
    unsupported_message,
)
from .safetensors_io import Header, SafeReader, read_header

log = logging.getLogger("DCM.formats")

COMFY_PREFIX = "diffusion_model."
#: ComfyUI parameters that are not ``<module>.weight`` / ``.bias`` (a LoRA/diff stem names them directly).
RAW_PARAM_SUFFIXES = (".modulation", ".emb_pos", ".scale")
_PATCH_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha", ".diff_b", ".diff")

#: ComfyUI stems the detail expert's LoRA patches: every attention projection the official PEFT
#: adapter wraps (to_q / to_k / to_v / to_out.0), fused the way ComfyUI fuses them.
LORA_STEM_TEMPLATES: dict[str, tuple[str, ...]] = {
    FAMILY_WAN: tuple(f"blocks.{{n}}.{a}.{x}" for a in ("self_attn", "cross_attn") for x in "qkvo"),
    FAMILY_HUNYUAN: (
        "double_blocks.{n}.img_attn.qkv",
        "double_blocks.{n}.img_attn.proj",
        "single_blocks.{s}.linear1",
        "txt_in.individual_token_refiner.blocks.{r}.self_attn.qkv",
        "txt_in.individual_token_refiner.blocks.{r}.self_attn.proj",
    ),
}
#: ComfyUI key prefixes of the layers the detail expert replaces (the official ``*_lora`` modules):
#: each module's diffs are present completely or not at all.
DIFF_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    FAMILY_WAN: {
        "condition_embedder": ("time_embedding.", "text_embedding.", "time_projection.", "img_emb."),
        "proj_out": ("head.head.",),
    },
    FAMILY_HUNYUAN: {
        "time_text_embed": ("time_in.", "vector_in.", "guidance_in."),
        "norm_out": ("final_layer.adaLN_modulation.",),
        "proj_out": ("final_layer.linear.",),
    },
}


@dataclass
class DetailExpert:
    """The detail expert as ComfyUI-native LoRA patches relative to the semantic model."""

    info: FileInfo
    family: str
    #: native LoRA dict, exactly what a stock LoRA loader reads (``diffusion_model.<stem>.lora_A.weight``...)
    patches: dict[str, torch.Tensor]
    #: ComfyUI model state-dict keys (``diffusion_model.`` prefix) that MUST be patched
    expected_targets: frozenset[str]
    dims: dict = field(default_factory=dict)


@dataclass
class ExpertBundle:
    """Both experts: the semantic state dict (bare ComfyUI keys) and the detail expert patches."""

    info: FileInfo
    family: str
    semantic_sd: dict[str, torch.Tensor]
    detail: DetailExpert
    #: Every file the two experts were read from (one official file, or a semantic + detail pair).
    sources: tuple[str, ...] = ()


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class DetailOp:
    """One tensor of the detail-expert file.

    kind ``down``/``up``: LoRA matrices (``parts`` = (row offset, rows, A key|None, B key|None, scale));
    ``alpha``: scalar ``value``; ``diff``: W_lora − W_sem via ``src``/``base`` and the semantic ``op_kind``.
    """

    out: str
    shape: tuple[int, ...]
    kind: str
    parts: tuple = ()
    value: float = 0.0
    src: str = ""
    base: str = ""
    op_kind: str = "copy"


@dataclass
class ExpertPlan:
    """Everything needed to produce both pack-native files from an official checkpoint."""

    layout: OfficialLayout
    semantic: list[km.Op]
    detail: list[DetailOp]
    dims: dict

    @property
    def family(self) -> str:
        return self.layout.family


def _stem_of(comfy_key: str) -> tuple[str, str]:
    """(stem, param kind) of a bare ComfyUI key: ``weight``/``bias``/``raw``."""
    if comfy_key.endswith(".weight"):
        return comfy_key[: -len(".weight")], "weight"
    if comfy_key.endswith(".bias"):
        return comfy_key[: -len(".bias")], "bias"
    return comfy_key, "raw"


def plan_official(header: Header, layout: OfficialLayout | None = None) -> ExpertPlan:
    """Plan the semantic and detail outputs of an official file (shapes only; nothing is read)."""
    lay = layout or parse_official(header)
    p = header.path
    sem = km.diffusers_to_comfy_plan(lay.family, lay.base_shapes, where=p)
    # plain diffusers key -> (op, row offset, rows) inside that op's output
    where: dict[str, tuple[km.Op, int, int]] = {}
    for op in sem:
        off = 0
        for s in op.sources:
            rows = lay.base_shapes[s][0] if op.kind in ("cat",) else op.shape[0] if op.shape else 0
            where[s] = (op, off, rows)
            if op.kind == "cat":
                off += rows
    sem_file = [km.Op(op.out, op.shape, op.kind, tuple(lay.base[s] for s in op.sources), op.args) for op in sem]

    detail: list[DetailOp] = []
    # --- LoRA modules, grouped by target ComfyUI weight
    groups: dict[str, list[tuple[km.Op, int, int, str, str, int]]] = {}
    for stem, (a_key, b_key, r) in lay.lora.items():
        op, off, rows = where[stem + ".weight"]
        groups.setdefault(op.out, []).append((op, off, rows, a_key, b_key, r))
    scale_of = lambda r: lay.alpha / r  # noqa: E731  (PEFT: scaling = lora_alpha / r per module)
    for out_key in sorted(groups):
        entries = groups[out_key]
        op = entries[0][0]
        cstem, _ = _stem_of(out_key)
        name = COMFY_PREFIX + cstem
        in_dim = op.shape[1]
        if op.kind == "cat":
            total_r = sum(e[5] for e in entries)
            parts = tuple(sorted((off, rows, a, b, scale_of(r)) for _, off, rows, a, b, r in entries))
            detail.append(DetailOp(f"{name}.lora_A.weight", (total_r, in_dim), "down", parts))
            detail.append(DetailOp(f"{name}.lora_B.weight", (op.shape[0], total_r), "up", parts))
            detail.append(DetailOp(f"{name}.alpha", (), "alpha", value=float(total_r)))
        else:
            (_, _, _, a, b, r) = entries[0]
            swap = op.kind == "swap"
            parts = ((0, op.shape[0], a, b, 1.0),)
            detail.append(DetailOp(f"{name}.lora_A.weight", (r, in_dim), "down", parts))
            detail.append(DetailOp(f"{name}.lora_B.weight", (op.shape[0], r), "up", parts, op_kind="swap" if swap else "copy"))
            detail.append(DetailOp(f"{name}.alpha", (), "alpha", value=float(lay.alpha)))
    # --- replaced layers (*_lora modules) as diffs
    diffs: list[DetailOp] = []
    for fkey, bkey in lay.extras.items():
        op, _, _ = where[bkey]
        if op.kind not in ("copy", "swap"):
            raise DCMFormatError(f"{p}: detail-expert tensor {fkey!r} replaces part of a fused layer; unsupported.")
        cstem, kind = _stem_of(op.out)
        suffix = ".diff_b" if kind == "bias" else ".diff"
        diffs.append(DetailOp(COMFY_PREFIX + cstem + suffix, op.shape, "diff", src=fkey, base=lay.base[bkey], op_kind=op.kind))
    detail.extend(sorted(diffs, key=lambda d: d.out))
    for d in diffs:
        if d.out.endswith(".diff") and d.out[: -len(".diff")].endswith(RAW_PARAM_SUFFIXES):
            msg = (
                f"detail expert replaces the raw parameter {d.out[len(COMFY_PREFIX):-len('.diff')]!r}; stock ComfyUI "
                f"does not apply weight patches to parameters of non-leaf modules, so apply it as an object patch"
            )
            log.warning("%s: %s", p, msg)
            lay.notes.append(msg)
    dims = km.dims_from_comfy_shapes(lay.family, {op.out: op.shape for op in sem}, where=p)
    return ExpertPlan(layout=lay, semantic=sem_file, detail=detail, dims=dims)


# --------------------------------------------------------------------------- producing tensors


def semantic_out_dtype(src: torch.dtype, dtype: torch.dtype | None, key: str, ndim: int) -> torch.dtype:
    """Storage dtype of a semantic tensor. fp8 applies to 2-D weight matrices only (rest in bf16)."""
    if dtype is None:
        return src
    if dtype.is_floating_point and dtype.itemsize == 1:
        return dtype if (ndim == 2 and key.endswith(".weight")) else torch.bfloat16
    return dtype


def detail_out_dtype(src: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """Storage dtype of detail-expert tensors (never fp8: LoRA factors and diffs are kept in bf16 then)."""
    if dtype is None:
        return src if src.itemsize > 1 else torch.bfloat16
    if dtype.itemsize == 1:
        return torch.bfloat16
    return dtype


def produce_semantic(
    op: km.Op, get: Callable[[str], torch.Tensor], dtype: torch.dtype | None, *, reader: SafeReader | None = None
) -> torch.Tensor:
    """Materialise one semantic tensor in its storage dtype.

    With ``reader``, a plain copy is read and converted in one pass through the reader's reused scratch buffer
    (:meth:`SafeReader.get` with ``dtype``): no full-size source-dtype tensor is allocated per weight, which for
    an fp32 file loaded as bf16 saves a fresh allocation (page faults + zeroing) of the whole fp32 model. The
    result is bit-identical (``copy_`` rounds as ``.to`` does).
    """
    if reader is not None and op.kind == "copy":
        e = reader.header.entries[op.sources[0]]
        if e.torch_dtype.is_floating_point:
            out = semantic_out_dtype(e.torch_dtype, dtype, op.out, len(e.shape))
            return km.run_op(op, lambda key: reader.get(key, dtype=out))
    t = km.run_op(op, get)
    out = semantic_out_dtype(t.dtype, dtype, op.out, t.ndim)
    return t.to(out) if t.dtype != out else t


def produce_detail(
    op: DetailOp,
    get: Callable[[str], torch.Tensor],
    sem_dtype: torch.dtype | None,
    det_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Materialise one detail-expert tensor (fp32 math, then cast)."""
    if op.kind == "alpha":
        return torch.tensor(op.value, dtype=torch.float32)
    if op.kind == "down":
        mats = [get(a) for _, _, a, _, _ in op.parts]
        src_dt = mats[0].dtype
        t = torch.cat([m.to(torch.float32) for m in mats], dim=0)
    elif op.kind == "up":
        mats = [(off, rows, get(b), s) for off, rows, _, b, s in op.parts]
        src_dt = mats[0][2].dtype
        if len(mats) == 1 and mats[0][3] == 1.0 and op.op_kind == "copy":
            t = mats[0][2].to(torch.float32)
        else:
            t = torch.zeros(op.shape, dtype=torch.float32)
            col = 0
            for off, rows, bm, s in mats:
                r = bm.shape[1]
                t[off : off + rows, col : col + r] = bm.to(torch.float32) * s
                col += r
            if op.op_kind == "swap":
                t = km.swap_halves(t)
    elif op.kind == "diff":
        new, old = get(op.src), get(op.base)
        src_dt = new.dtype
        if op.op_kind == "swap":
            new, old = km.swap_halves(new), km.swap_halves(old)
        sem_dt = semantic_out_dtype(old.dtype, sem_dtype, op.out.replace(".diff_b", ".bias").replace(".diff", ".weight"), old.ndim)
        stored = old.to(sem_dt).to(torch.float32)  # the semantic weight exactly as the semantic file stores it
        t = new.to(torch.float32) - stored
    else:  # pragma: no cover
        raise ValueError(op.kind)
    if tuple(t.shape) != op.shape:
        raise DCMFormatError(f"tensor for {op.out!r} has shape {tuple(t.shape)}, planned {op.shape}; the file is damaged.")
    return t.to(detail_out_dtype(src_dt, det_dtype)).contiguous()


# --------------------------------------------------------------------------- metadata


def native_metadata(
    role: str,
    family: str,
    *,
    dims: Mapping,
    variant: str,
    rank: int | None,
    alpha: float | None,
    partner: str | None,
    boundary_timestep: float | None = None,
    schedule: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``dcm.*`` safetensors metadata written on both pack-native files."""
    meta = {
        "format": "pt",
        "dcm.format_version": str(FORMAT_VERSION),
        "dcm.family": family,
        "dcm.role": role,
        "dcm.boundary_timestep": f"{boundary_timestep if boundary_timestep is not None else DEFAULT_BOUNDARY_TIMESTEP[family]:g}",
        "dcm.schedule": schedule or DEFAULT_PRESET[family],
        "dcm.variant": variant,
        "dcm.dims": meta_json(dict(dims)),
    }
    if rank is not None:
        meta["dcm.lora_rank"] = str(int(rank))
    if alpha is not None:
        meta["dcm.lora_alpha"] = f"{float(alpha):g}"
    if partner:
        meta["dcm.detail_expert" if role == ROLE_SEMANTIC else "dcm.semantic"] = partner
    if extra:
        meta.update({str(k): str(v) for k, v in extra.items()})
    return meta


# --------------------------------------------------------------------------- patches -> targets


def split_patch_key(key: str) -> tuple[str, str]:
    """(stem, suffix) of a native patch key, e.g. ('diffusion_model.blocks.0.self_attn.q', '.lora_A.weight')."""
    for suf in _PATCH_SUFFIXES:
        if key.endswith(suf):
            return key[: -len(suf)], suf
    raise DCMFormatError(f"patch key {key!r} is not a ComfyUI LoRA key (expected .lora_A/.lora_B/.alpha/.diff/.diff_b).")


def target_of(stem: str, suffix: str) -> str:
    """The ComfyUI state-dict key a patch entry modifies."""
    if suffix == ".diff_b":
        return stem + ".bias"
    if suffix == ".diff" and stem.endswith(RAW_PARAM_SUFFIXES):
        return stem
    return stem + ".weight"


def targets_of(patches: Iterable[str]) -> frozenset[str]:
    out = set()
    for k in patches:
        stem, suf = split_patch_key(k)
        if suf != ".alpha":
            out.add(target_of(stem, suf))
    return frozenset(out)


def _diff_key(model_key: str) -> str:
    if model_key.endswith(".weight"):
        return model_key[: -len(".weight")] + ".diff"
    if model_key.endswith(".bias"):
        return model_key[: -len(".bias")] + ".diff_b"
    return model_key + ".diff"


def _check_complete_detail(path: str, stems: Mapping[str, Mapping[str, tuple]], family: str, dims: Mapping) -> None:
    """The detail expert patches every attention projection of its model and copies each replaced
    module completely (a partial file would load as a silently different expert)."""
    counts = km.block_counts(family, dims, where=path)
    if counts is None or family not in LORA_STEM_TEMPLATES:
        return  # no block counts recorded: nothing to compare with
    label = km.size_label(family, dims)
    want = km.expand_templates(LORA_STEM_TEMPLATES[family], counts)
    have = {s[len(COMFY_PREFIX) :] for s, parts in stems.items() if ".lora_A.weight" in parts}
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        raise DCMFormatError(
            f"{path}: the detail expert has no LoRA for {len(missing)} attention layer(s) of its {label}: "
            f"{km.shown_keys(missing)}. The file is incomplete; re-download or re-convert it."
        )
    if extra:
        raise DCMFormatError(
            f"{path}: LoRA for {km.shown_keys(extra)}, which {'is' if len(extra) == 1 else 'are'} not an attention layer of "
            f"a {label}. The file is damaged or its metadata (dcm.dims) was edited."
        )
    model_keys = km.expected_comfy_keys(family, dims, where=path)
    diffs = {s[len(COMFY_PREFIX) :] + suf for s, parts in stems.items() for suf in parts if suf in (".diff", ".diff_b")}
    allowed: set[str] = set()
    for module, prefixes in DIFF_GROUPS[family].items():
        group = {_diff_key(k) for k in model_keys if k.startswith(prefixes)}
        allowed |= group
        present = diffs & group
        if present and present != group:
            lacking = sorted(group - present)
            raise DCMFormatError(
                f"{path}: the detail expert's copy of {module!r} is partial: {km.shown_keys(lacking)} "
                f"{'is' if len(lacking) == 1 else 'are'} missing. The file is incomplete; re-download or re-convert it."
            )
    stray = sorted(diffs - allowed)
    if stray:
        raise DCMFormatError(
            f"{path}: {km.shown_keys(stray)} {'is' if len(stray) == 1 else 'are'} not a layer the DCM detail expert replaces "
            f"in a {label}. The file is damaged or was edited."
        )


def validate_patches(
    path: str, patches: Mapping[str, tuple[int, ...]], family: str | None = None, dims: Mapping | None = None
) -> None:
    """Structural checks of a native detail file: prefixes, complete LoRA pairs, A/B rank agreement and,
    when ``family`` and ``dims`` are given, that every attention layer / replaced module is covered."""
    stems: dict[str, dict[str, tuple[int, ...]]] = {}
    for k, shp in patches.items():
        if not k.startswith(COMFY_PREFIX):
            raise DCMFormatError(f"{path}: key {k!r} does not start with 'diffusion_model.'; the file was edited.")
        try:
            stem, suf = split_patch_key(k)
        except DCMFormatError as e:
            raise DCMFormatError(f"{path}: {e}") from None
        stems.setdefault(stem, {})[suf] = tuple(shp)
    for stem, parts in stems.items():
        has_a, has_b = ".lora_A.weight" in parts, ".lora_B.weight" in parts
        if has_a != has_b:
            raise DCMFormatError(f"{path}: LoRA {stem!r} has only {'lora_A' if has_a else 'lora_B'}; the file is incomplete.")
        if has_a:
            a, b = parts[".lora_A.weight"], parts[".lora_B.weight"]
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise DCMFormatError(
                    f"{path}: LoRA {stem!r} has lora_A {a} and lora_B {b}; their ranks ({a[0] if a else '?'} vs "
                    f"{b[1] if len(b) == 2 else '?'}) must agree. The file is damaged."
                )
        if ".alpha" in parts and parts[".alpha"] not in ((), (1,)):
            raise DCMFormatError(f"{path}: {stem}.alpha must be a scalar, got shape {parts['.alpha']}.")
        if has_a != (".alpha" in parts):
            # every LoRA of a DCM detail file carries its alpha: without it ComfyUI would apply the LoRA at
            # another scale (alpha = rank), and an alpha without a LoRA belongs to nothing
            raise DCMFormatError(
                f"{path}: LoRA {stem!r} has {'no .alpha' if has_a else 'an .alpha but no lora_A / lora_B'}; the file "
                f"is damaged or was edited. Re-download or re-convert it."
            )
    if family and dims:
        _check_complete_detail(path, stems, family, dims)


# --------------------------------------------------------------------------- loading


def _wrong_kind(info: FileInfo, wanted: str) -> DCMUnsupportedFileError:
    return DCMUnsupportedFileError(unsupported_message(info, wanted=wanted))


def _header_and_info(path: str | os.PathLike, header: Header | None, info: FileInfo | None) -> tuple[Header, FileInfo]:
    """``path``'s validated header and what it is, unless the caller has read them already."""
    header = header or read_header(path)
    return header, info or info_from_header(header)


def load_detail_expert(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, header: Header | None = None, info: FileInfo | None = None
) -> DetailExpert:
    """Load a pack-native ``*_detail_expert.safetensors`` file.

    An official combined checkpoint is refused with a pointer to the DCM Checkpoint Loader; an
    unrelated LoRA / base model with a pointer to LoraLoaderModelOnly / UNETLoader.
    """
    header, info = _header_and_info(path, header, info)
    if info.kind != KIND_DETAIL:
        raise _wrong_kind(info, "a DCM detail expert (*_detail_expert.safetensors)")
    validate_patches(header.path, header.shapes, info.family, info.dims)
    det_dt = None if dtype is None else detail_out_dtype(torch.float32, dtype)
    patches: dict[str, torch.Tensor] = {}
    with SafeReader(header.path, header) as r:
        for k in r.keys():
            t = r.get(k)
            if k.endswith(".alpha"):
                t = t.to(torch.float32)
            elif det_dt is not None and t.is_floating_point() and t.dtype != det_dt:
                t = t.to(det_dt)
            patches[k] = t
    return DetailExpert(
        info=info, family=info.family, patches=patches, expected_targets=targets_of(patches), dims=dict(info.dims)
    )


def _find_partner(path: str, name: str, search_dirs: Sequence[str | os.PathLike], what: str) -> str:
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise DCMFormatError(f"{path}: metadata names its {what} {name!r}, which is not a plain file name.")
    dirs = [str(d) for d in search_dirs] + [os.path.dirname(os.path.abspath(path))]
    for d in dirs:
        cand = os.path.join(d, name)
        if os.path.isfile(cand):
            return cand
    looked = "; ".join(dict.fromkeys(dirs))
    raise DCMFileNotFoundError(
        f"{os.path.basename(path)} needs its {what} {name!r}, which was not found (looked in: {looked}). "
        f"Put {name} in ComfyUI/models/loras/ or next to {os.path.basename(path)}; both files come from the "
        f"same `python -m dcm_core convert` run."
    )


def load_semantic(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, header: Header | None = None, info: FileInfo | None = None
) -> tuple[FileInfo, dict[str, torch.Tensor]]:
    """Read a pack-native semantic file (bare ComfyUI keys), optionally cast to ``dtype``."""
    header, info = _header_and_info(path, header, info)
    if info.kind != KIND_SEMANTIC:
        raise _wrong_kind(info, "a DCM semantic expert")
    sd = {}
    with SafeReader(header.path, header) as r:
        for k in r.keys():
            t = r.get(k)
            out = semantic_out_dtype(t.dtype, dtype, k, t.ndim) if t.is_floating_point() else t.dtype
            sd[k] = t.to(out) if t.dtype != out else t
    return info, km.strip_prefix(sd)


def load_official(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, header: Header | None = None, info: FileInfo | None = None
) -> ExpertBundle:
    """Convert an official DCM checkpoint to an :class:`ExpertBundle` in memory (tensor by tensor)."""
    header, info = _header_and_info(path, header, info)
    plan = plan_official(header, info.layout)
    sem: dict[str, torch.Tensor] = {}
    patches: dict[str, torch.Tensor] = {}
    with SafeReader(header.path, header) as r:
        for op in plan.semantic:
            sem[op.out] = produce_semantic(op, r.get, dtype, reader=r)
        for op in plan.detail:
            patches[op.out] = produce_detail(op, r.get, dtype, dtype)
    detail_info = FileInfo(
        path=header.path,
        kind=KIND_DETAIL,
        family=plan.family,
        variant=info.variant,
        dims=plan.dims,
        lora_rank=info.lora_rank,
        lora_alpha=info.lora_alpha,
        alpha_source=info.alpha_source,
        dtype=info.dtype,
        tensor_count=len(patches),
        boundary_timestep=info.boundary_timestep,
        schedule=info.schedule,
        task=info.task,
        base=info.base,
        expert_base=info.expert_base,
        bases=info.bases,
    )
    detail = DetailExpert(
        info=detail_info, family=plan.family, patches=patches, expected_targets=targets_of(patches), dims=plan.dims
    )
    return ExpertBundle(info=info, family=plan.family, semantic_sd=sem, detail=detail, sources=(header.path,))


def load_experts(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    search_dirs: Sequence[str | os.PathLike] = (),
) -> ExpertBundle:
    """Both experts from an official DCM file or a pack-native semantic (or detail) file.

    * official DCM checkpoint: converted in memory;
    * ``*_semantic.safetensors``: its detail expert is found from metadata ``dcm.detail_expert`` in
      ``search_dirs`` or the same folder (clear error naming the missing file otherwise);
    * ``*_detail_expert.safetensors``: its semantic partner is found the same way (``dcm.semantic``);
    * anything else: :class:`DCMUnsupportedFileError` saying what the file is and what to use instead.
    """
    header = read_header(path)
    info = info_from_header(header)
    if info.kind == KIND_OFFICIAL:
        return load_official(path, dtype=dtype, header=header, info=info)
    if info.kind == KIND_SEMANTIC:
        partner = info.metadata.get("dcm.detail_expert")
        if not partner and info.expert_base == fm.HIGH_NOISE:
            raise DCMUnsupportedFileError(
                f"{header.path} is the DCM semantic expert of Wan2.2's high-noise transformer "
                f"({fm.describe_base(info.base) if info.base else 'a Wan2.2 A14B base'}); its detail expert belongs to "
                f"the other transformer. Load this file with Load Diffusion Model (UNETLoader) as semantic_model, the "
                f"stock low-noise model + its DCM detail expert (DCM Expert LoRA Loader) as detail_model, and sample "
                f"with DCM Dual-Expert Sampler (boundary preset {info.boundary_timestep:g})."
            )
        if not partner:
            raise DCMFormatError(
                f"{header.path} is a DCM semantic expert but its metadata does not name a detail expert "
                f"(dcm.detail_expert). Load the detail expert yourself with LoraLoaderModelOnly, or re-run the converter."
            )
        sem_path, det_path = header.path, _find_partner(header.path, partner, search_dirs, "detail expert")
    elif info.kind == KIND_DETAIL:
        partner = info.metadata.get("dcm.semantic")
        if not partner:
            raise DCMFormatError(
                f"{header.path} is a DCM detail expert whose metadata does not name its semantic expert (dcm.semantic). "
                f"Load the *_semantic.safetensors file instead."
            )
        det_path, sem_path = header.path, _find_partner(header.path, partner, search_dirs, "semantic expert")
    else:
        raise _wrong_kind(info, "a DCM checkpoint (official DCM file or *_semantic.safetensors)")
    known = {"header": header, "info": info}  # the file asked for is read once; its partner here
    sem_info, sem = load_semantic(sem_path, dtype=dtype, **(known if sem_path == header.path else {}))
    detail = load_detail_expert(det_path, dtype=dtype, **(known if det_path == header.path else {}))
    if detail.family != sem_info.family:
        raise DCMIncompatibleModelError(
            f"{os.path.basename(det_path)} is a {km.family_label(detail.family)} detail expert but "
            f"{os.path.basename(sem_path)} is a {km.family_label(sem_info.family)} model; use the pair written by one "
            f"convert run."
        )
    check_compatible(
        detail, {COMFY_PREFIX + k: tuple(v.shape) for k, v in sem.items()}, name=os.path.basename(sem_path), model_info=sem_info
    )
    return ExpertBundle(info=sem_info, family=sem_info.family, semantic_sd=sem, detail=detail, sources=(sem_path, det_path))


# --------------------------------------------------------------------------- compatibility


def check_compatible(
    detail: DetailExpert,
    model_shapes: Mapping[str, tuple[int, ...]],
    *,
    name: str = "model",
    model_info: FileInfo | None = None,
) -> None:
    """Raise :class:`DCMIncompatibleModelError` if ``detail`` cannot patch a model with these shapes.

    ``model_shapes`` maps ComfyUI model state-dict keys (``diffusion_model.`` prefix; bare keys are
    accepted too) to shapes. Checks family, task (text / image / text+image-to-video, from the input
    channels), size (dim / depth), missing targets and shapes; with ``model_info`` (what the model's file
    says) also the base and which transformer of a two-transformer base (``dcm.expert_base``) it is.
    """
    shapes = {k: tuple(v) for k, v in model_shapes.items()}
    if shapes and not any(k.startswith(COMFY_PREFIX) for k in shapes):
        shapes = {COMFY_PREFIX + k: v for k, v in shapes.items()}
    bare = {k[len(COMFY_PREFIX) :]: v for k, v in shapes.items() if k.startswith(COMFY_PREFIX)}
    src = os.path.basename(detail.info.path) if detail.info and detail.info.path else "the detail expert"
    fam = km.detect_family_comfy(bare)
    want = km.family_label(detail.family)
    if fam is None:
        raise DCMIncompatibleModelError(
            f"{src} is a {want} detail expert, but {name} is not a Wan2.x or HunyuanVideo diffusion model. "
            f"Connect the DCM semantic model of the same checkpoint."
        )
    if fam != detail.family:
        raise DCMIncompatibleModelError(
            f"{src} is a {want} detail expert but {name} is a {km.family_label(fam)} model. Use the "
            f"{want} semantic model from the same DCM checkpoint (or the {km.family_label(fam)} DCM release)."
        )
    try:
        mdims = km.dims_from_comfy_shapes(fam, bare)
    except DCMFormatError:
        mdims = {}
    ddims = detail.dims or {}
    check_family_fit(detail.info, mdims, model_info, src=src, name=name)
    keys = ("dim", "num_layers") + (("num_single_layers",) if fam == FAMILY_HUNYUAN else ())
    if mdims and ddims and any(k in ddims and ddims.get(k) != mdims.get(k) for k in keys):
        raise DCMIncompatibleModelError(
            f"{src} was made for {km.size_label(fam, ddims)} but {name} is {km.size_label(fam, mdims)}. "
            f"A detail expert only fits the semantic model it was converted/trained with; use matching sizes."
        )
    missing = sorted(t for t in detail.expected_targets if t not in shapes)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise DCMIncompatibleModelError(
            f"{src} patches {len(missing)} layer(s) that {name} does not have: {shown}. The model is a different "
            f"variant ({km.family_label(fam)}{' ' + km.variant_from_dims(fam, mdims) if mdims else ''}) than the expert, "
            f"or it is incomplete."
        )
    # shapes
    stems: dict[str, dict[str, tuple[int, ...]]] = {}
    for k, v in detail.patches.items():
        stem, suf = split_patch_key(k)
        stems.setdefault(stem, {})[suf] = tuple(v.shape)
    bad: list[str] = []
    for stem, parts in stems.items():
        if ".lora_A.weight" in parts and ".lora_B.weight" in parts:
            tgt = target_of(stem, ".lora_A.weight")
            ts = shapes.get(tgt)
            a, b = parts[".lora_A.weight"], parts[".lora_B.weight"]
            if ts is not None and (len(ts) < 2 or (b[0], a[1]) != (ts[0], math.prod(ts[1:]))):
                bad.append(f"{tgt}: model {ts}, LoRA {b[0]}×{a[1]}")
        for suf in (".diff", ".diff_b"):
            if suf in parts:
                tgt = target_of(stem, suf)
                ts = shapes.get(tgt)
                if ts is not None and ts != parts[suf]:
                    bad.append(f"{tgt}: model {ts}, patch {parts[suf]}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DCMIncompatibleModelError(
            f"{src} does not fit {name}: shape mismatch at {shown}. Use the semantic model from the same DCM checkpoint."
        )


def check_family_fit(
    expert: FileInfo | None, model_dims: Mapping, model_info: FileInfo | None, *, src: str, name: str
) -> None:
    """Refuse an expert made for another task / base / transformer than the model's, naming both and the fix.

    * task: an image-to-video expert on a text-to-video model (or TI2V-5B on either) — from the experts'
      recorded dims / ``dcm.task`` against the model's input channels;
    * base: both files say ``dcm.base`` and they differ;
    * two-transformer bases: a ``low_noise`` detail expert (it applies onto Wan2.2's stock low-noise model) on a
      model whose file says it is the ``high_noise`` one, and the reverse.
    """
    if expert is None:
        return
    m_task = fm.task_from_dims(expert.family, model_dims) if model_dims else None
    if model_info is not None and model_info.task:
        m_task = m_task or model_info.task
    e_task = expert.task
    if e_task and m_task and e_task != m_task:
        fix = {
            fm.TASK_I2V: "Load the image-to-video base it was made for (Wan2.1 I2V 14B / Wan2.2 I2V A14B, 36 input "
            "channels) and feed it WanImageToVideo's conditioning",
            fm.TASK_T2V: "Load the text-to-video base it was made for (16 input channels)",
            fm.TASK_TI2V: "Load Wan2.2 TI2V 5B (48 channels, the Wan2.2 VAE) and make the latent with Wan22ImageToVideoLatent",
        }[e_task]
        raise DCMIncompatibleModelError(
            f"{src} is a {e_task} DCM expert ({fm.describe_base(expert.base) if expert.base else e_task}) but {name} "
            f"is a {m_task} model ({model_dims.get('in_dim', '?')} input channels, {model_dims.get('out_dim', '?')} "
            f"latent channels). {fix}, or use the expert made for this model."
        )
    if model_info is None:
        return
    if expert.base and model_info.base and expert.base != model_info.base:
        raise DCMIncompatibleModelError(
            f"{src} was made for {fm.describe_base(expert.base)} but {name} is {fm.describe_base(model_info.base)}. "
            f"Use the base model the expert was trained from."
        )
    e_side, m_side = expert.expert_base, model_info.expert_base
    if e_side and m_side and e_side != m_side:
        if e_side == fm.LOW_NOISE:
            how = (
                f"{src} is the detail expert of the Wan2.2 low-noise transformer; it applies onto the stock low-noise "
                f"model (UNETLoader → DCM Expert LoRA Loader → detail_model), not onto {name}, which is the "
                f"high-noise model (connect that one as semantic_model)."
            )
        else:
            how = (
                f"{src} belongs to the Wan2.2 high-noise transformer but {name} is the low-noise model. Connect the "
                f"high-noise model as semantic_model and the low-noise model as detail_model."
            )
        raise DCMIncompatibleModelError(how)


def default_name(path: str | os.PathLike) -> str:
    """Output base name for a converted file: the file stem, or the release folder name for
    ``.../DCM_WAN/transformer/diffusion_pytorch_model.safetensors`` (-> ``DCM_WAN``)."""
    p = Path(path)
    stem = p.stem
    if stem.startswith("diffusion_pytorch_model"):
        parent = p.parent
        if parent.name == "transformer" and parent.parent.name:
            return parent.parent.name
        if parent.name:
            return parent.name
    return stem


__all__ = [
    "DetailExpert",
    "ExpertBundle",
    "ExpertPlan",
    "check_compatible",
    "load_detail_expert",
    "load_experts",
    "load_official",
    "load_semantic",
    "native_metadata",
    "plan_official",
    "targets_of",
]
