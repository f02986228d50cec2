"""Model loading for the DCM nodes: files → ComfyUI ModelPatchers.

* The **semantic expert** is a plain ComfyUI model built from the converted state dict with
  ``comfy.sd.load_diffusion_model_state_dict`` (the same call and ``model_options`` as the stock
  ``UNETLoader``, plus bf16 / fp16).
* The **detail expert** is ``semantic.clone()`` carrying the expert as weight patches, built with
  ``comfy.lora.load_lora`` + ``add_patches`` — exactly the path of stock ``LoraLoaderModelOnly``.
  Both outputs therefore share one set of base weights. Unlike the stock loader (which only logs
  "NOT LOADED"), every patch the expert needs must be accepted, or :class:`DCMCoverageError`
  lists the keys that were not.
* A module-level cache keyed by ``(realpath, size, mtime_ns, dtype)`` keeps the last loaded
  checkpoint, so a re-run with a fresh node cache does not read the file again. It holds the
  *built* base model, not the tensors: ComfyUI copies tensors into the model when it loads them,
  so a tensor cache would hold every weight twice (6 GB more for the fp32 Wan 1.3B file).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import torch

import comfy.lora
import comfy.model_base
import comfy.sd
import folder_paths

from ..errors import (
    DCMConfigError,
    DCMCoverageError,
    DCMError,
    DCMFileNotFoundError,
    DCMIncompatibleModelError,
    DCMUnsupportedFileError,
)
from ..schedule import FAMILY_HUNYUAN, FAMILY_WAN

log = logging.getLogger("DCM.comfy")

#: ``weight_dtype`` choices of ``DCM Checkpoint Loader`` (stock UNETLoader's plus bf16 / fp16).
WEIGHT_DTYPES: tuple[str, ...] = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "bf16", "fp16")

#: How many loaded checkpoints the read cache keeps (each is a full model in RAM).
CACHE_MAX_ENTRIES = 1
#: How many detail-expert files (patch tensors only) the expert cache keeps.
EXPERT_CACHE_MAX_ENTRIES = 4

#: Counters for tests and logs: file reads vs cache hits.
STATS: dict[str, int] = {"checkpoint_reads": 0, "checkpoint_hits": 0, "expert_reads": 0, "expert_hits": 0}

CHECKPOINT_NODE = "DCM Checkpoint Loader"
EXPERT_NODE = "DCM Expert LoRA Loader"

_LORA_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_up.weight",
    ".lora_down.weight",
    ".lora_mid.weight",
    ".alpha",
    ".dora_scale",
    ".diff_b",
    ".diff",
    ".set_weight",
)

_lock = threading.Lock()


@dataclass
class _CheckpointEntry:
    base: Any  # comfy.model_patcher.ModelPatcher (never handed out; clones are)
    detail: Any  # dcm_core.formats DetailExpert
    family: str
    name: str
    deps: tuple = ()  # (realpath, size, mtime_ns) of partner files read too (a converted detail expert)

    def is_current(self) -> bool:
        for real, size, mtime in self.deps:
            try:
                st = os.stat(real)
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                return False
        return True


_CHECKPOINTS: "OrderedDict[tuple, _CheckpointEntry]" = OrderedDict()
_EXPERTS: "OrderedDict[tuple, Any]" = OrderedDict()


# --------------------------------------------------------------------------- folders


def list_files(kind: str) -> list[str]:
    """File names ComfyUI lists for a model folder (``diffusion_models``, ``loras`` …)."""
    return folder_paths.get_filename_list(kind)


def resolve_file(kind: str, name: str, *, node: str) -> str:
    """Full path of ``name`` in the ComfyUI model folder ``kind`` (or a :class:`DCMFileNotFoundError`)."""
    path = folder_paths.get_full_path(kind, name)
    if path is None or not os.path.isfile(path):
        dirs = ", ".join(folder_paths.get_folder_paths(kind)) or f"models/{kind}"
        raise DCMFileNotFoundError(
            f"{node}: '{name}' was not found in models/{kind} (searched: {dirs}). Put the file there and "
            f"press R in ComfyUI to refresh the list, or pick another file."
        )
    return path


def _file_key(path: str, tag: str) -> tuple:
    real = os.path.realpath(path)
    st = os.stat(real)
    return (real, st.st_size, st.st_mtime_ns, tag)


def clear_cache() -> None:
    """Drop every cached checkpoint and expert (frees their RAM once ComfyUI lets go too)."""
    with _lock:
        _CHECKPOINTS.clear()
        _EXPERTS.clear()


def _remember(cache: OrderedDict, key: tuple, value: Any, limit: int) -> None:
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)


def _lookup(cache: OrderedDict, key: tuple) -> Any:
    with _lock:
        value = cache.get(key)
        if value is not None:
            cache.move_to_end(key)
        return value


# --------------------------------------------------------------------------- models


def model_options_for(weight_dtype: str) -> dict:
    """``model_options`` for ``load_diffusion_model_state_dict``, as stock ``UNETLoader`` builds them."""
    options: dict = {}
    if weight_dtype == "fp8_e4m3fn":
        options["dtype"] = torch.float8_e4m3fn
    elif weight_dtype == "fp8_e4m3fn_fast":
        options["dtype"] = torch.float8_e4m3fn
        options["fp8_optimizations"] = True
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    elif weight_dtype == "bf16":
        options["dtype"] = torch.bfloat16
    elif weight_dtype == "fp16":
        options["dtype"] = torch.float16
    elif weight_dtype != "default":
        raise DCMConfigError(
            f"{CHECKPOINT_NODE}: weight_dtype={weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}."
        )
    return options


def _read_dtype(weight_dtype: str) -> torch.dtype | None:
    """Convert while reading only when the target is a 16-bit float (halves peak RAM for fp32 files)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(weight_dtype)


def family_of(model: Any) -> str | None:
    """``'wan'`` / ``'hunyuan_video'`` for a ModelPatcher, or None for other architectures."""
    base = getattr(model, "model", None)
    if isinstance(base, comfy.model_base.WAN21):
        return FAMILY_WAN
    if isinstance(base, comfy.model_base.HunyuanVideo):
        return FAMILY_HUNYUAN
    return None


def family_label(family: str | None) -> str:
    return {FAMILY_WAN: "Wan2.x", FAMILY_HUNYUAN: "HunyuanVideo"}.get(family or "", "an unsupported architecture")


def model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """``{ComfyUI key ('diffusion_model.…'): shape}`` of a ModelPatcher's weights."""
    return {k: tuple(v.shape) for k, v in model.model.state_dict().items()}


def build_semantic_model(semantic_sd: dict, weight_dtype: str, *, family: str, name: str) -> Any:
    """The semantic expert as a ComfyUI ModelPatcher (stock UNETLoader path, with bf16/fp16 added)."""
    model = comfy.sd.load_diffusion_model_state_dict(dict(semantic_sd), model_options=model_options_for(weight_dtype))
    if model is None:
        raise DCMUnsupportedFileError(
            f"{CHECKPOINT_NODE}: ComfyUI could not recognise the model in '{name}' after conversion. The file "
            f"is probably damaged or not a Wan2.x / HunyuanVideo DCM checkpoint; re-download it or re-run "
            f"'dcm convert'."
        )
    got = family_of(model)
    if got != family:
        raise DCMIncompatibleModelError(
            f"{CHECKPOINT_NODE}: '{name}' was read as {family_label(family)} but ComfyUI built "
            f"{family_label(got)} from it. The file is inconsistent; re-download or re-convert it."
        )
    return model


def _unmatched_file_keys(patches: dict, key_map: dict) -> list[str]:
    """Tensor names in an expert file whose target stem the model's LoRA key map does not know."""
    out = []
    for k in patches:
        stem = k
        for suffix in _LORA_SUFFIXES:
            if k.endswith(suffix):
                stem = k[: -len(suffix)]
                break
        if stem not in key_map:
            out.append(k)
    return out


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … and {len(keys) - limit} more" if len(keys) > limit else "")


def apply_detail_expert(
    model: Any, detail: Any, strength: float, *, name: str, node: str, model_label: str = "the connected model"
) -> Any:
    """A clone of ``model`` with the detail expert as weight patches; every expected key must land.

    Same calls as stock ``LoraLoaderModelOnly`` (``model_lora_keys_unet`` → ``load_lora`` →
    ``clone().add_patches``); the input model is never modified.
    """
    from ..formats import check_compatible

    check_compatible(detail, model_shapes(model), name=model_label)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(detail.patches, key_map, log_missing=False)
    unknown = _unmatched_file_keys(detail.patches, key_map)
    out = model.clone()
    accepted = out.add_patches(loaded, float(strength))
    accepted_keys = {k if isinstance(k, str) else k[0] for k in accepted}
    expected = set(detail.expected_targets)
    missing = expected - accepted_keys
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(expected)} target weights were not patched ({_preview(missing)})")
        if unknown:
            parts.append(f"{len(unknown)} tensors in the file match no layer of the model ({_preview(unknown)})")
        raise DCMCoverageError(
            f"{node}: the detail expert in '{name}' does not fit the connected {family_label(family_of(model))} "
            f"model: {'; '.join(parts)}. Connect the base model this expert was made for (same family and "
            f"size), or use the matching expert file."
        )
    log.info("%s: detail expert '%s' applied (%d patched weights, strength %g)", node, name, len(accepted_keys), strength)
    return out


def _with_node(node: str, err: DCMError) -> DCMError:
    """The same error type with the node name in front (formats errors name the file and the fix)."""
    msg = str(err)
    if msg.startswith(node):
        return err
    try:
        new = type(err)(f"{node}: {msg}")
    except Exception:  # an error type with a custom __init__: keep it as is
        return err
    return new


def load_dcm_checkpoint(ckpt_name: str, weight_dtype: str = "default") -> tuple[Any, Any]:
    """``DCM Checkpoint Loader``: (semantic MODEL, detail MODEL) sharing one set of base weights."""
    from ..formats import load_experts

    node = CHECKPOINT_NODE
    path = resolve_file("diffusion_models", ckpt_name, node=node)
    model_options_for(weight_dtype)  # validate before any reading
    key = _file_key(path, weight_dtype)
    entry = _lookup(_CHECKPOINTS, key)
    if entry is not None and not entry.is_current():
        entry = None  # the partner detail-expert file changed: read again
    label = f"the semantic expert of '{ckpt_name}'"
    if entry is not None:
        STATS["checkpoint_hits"] += 1
        log.info("%s: '%s' (%s) from the cache", node, ckpt_name, weight_dtype)
        semantic = entry.base.clone()
        try:
            return semantic, apply_detail_expert(semantic, entry.detail, 1.0, name=ckpt_name, node=node, model_label=label)
        except DCMError as e:
            raise _with_node(node, e) from e
    try:
        bundle = load_experts(path, dtype=_read_dtype(weight_dtype), search_dirs=tuple(folder_paths.get_folder_paths("loras")))
    except DCMError as e:
        raise _with_node(node, e) from e
    STATS["checkpoint_reads"] += 1
    semantic_sd, expert, family = bundle.semantic_sd, bundle.detail, bundle.family
    del bundle  # drop the converted tensors as soon as the model holds its own copy
    base = build_semantic_model(semantic_sd, weight_dtype, family=family, name=ckpt_name)
    del semantic_sd
    try:
        detail = apply_detail_expert(base, expert, 1.0, name=ckpt_name, node=node, model_label=label)
    except DCMError as e:
        raise _with_node(node, e) from e
    deps = ()
    det_path = getattr(getattr(expert, "info", None), "path", None)
    if det_path and os.path.realpath(det_path) != key[0]:
        deps = (_file_key(det_path, "")[:3],)
    _remember(_CHECKPOINTS, key, _CheckpointEntry(base, expert, family, ckpt_name, deps), CACHE_MAX_ENTRIES)
    return base.clone(), detail


def load_expert_lora(model: Any, lora_name: str, strength: float = 1.0) -> Any:
    """``DCM Expert LoRA Loader``: ``model`` + a pack-native detail-expert file (same coverage check)."""
    from ..formats import load_detail_expert

    node = EXPERT_NODE
    path = resolve_file("loras", lora_name, node=node)
    key = _file_key(path, "detail")
    detail = _lookup(_EXPERTS, key)
    if detail is None:
        try:
            detail = load_detail_expert(path)
        except DCMError as e:
            raise _with_node(node, e) from e
        STATS["expert_reads"] += 1
        _remember(_EXPERTS, key, detail, EXPERT_CACHE_MAX_ENTRIES)
    else:
        STATS["expert_hits"] += 1
    if strength == 0:
        return model
    try:
        return apply_detail_expert(model, detail, strength, name=lora_name, node=node)
    except DCMError as e:
        raise _with_node(node, e) from e
