"""What is this file? Classification of safetensors files and the official DCM layout parser.

:func:`inspect_file` reads only the (validated) header and returns a :class:`FileInfo`. It never
raises for a readable file of the wrong kind: ``kind`` says what it is. It raises
:class:`DCMFileNotFoundError` for a missing file and :class:`DCMFormatError` for a damaged one
(including an official DCM file whose LoRA A/B ranks disagree).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .. import families as fm
from ..errors import DCMFormatError, DCMUnsupportedFileError
from ..modeling import DEFAULT_LORA_ALPHA, DEFAULT_LORA_RANK, EXPERT_MODULES
from ..schedule import DEFAULT_BOUNDARY_TIMESTEP, DEFAULT_PRESET, FAMILY_HUNYUAN, FAMILY_WAN, PRESET_PER_EXPERT_UNIFORM
from . import keymaps as km
from .safetensors_io import FLOAT_ST_DTYPES, Header, read_header

log = logging.getLogger("DCM.formats")

#: Version of the pack-native file format written by this code (metadata ``dcm.format_version``).
FORMAT_VERSION = 1

KIND_OFFICIAL = "official_dcm"
KIND_SEMANTIC = "dcm_semantic"
KIND_DETAIL = "dcm_detail_expert"
KIND_BASE = "base_model"
KIND_LORA = "lora"
KIND_UNKNOWN = "unknown"
KINDS = (KIND_OFFICIAL, KIND_SEMANTIC, KIND_DETAIL, KIND_BASE, KIND_LORA, KIND_UNKNOWN)

ROLE_SEMANTIC = "semantic"
ROLE_DETAIL = "detail_expert"

ALPHA_DEFAULT_SOURCE = "dcm-recipe-default"

#: Metadata keys that may carry the LoRA alpha of an official / PEFT file, in priority order.
ALPHA_METADATA_KEYS = ("dcm.lora_alpha", "lora_alpha", "alpha", "ss_network_alpha")

_ST_TO_NAME = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}

_PEFT_LORA_RX = re.compile(r"^(?P<stem>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
_LORA_HINTS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_up.",
    ".lora_down.",
    "lora_A.weight",
    "lora_B.weight",
    ".lora.up.",
    ".lora.down.",
    ".hada_w",
    ".lokr_w",
    ".oft_",
    ".lora_linear_layer.",
    "lora_unet_",
    "lora_te_",
)
_LORA_SUFFIXES = (".alpha", ".diff", ".diff_b", ".set_weight", ".dora_scale", ".lora_A", ".lora_B")


@dataclass(frozen=True)
class FileInfo:
    """What a safetensors file is (see :func:`inspect_file`)."""

    path: str
    kind: str
    family: str | None = None
    variant: str | None = None
    dims: dict = field(default_factory=dict)
    lora_rank: int | None = None
    lora_alpha: float | None = None
    alpha_source: str | None = None
    dtype: str = "unknown"
    tensor_count: int = 0
    boundary_timestep: float | None = None
    schedule: str | None = None
    metadata: dict = field(default_factory=dict)
    #: Extra human notes (how to use the file, warnings).
    notes: tuple[str, ...] = ()
    #: Official files: the parsed :class:`OfficialLayout`, so loading / converting need not parse again.
    layout: "OfficialLayout | None" = field(default=None, repr=False, compare=False)
    #: ``t2v`` / ``i2v`` / ``ti2v`` (metadata ``dcm.task``, else from the tensor shapes); None if unknown.
    task: str | None = None
    #: A key of :data:`dcm_core.families.BASES` (metadata ``dcm.base``, else the one base the shapes fit).
    base: str | None = None
    #: ``high_noise`` / ``low_noise`` for an expert of a two-transformer base (metadata ``dcm.expert_base``).
    expert_base: str | None = None
    #: Every base the tensor shapes fit (more than one when only metadata can tell, e.g. Wan2.1 14B vs A14B).
    bases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def size_label(self) -> str:
        if self.family and self.dims:
            return km.size_label(self.family, self.dims)
        return "unknown size"

    def describe(self) -> str:
        """Multi-line human description (what ``python -m dcm_core inspect`` prints)."""
        kinds = {
            KIND_OFFICIAL: "official DCM checkpoint (both experts in one diffusers-layout file)",
            KIND_SEMANTIC: "DCM semantic expert (ComfyUI diffusion model)",
            KIND_DETAIL: "DCM detail expert (ComfyUI LoRA relative to the semantic expert)",
            KIND_BASE: "plain diffusion model (no DCM experts)",
            KIND_LORA: "LoRA / patch file (not a DCM expert)",
            KIND_UNKNOWN: "unrecognised safetensors file",
        }
        lines = [f"file:       {self.path}", f"kind:       {self.kind} — {kinds.get(self.kind, '')}"]
        lines.append(f"family:     {km.family_label(self.family)}" + (f" ({self.variant})" if self.variant else ""))
        role = {KIND_SEMANTIC: ROLE_SEMANTIC, KIND_DETAIL: ROLE_DETAIL, KIND_OFFICIAL: "semantic + detail_expert"}.get(self.kind)
        if role:
            lines.append(f"role:       {role}")
        if self.task:
            lines.append(f"task:       {self.task} — {TASK_LABELS.get(self.task, self.task)}")
        if self.base:
            lines.append(f"base:       {fm.describe_base(self.base)}")
        elif len(self.bases) > 1:
            lines.append("base:       one of " + ", ".join(self.bases) + " (the shapes fit each; metadata dcm.base would tell)")
        if self.expert_base:
            lines.append(f"expert of:  {self.expert_base} — {EXPERT_BASE_LABELS.get(self.expert_base, '')}")
        if self.dims:
            lines.append(f"size:       {self.size_label}")
            lines.append("dims:       " + ", ".join(f"{k}={v}" for k, v in self.dims.items()))
        if self.lora_rank is not None:
            lines.append(f"lora rank:  {self.lora_rank}")
        if self.lora_alpha is not None:
            scale = f", scale α/r = {self.lora_alpha / self.lora_rank:g}" if self.lora_rank else ""
            lines.append(f"lora alpha: {self.lora_alpha:g} (source: {self.alpha_source}){scale}")
        lines.append(f"dtype:      {self.dtype}")
        lines.append(f"tensors:    {self.tensor_count}")
        if self.boundary_timestep is not None:
            lines.append(
                f"boundary:   {self.boundary_timestep:g} (steps with floor(1000·σ) ≤ boundary use the detail expert)"
            )
        if self.schedule:
            lines.append(f"preset:     {self.schedule}")
        partner = self.metadata.get("dcm.detail_expert") or self.metadata.get("dcm.semantic")
        if partner:
            lines.append(f"partner:    {partner}")
        for n in self.notes:
            lines.append(f"note:       {n}")
        return "\n".join(lines)


TASK_LABELS = {
    fm.TASK_T2V: "text-to-video",
    fm.TASK_I2V: "image-to-video (mask + first-frame latent concatenated on the channel axis)",
    fm.TASK_TI2V: "text+image-to-video (Wan2.2 5B: clean first latent frame, 48-channel Wan2.2 VAE)",
}
EXPERT_BASE_LABELS = {
    fm.HIGH_NOISE: "the Wan2.2 A14B high-noise transformer (transformer/): use it as semantic_model",
    fm.LOW_NOISE: "the Wan2.2 A14B low-noise transformer (transformer_2/): apply it onto the stock low-noise model "
    "and use that as detail_model",
}


# --------------------------------------------------------------------------- helpers


def dtype_summary(header: Header) -> str:
    """Dominant float dtype by bytes, e.g. ``bf16`` or ``bf16 (mixed: bf16 97%, fp32 3%)``."""
    by = Counter()
    for e in header.entries.values():
        if e.dtype in FLOAT_ST_DTYPES:
            by[_ST_TO_NAME.get(e.dtype, e.dtype)] += e.nbytes
    if not by:
        return "none" if not header.entries else "non-float"
    total = sum(by.values()) or 1
    top = by.most_common()
    if len(top) == 1 or top[0][1] / total > 0.999:
        return top[0][0]
    mix = ", ".join(f"{n} {100 * b / total:.0f}%" for n, b in top)
    return f"{top[0][0]} (mixed: {mix})"


def _strip_common(keys: list[str], prefixes: tuple[str, ...]) -> str:
    for pre in prefixes:
        if keys and all(k.startswith(pre) for k in keys):
            return pre
    return ""


def is_lora_key(k: str) -> bool:
    return any(h in k for h in _LORA_HINTS) or k.endswith(_LORA_SUFFIXES)


# --------------------------------------------------------------------------- official layout


@dataclass
class OfficialLayout:
    """Parsed key structure of an official DCM (diffusers + PEFT) checkpoint."""

    path: str
    family: str
    prefix: str
    adapter: str
    #: plain diffusers key -> key in the file (``.base_layer`` removed, prefix removed)
    base: dict[str, str]
    #: plain diffusers shapes (of ``base``)
    base_shapes: dict[str, tuple[int, ...]]
    #: LoRA module stem (plain diffusers, e.g. ``blocks.0.attn1.to_q``) -> (A key, B key, rank)
    lora: dict[str, tuple[str, str, int]]
    #: file key of a ``*_lora`` tensor -> the plain diffusers key it replaces
    extras: dict[str, str]
    rank: int
    alpha: float
    alpha_source: str
    notes: list[str] = field(default_factory=list)


def _alpha_from_metadata(meta: Mapping[str, str]) -> tuple[float, str] | None:
    for k in ALPHA_METADATA_KEYS:
        if k in meta:
            try:
                return float(meta[k]), f"metadata:{k}"
            except ValueError:
                continue
    blob = meta.get("lora_adapter_metadata")  # diffusers >= 0.35 writes the LoraConfig here
    if blob:
        try:
            cfg = json.loads(blob)
            if isinstance(cfg, dict) and "lora_alpha" in cfg:
                return float(cfg["lora_alpha"]), "metadata:lora_adapter_metadata"
        except (ValueError, TypeError):
            pass
    return None


def _alpha_from_adapter_config(path: str) -> tuple[float, str] | None:
    cfg = Path(path).with_name("adapter_config.json")
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
        return float(data["lora_alpha"]), "adapter_config.json"
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: ignoring unreadable adapter_config.json (%s)", cfg, e)
        return None


def resolve_alpha(path: str, meta: Mapping[str, str], rank: int) -> tuple[float, str]:
    """LoRA alpha of an official/PEFT file: metadata -> adapter_config.json beside it -> DCM recipe 256."""
    found = _alpha_from_metadata(meta) or _alpha_from_adapter_config(path)
    if found:
        return found
    log.info(
        "%s: no LoRA alpha in the metadata or an adapter_config.json beside it; using the DCM recipe alpha %g "
        "(rank %d, scale %g).",
        path,
        DEFAULT_LORA_ALPHA,
        rank,
        DEFAULT_LORA_ALPHA / max(rank, 1),
    )
    if rank != DEFAULT_LORA_RANK:
        log.warning(
            "%s: LoRA rank is %d, not the recipe's %d, yet no alpha is recorded; assuming alpha %g. Put an "
            "adapter_config.json with 'lora_alpha' beside the file if that is wrong.",
            path,
            rank,
            DEFAULT_LORA_RANK,
            DEFAULT_LORA_ALPHA,
        )
    return DEFAULT_LORA_ALPHA, ALPHA_DEFAULT_SOURCE


def require_float(header: Header, what: str) -> None:
    """Every tensor of a model / expert file must be a float tensor: an integer or bool weight means a
    damaged or edited header (it would otherwise be cast to garbage weights without a word)."""
    bad = [(k, e.dtype) for k, e in header.entries.items() if e.dtype not in FLOAT_ST_DTYPES]
    if bad:
        shown = ", ".join(f"{k!r} ({dt})" for k, dt in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise DCMFormatError(
            f"{header.path}: {what} must hold float tensors only, but {shown} "
            f"{'is' if len(bad) == 1 else 'are'} not float. The file is damaged or its header was edited; "
            f"re-download or re-convert it."
        )


def looks_official(keys: list[str]) -> bool:
    has_base = any(".base_layer." in k for k in keys)
    has_lora = any(_PEFT_LORA_RX.match(k) for k in keys)
    return has_base and has_lora


def parse_official(header: Header) -> OfficialLayout:
    """Parse and validate the official DCM layout (raises DCMFormatError on inconsistencies)."""
    p = header.path
    require_float(header, "an official DCM checkpoint")
    keys = list(header.entries)
    prefix = _strip_common(keys, ("transformer.",))
    shapes = {k[len(prefix) :]: header.entries[k].shape for k in keys}
    fkey = {k[len(prefix) :]: k for k in keys}
    plain = [k for k in shapes if ".lora_" not in k]
    family = km.detect_family_diffusers([k.replace(".base_layer", "") for k in plain])
    if family is None:
        raise DCMUnsupportedFileError(
            f"{p} has PEFT LoRA wrappers but is not a diffusers Wan or HunyuanVideo transformer; DCM cannot use it."
        )
    extra_map = {f"{extra}.": f"{base}." for base, extra in EXPERT_MODULES[family].items()}
    base: dict[str, str] = {}
    lora_parts: dict[str, dict[str, str]] = {}
    adapters: set[str] = set()
    extras: dict[str, str] = {}
    for k, shp in shapes.items():
        m = _PEFT_LORA_RX.match(k)
        if m:
            adapters.add(m.group("adapter"))
            lora_parts.setdefault(m.group("stem"), {})[m.group("ab")] = fkey[k]
            continue
        if ".lora_" in k or "lora_magnitude_vector" in k:
            raise DCMUnsupportedFileError(
                f"{p}: tensor {k!r} is a PEFT feature DCM does not support (DoRA / embedding LoRA / multi-adapter). "
                f"Only plain LoRA on linear layers is supported."
            )
        for xp, bp in extra_map.items():
            if k.startswith(xp):
                extras[fkey[k]] = bp + k[len(xp) :]
                break
        else:
            nk = k.replace(".base_layer.", ".")
            if nk in base:
                raise DCMFormatError(
                    f"{p}: both {base[nk]!r} and {fkey[k]!r} hold the weight {nk!r}; the file mixes a PEFT-wrapped "
                    f"and a plain copy of one layer. Re-export it from the model."
                )
            base[nk] = fkey[k]
    wrapped = sorted(k[: -len(".base_layer.weight")] for k in shapes if k.endswith(".base_layer.weight"))
    unpaired = [w for w in wrapped if w not in lora_parts]
    if unpaired and lora_parts:
        raise DCMFormatError(
            f"{p}: {len(unpaired)} PEFT-wrapped layer(s) have no LoRA tensors: "
            + ", ".join(repr(w) for w in unpaired[:6])
            + (f" and {len(unpaired) - 6} more" if len(unpaired) > 6 else "")
            + ". The file is incomplete; re-download it."
        )
    for bmod, xmod in EXPERT_MODULES[family].items():
        copied = {bk for bk in extras.values() if bk.startswith(bmod + ".")}
        if copied:
            lacking = sorted(k for k in base if k.startswith(bmod + ".") and k not in copied)
            if lacking:
                raise DCMFormatError(
                    f"{p}: the detail expert's copy of {bmod!r} ({xmod!r}) lacks "
                    + ", ".join(repr(xmod + k[len(bmod) :]) for k in lacking[:6])
                    + (f" and {len(lacking) - 6} more" if len(lacking) > 6 else "")
                    + ". The file is incomplete; re-download it."
                )
    if len(adapters) != 1:
        raise DCMFormatError(
            f"{p}: expected one PEFT adapter (the official file uses 'lora1'), found {sorted(adapters)}. "
            f"Merge or remove the extra adapters."
        )
    base_shapes = {k: header.entries[v].shape for k, v in base.items()}
    lora: dict[str, tuple[str, str, int]] = {}
    for stem, parts in sorted(lora_parts.items()):
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise DCMFormatError(f"{p}: LoRA module {stem!r} has no {missing} tensor; the file is incomplete.")
        a, b = header.entries[parts["A"]].shape, header.entries[parts["B"]].shape
        if len(a) != 2 or len(b) != 2:
            raise DCMFormatError(f"{p}: LoRA module {stem!r} has non-matrix A {a} / B {b}.")
        if a[0] != b[1]:
            raise DCMFormatError(
                f"{p}: LoRA module {stem!r} has rank {a[0]} in lora_A {a} but rank {b[1]} in lora_B {b}. "
                f"The A/B ranks must agree; the file is damaged or was edited."
            )
        w = base_shapes.get(stem + ".weight")
        if w is None:
            raise DCMFormatError(f"{p}: LoRA module {stem!r} has no base weight '{stem}.base_layer.weight'.")
        if tuple(w) != (b[0], a[1]):
            raise DCMFormatError(
                f"{p}: LoRA module {stem!r}: B·A is {b[0]}×{a[1]} but the base weight is {tuple(w)}; the file is damaged."
            )
        lora[stem] = (parts["A"], parts["B"], a[0])
    for fk, bk in extras.items():
        if bk not in base_shapes:
            raise DCMFormatError(f"{p}: detail-expert tensor {fk!r} has no base counterpart {bk!r}.")
        if tuple(base_shapes[bk]) != tuple(header.entries[fk].shape):
            raise DCMFormatError(
                f"{p}: detail-expert tensor {fk!r} {header.entries[fk].shape} does not match {bk!r} {base_shapes[bk]}."
            )
    notes: list[str] = []
    present = {bk.split(".", 1)[0] for bk in extras.values()}
    expected = {b for b, x in EXPERT_MODULES[family].items() if not (family == FAMILY_WAN and b == "norm_out")}
    if expected - present:
        notes.append(
            "no detail-expert copy of " + ", ".join(sorted(expected - present)) + " (the detail expert shares them)"
        )
    ranks = Counter(r for _, _, r in lora.values())
    rank = ranks.most_common(1)[0][0]
    if len(ranks) > 1:
        notes.append(f"LoRA ranks differ between modules: {dict(ranks)}")
    alpha, source = resolve_alpha(p, header.metadata, rank)
    return OfficialLayout(
        path=p,
        family=family,
        prefix=prefix,
        adapter=adapters.pop(),
        base=base,
        base_shapes={k: tuple(v) for k, v in base_shapes.items()},
        lora=lora,
        extras=extras,
        rank=rank,
        alpha=alpha,
        alpha_source=source,
        notes=notes,
    )


# --------------------------------------------------------------------------- families (task / base / expert base)


def family_fields(path: str, family: str | None, dims: Mapping, meta: Mapping[str, str]) -> dict:
    """``task`` / ``base`` / ``expert_base`` / ``bases`` of a file from its ``dcm.task`` / ``dcm.base`` /
    ``dcm.expert_base`` metadata, checked against what the tensor shapes (``dims``) say; from the shapes alone
    when the metadata is absent. A contradiction is a :class:`DCMFormatError` naming both sides."""
    shape_task = fm.task_from_dims(family, dims) if dims else None
    bases = fm.bases_for(family, dims) if dims and "in_dim" in dims else ()
    task = meta.get(fm.META_TASK)
    if task is not None and task not in fm.TASKS:
        raise DCMFormatError(
            f"{path}: metadata {fm.META_TASK}={task!r} is not one of {', '.join(fm.TASKS)}; the file was edited."
        )
    if task and shape_task and task != shape_task:
        raise DCMFormatError(
            f"{path}: metadata says a {task} model but the tensors are {shape_task} (input channels "
            f"{dims.get('in_dim')}, output channels {dims.get('out_dim')}). The file is mislabelled; re-export it."
        )
    base_id = meta.get(fm.META_BASE)
    if base_id is not None:
        base = fm.BASES.get(base_id)
        if base is None:
            raise DCMUnsupportedFileError(
                f"{path} was made for the base {base_id!r}, which this DCM pack does not know (it knows "
                f"{', '.join(fm.BASES)}). Update the DCM custom nodes."
            )
        if family and base.family != family:
            raise DCMFormatError(
                f"{path}: metadata {fm.META_BASE}={base_id!r} is a {km.family_label(base.family)} base but the file "
                f"is a {km.family_label(family)} model; the file was edited."
            )
        if (task or shape_task) and base.task != (task or shape_task):
            raise DCMFormatError(
                f"{path}: metadata {fm.META_BASE}={base_id!r} is a {base.task} base but the file is a "
                f"{task or shape_task} model; the file is mislabelled. Re-export it."
            )
        if bases and base_id not in bases:
            raise DCMFormatError(
                f"{path}: metadata {fm.META_BASE}={base_id!r} ({base.label}: {base.in_channels} input channels"
                f"{', image embedder' if base.image_embedder else ''}) does not match the tensors "
                f"({dims.get('in_dim')} input channels{', image embedder' if dims.get('image_dim') else ''}); "
                f"the file is mislabelled. Re-export it."
            )
    elif len(bases) == 1:
        base_id = bases[0]
    expert_base = meta.get(fm.META_EXPERT_BASE)
    if expert_base is not None:
        if expert_base not in fm.EXPERT_BASES:
            raise DCMFormatError(
                f"{path}: metadata {fm.META_EXPERT_BASE}={expert_base!r} is not one of "
                f"{', '.join(fm.EXPERT_BASES)}; the file was edited."
            )
        b = fm.BASES.get(base_id or "")
        if b is not None and not b.two_transformers:
            raise DCMFormatError(
                f"{path}: metadata {fm.META_EXPERT_BASE}={expert_base!r}, but {b.label} has one transformer; "
                f"the file was edited."
            )
    if task is None:
        task = shape_task or (fm.BASES[base_id].task if base_id in fm.BASES else None)
    return dict(task=task, base=base_id, expert_base=expert_base, bases=bases)


def default_boundary(family: str, base_id: str | None) -> float:
    """A file's boundary when its metadata gives none: the two-transformer base's own switch, else DCM's."""
    b = fm.BASES.get(base_id or "")
    if b is not None and b.boundary_timestep is not None:
        return b.boundary_timestep
    return DEFAULT_BOUNDARY_TIMESTEP[family]


def default_schedule(family: str, base_id: str | None) -> str:
    """A file's preset when its metadata gives none: per-expert-uniform on a two-transformer base (the official
    Wan2.1 list would give the low-noise model one step of six at 875), else the family's official list."""
    b = fm.BASES.get(base_id or "")
    if b is not None and b.two_transformers:
        return PRESET_PER_EXPERT_UNIFORM
    return DEFAULT_PRESET[family]


# --------------------------------------------------------------------------- pack-native metadata


def _meta_float(path: str, meta: Mapping[str, str], key: str) -> float | None:
    if key not in meta:
        return None
    try:
        return float(meta[key])
    except ValueError:
        raise DCMFormatError(f"{path}: metadata {key}={meta[key]!r} is not a number; the file was edited.") from None


def _native_info(header: Header) -> FileInfo:
    p, meta = header.path, header.metadata
    role = meta.get("dcm.role")
    try:
        version = int(meta.get("dcm.format_version", "1"))
    except ValueError:
        raise DCMFormatError(f"{p}: metadata dcm.format_version={meta['dcm.format_version']!r} is not an integer.") from None
    if version > FORMAT_VERSION:
        raise DCMUnsupportedFileError(
            f"{p} was written by a newer DCM pack (format version {version}; this pack reads up to "
            f"{FORMAT_VERSION}). Update the DCM custom nodes."
        )
    family = meta.get("dcm.family")
    if family not in (FAMILY_WAN, FAMILY_HUNYUAN):
        raise DCMFormatError(f"{p}: metadata dcm.family={family!r} is not 'wan' or 'hunyuan_video'; the file was edited.")
    try:
        dims = json.loads(meta.get("dcm.dims", "{}"))
        if not isinstance(dims, dict):
            raise ValueError
    except ValueError:
        raise DCMFormatError(f"{p}: metadata dcm.dims is not a JSON object; the file was edited.") from None
    rank = _meta_float(p, meta, "dcm.lora_rank")
    kind = KIND_SEMANTIC if role == ROLE_SEMANTIC else KIND_DETAIL
    require_float(header, "a DCM semantic expert" if kind == KIND_SEMANTIC else "a DCM detail expert")
    if kind == KIND_SEMANTIC:
        bare = km.strip_prefix(header.shapes)
        actual = km.detect_family_comfy(bare)
        if actual != family:
            raise DCMFormatError(
                f"{p}: metadata says a {km.family_label(family)} semantic expert, but the tensors are "
                f"{'a ' + km.family_label(actual) + ' model' if actual else 'not a ComfyUI diffusion model'}. "
                f"The file was edited or mislabelled; re-run the converter."
            )
        actual_dims = km.check_complete(family, bare, where=p)
        lie = [k for k in ("dim", "num_layers", "num_single_layers", "num_refiner_layers") if k in dims and dims[k] != actual_dims.get(k)]
        if lie:
            raise DCMFormatError(
                f"{p}: metadata dcm.dims says {', '.join(f'{k}={dims[k]}' for k in lie)} but the tensors are "
                f"{km.size_label(family, actual_dims)}. The file is incomplete or was edited; re-run the converter."
            )
        if not dims:
            dims = actual_dims
        # the shapes are the truth for a full model (metadata dims may predate in_dim / out_dim)
        dims = {**dims, **{k: actual_dims[k] for k in ("in_dim", "out_dim", "image_dim") if k in actual_dims}}
        if "image_dim" not in actual_dims:
            dims.pop("image_dim", None)
    else:
        _check_detail_task(p, family, dims, header)
    fam_fields = family_fields(p, family, dims, meta)
    return FileInfo(
        path=p,
        kind=kind,
        family=family,
        variant=meta.get("dcm.variant") or km.variant_from_dims(family, dims),
        dims=dims,
        lora_rank=int(rank) if rank is not None else None,
        lora_alpha=_meta_float(p, meta, "dcm.lora_alpha"),
        alpha_source="metadata:dcm.lora_alpha" if "dcm.lora_alpha" in meta else None,
        dtype=dtype_summary(header),
        tensor_count=len(header.entries),
        boundary_timestep=_meta_float(p, meta, "dcm.boundary_timestep") or default_boundary(family, fam_fields["base"]),
        schedule=meta.get("dcm.schedule") or default_schedule(family, fam_fields["base"]),
        metadata=dict(meta),
        **fam_fields,
    )


def _check_detail_task(path: str, family: str, dims: Mapping, header: Header) -> None:
    """A Wan detail file replaces the whole condition embedder: it carries ``img_emb`` diffs exactly when its
    model has an image embedder. Metadata dims that disagree with the tensors mean an edited file."""
    if family != FAMILY_WAN or not dims:
        return
    has_img = any(k.startswith("diffusion_model.img_emb.") for k in header.entries)
    replaces_embedder = any(k.startswith("diffusion_model.text_embedding.") for k in header.entries)
    if replaces_embedder and has_img != bool(dims.get("image_dim")):
        raise DCMFormatError(
            f"{path}: metadata dcm.dims says the model {'has' if dims.get('image_dim') else 'has no'} image embedder, "
            f"but the file {'patches' if has_img else 'does not patch'} img_emb. The file was edited; re-convert it."
        )


# --------------------------------------------------------------------------- inspect


def _guess_lora_family(keys: list[str]) -> str | None:
    joined = " ".join(keys[:2000])
    if re.search(r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|img_attn|txt_in)", joined):
        return FAMILY_HUNYUAN
    if re.search(r"blocks[._]\d+[._](self_attn|cross_attn|attn1|attn2|ffn)", joined):
        return FAMILY_WAN
    return None


def info_from_header(header: Header) -> FileInfo:
    """Classify a file from its validated header (see :func:`inspect_file`)."""
    p, meta = header.path, header.metadata
    keys = list(header.entries)
    common = dict(path=p, dtype=dtype_summary(header), tensor_count=len(keys), metadata=dict(meta))
    if meta.get("dcm.role") in (ROLE_SEMANTIC, ROLE_DETAIL):
        return _native_info(header)
    if looks_official(keys):
        lay = parse_official(header)
        comfy_shapes = {op.out: op.shape for op in km.diffusers_to_comfy_plan(lay.family, lay.base_shapes, where=p)}
        dims = km.check_complete(lay.family, comfy_shapes, where=p)
        fam_fields = family_fields(p, lay.family, dims, meta)
        return FileInfo(
            kind=KIND_OFFICIAL,
            family=lay.family,
            variant=km.variant_from_dims(lay.family, dims),
            dims=dims,
            lora_rank=lay.rank,
            lora_alpha=lay.alpha,
            alpha_source=lay.alpha_source,
            boundary_timestep=_meta_float(p, meta, "dcm.boundary_timestep") or default_boundary(lay.family, fam_fields["base"]),
            schedule=meta.get("dcm.schedule") or default_schedule(lay.family, fam_fields["base"]),
            **fam_fields,
            notes=tuple(lay.notes)
            + ("convert it with `python -m dcm_core convert FILE --out-dir DIR`, or load it with the DCM Checkpoint Loader node",),
            layout=lay,
            **common,
        )
    if any(is_lora_key(k) for k in keys):
        fam = _guess_lora_family(keys)
        return FileInfo(
            kind=KIND_LORA,
            family=fam,
            notes=("load it with the stock LoraLoaderModelOnly node; it is not a DCM detail expert",),
            **common,
        )
    pre = _strip_common(keys, ("model.diffusion_model.", "diffusion_model.", "transformer.", "model."))
    bare = {k[len(pre) :]: header.entries[k].shape for k in keys}
    fam = km.detect_family_comfy(bare)
    dims: dict = {}
    if fam is not None:
        try:
            dims = km.dims_from_comfy_shapes(fam, bare)
        except DCMFormatError:
            dims = {}
    else:
        fam = km.detect_family_diffusers(bare)
        if fam is not None:
            try:
                plan = km.diffusers_to_comfy_plan(fam, bare, where=p)
                dims = km.dims_from_comfy_shapes(fam, {op.out: op.shape for op in plan})
            except DCMFormatError:
                dims = {}
    if fam is not None:
        bases = fm.bases_for(fam, dims) if dims else ()
        return FileInfo(
            kind=KIND_BASE,
            family=fam,
            variant=km.variant_from_dims(fam, dims) if dims else None,
            dims=dims,
            task=fm.task_from_dims(fam, dims) if dims else None,
            base=bases[0] if len(bases) == 1 else None,
            bases=bases,
            notes=(f"a plain {km.family_label(fam)} model: load it with the stock Load Diffusion Model (UNETLoader) node",),
            **common,
        )
    return FileInfo(kind=KIND_UNKNOWN, **common)


def inspect_file(path: str | os.PathLike) -> FileInfo:
    """Say what a safetensors file is, from its header only (cheap; no tensor is read).

    Never raises for a readable file of the wrong kind (``kind`` tells). Raises
    :class:`~dcm_core.errors.DCMFileNotFoundError` for a missing file and
    :class:`~dcm_core.errors.DCMFormatError` for a damaged, non-safetensors or inconsistent one.
    """
    return info_from_header(read_header(path))


def unsupported_message(info: FileInfo, *, wanted: str) -> str:
    """Explain what a wrong-kind file is and which node/command to use instead."""
    fam = km.family_label(info.family)
    if info.kind == KIND_BASE:
        return (
            f"{info.path} is a plain {fam} model without DCM experts, not {wanted}. Load it with the stock "
            f"Load Diffusion Model (UNETLoader) node; for DCM use the official DCM checkpoint or the "
            f"*_semantic.safetensors file made by `python -m dcm_core convert`."
        )
    if info.kind == KIND_LORA:
        return (
            f"{info.path} is an ordinary LoRA ({fam}), not {wanted}. Apply it with the stock LoraLoaderModelOnly "
            f"node on top of your model."
        )
    if info.kind == KIND_OFFICIAL:
        return (
            f"{info.path} is an official DCM checkpoint (both experts in one file), not {wanted}. Load it with the "
            f"DCM Checkpoint Loader node (DCMCheckpointLoader), or split it with `python -m dcm_core convert`."
        )
    if info.kind == KIND_SEMANTIC:
        return (
            f"{info.path} is a DCM semantic expert, not {wanted}. Load it with the DCM Checkpoint Loader node or "
            f"the stock Load Diffusion Model node."
        )
    if info.kind == KIND_DETAIL:
        return (
            f"{info.path} is a DCM detail expert (a LoRA relative to the semantic expert), not {wanted}. Load its "
            f"*_semantic.safetensors partner with the DCM Checkpoint Loader, or apply this file with "
            f"LoraLoaderModelOnly on top of the semantic model."
        )
    return (
        f"{info.path} is not a model DCM recognises ({info.tensor_count} tensors, none matching Wan2.x or "
        f"HunyuanVideo). Expected {wanted}."
    )


def meta_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
