"""Model loading for the DCM nodes: files → ComfyUI ModelPatchers, through ComfyUI's own loader.

* The **semantic expert** is built by ``comfy.sd.load_diffusion_model_state_dict`` — the call stock
  ``UNETLoader`` makes — from the state dict the pack's key maps produce (official layout → ComfyUI
  layout, streamed and validated by :mod:`dcm_core.formats`). ComfyUI decides devices, dtypes,
  quantisation and its patcher class (``ModelPatcherDynamic`` under DynamicVRAM on newer releases);
  ``weight_dtype`` travels as ``model_options`` like UNETLoader's.
* The **detail expert** is ``semantic.clone()`` plus ``add_patches`` — exactly what stock
  ``LoraLoaderModelOnly`` does, with the same key mapping (``comfy.lora.model_lora_keys_unet`` →
  ``comfy.lora.load_lora``): the LoRA and the replaced layers (embedders, head) are ordinary ComfyUI
  weight patches. Both outputs share one set of base weights; ComfyUI's model management applies and
  removes the patches when it switches between the two clones, saving a detail model
  (``ModelSave``) writes the patched weights, and everything that reads or stacks patches (compile,
  context windows, hook LoRAs, merging) sees a stock LoRA'd model. Unlike the stock loader (which only
  logs "NOT LOADED"), every patch the expert needs must be accepted, or :class:`DCMCoverageError`
  lists the keys that were not.
* A module-level cache keyed by ``(realpath, size, mtime_ns, dtype)`` keeps the last loaded
  checkpoint, so a re-run with a fresh node cache does not read the file again. It holds the
  *built* base model, not the tensors (a tensor cache would hold every weight twice), and watches
  every file the load read.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import comfy.lora
import comfy.model_base
import comfy.sd
import folder_paths
import torch

from ..errors import (
    DCMConfigError,
    DCMCoverageError,
    DCMFileNotFoundError,
    DCMIncompatibleModelError,
    DCMUnsupportedFileError,
    node_errors,
)
from ..schedule import FAMILY_HUNYUAN, FAMILY_WAN
from .names import CHECKPOINT_NODE, EXPERT_NODE

log = logging.getLogger("DCM.comfy")

#: ``weight_dtype`` choices of ``DCM Checkpoint Loader`` (stock UNETLoader's plus bf16 / fp16).
WEIGHT_DTYPES: tuple[str, ...] = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "bf16", "fp16")

#: How many loaded checkpoints the read cache keeps (each is a full model in RAM).
CACHE_MAX_ENTRIES = 1
#: How many detail-expert files (patch tensors only) the expert cache keeps.
EXPERT_CACHE_MAX_ENTRIES = 4

_lock = threading.Lock()


@dataclass
class _CheckpointEntry:
    base: Any  # comfy.model_patcher.ModelPatcher (never handed out; clones are)
    detail: Any  # dcm_core.formats DetailExpert
    deps: tuple = ()  # (realpath, size, mtime_ns) of the partner file of a converted pair

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
        raise DCMFileNotFoundError(_missing_file_message(kind, name, node))
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


# --------------------------------------------------------------------------- validation / fingerprints


def _missing_file_message(kind: str, name: str, node: str) -> str:
    dirs = ", ".join(folder_paths.get_folder_paths(kind)) or f"models/{kind}"
    return (
        f"{node}: '{name}' was not found in models/{kind} (searched: {dirs}). Put the file there and "
        f"press R in ComfyUI to refresh the list, or pick another file."
    )


def check_checkpoint_inputs(ckpt_name: Any = None, weight_dtype: Any = None) -> bool | str:
    """``DCM Checkpoint Loader.validate_inputs``: the file exists and the dtype is known (None = linked)."""
    if weight_dtype is not None and weight_dtype not in WEIGHT_DTYPES:
        return f"{CHECKPOINT_NODE}: weight_dtype={weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}."
    if ckpt_name is not None and folder_paths.get_full_path("diffusion_models", ckpt_name) is None:
        return _missing_file_message("diffusion_models", ckpt_name, CHECKPOINT_NODE)
    return True


def check_expert_inputs(lora_name: Any = None) -> bool | str:
    """``DCM Expert LoRA Loader.validate_inputs``: the expert file exists (None = linked)."""
    if lora_name is not None and folder_paths.get_full_path("loras", lora_name) is None:
        return _missing_file_message("loras", lora_name, EXPERT_NODE)
    return True


def _stat_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (path, "missing")
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


def checkpoint_fingerprint(ckpt_name: str, weight_dtype: str) -> str:
    """``fingerprint_inputs`` of DCM Checkpoint Loader: changes whenever a file the load reads changes.

    ComfyUI re-runs a node only when its inputs or this value change; without it, a checkpoint replaced or
    deleted on disk between two runs of the same workflow would be served from the node cache. Covers the
    picked file and, once it has been loaded, every other file that load read (a converted pair's partner).
    """
    path = folder_paths.get_full_path("diffusion_models", ckpt_name)
    if path is None:
        return repr(("missing", ckpt_name, weight_dtype))
    real = os.path.realpath(path)
    with _lock:
        deps = [e.deps for k, e in _CHECKPOINTS.items() if k[0] == real]
    partners = tuple(_stat_key(d[0]) for group in deps for d in group)
    return repr((_stat_key(real), partners, weight_dtype))


def expert_fingerprint(lora_name: str) -> str:
    """``fingerprint_inputs`` of DCM Expert LoRA Loader: the expert file's identity on disk."""
    path = folder_paths.get_full_path("loras", lora_name)
    return repr(("missing", lora_name) if path is None else _stat_key(os.path.realpath(path)))


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
    """A model's family as users know it; models of other architectures read "an unsupported architecture"."""
    from ..formats.keymaps import family_label as label

    return label(family, unknown="an unsupported architecture")


def model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """``{ComfyUI key ('diffusion_model.…'): shape}`` of a ModelPatcher's weights."""
    return {k: tuple(v.shape) for k, v in model.model.state_dict().items()}


def build_semantic_model(semantic_sd: dict, weight_dtype: str, *, family: str, name: str) -> Any:
    """The semantic expert as a ComfyUI ModelPatcher, built by ComfyUI's own diffusion-model loader.

    ``semantic_sd`` (ComfyUI layout) is handed to ``comfy.sd.load_diffusion_model_state_dict`` and
    emptied afterwards, so the converted tensors are released as soon as ComfyUI holds the weights.
    """
    try:
        model = comfy.sd.load_diffusion_model_state_dict(semantic_sd, model_options=model_options_for(weight_dtype))
    finally:
        semantic_sd.clear()
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
    from ..formats.experts import split_patch_key

    return [k for k in patches if split_patch_key(k)[0] not in key_map]


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … and {len(keys) - limit} more" if len(keys) > limit else "")


def apply_detail_expert(
    model: Any, detail: Any, strength: float, *, name: str, node: str, model_label: str = "the connected model"
) -> Any:
    """A clone of ``model`` with the detail expert as weight patches; every expected key must land.

    The stock ``LoraLoaderModelOnly`` path (``model_lora_keys_unet`` → ``load_lora`` → ``clone`` →
    ``add_patches``) plus a coverage check. The input model is never modified.
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


def load_dcm_checkpoint(ckpt_name: str, weight_dtype: str = "default") -> tuple[Any, Any]:
    """``DCM Checkpoint Loader``: (semantic MODEL, detail MODEL) sharing one set of base weights."""
    from ..formats import load_experts

    with node_errors(CHECKPOINT_NODE):
        path = resolve_file("diffusion_models", ckpt_name, node=CHECKPOINT_NODE)
        model_options_for(weight_dtype)  # validate before any reading
        key = _file_key(path, weight_dtype)
        entry = _lookup(_CHECKPOINTS, key)
        if entry is not None and not entry.is_current():
            entry = None  # a file the load read changed: read again
        label = f"the semantic expert of '{ckpt_name}'"
        if entry is not None:
            log.info("%s: '%s' (%s) from the cache", CHECKPOINT_NODE, ckpt_name, weight_dtype)
            semantic = entry.base.clone()
            return semantic, apply_detail_expert(
                semantic, entry.detail, 1.0, name=ckpt_name, node=CHECKPOINT_NODE, model_label=label
            )
        bundle = load_experts(path, dtype=_read_dtype(weight_dtype), search_dirs=tuple(folder_paths.get_folder_paths("loras")))
        semantic_sd, expert, family, sources = bundle.semantic_sd, bundle.detail, bundle.family, bundle.sources
        bundle.semantic_sd = {}
        del bundle  # ComfyUI's loader takes the converted tensors over (no second copy held here)
        base = build_semantic_model(semantic_sd, weight_dtype, family=family, name=ckpt_name)
        del semantic_sd
        detail = apply_detail_expert(base, expert, 1.0, name=ckpt_name, node=CHECKPOINT_NODE, model_label=label)
        # every other file the load read (the partner of a converted pair) is watched too
        deps = tuple(_file_key(p, "")[:3] for p in sources if os.path.realpath(p) != key[0])
        _remember(_CHECKPOINTS, key, _CheckpointEntry(base, expert, deps), CACHE_MAX_ENTRIES)
        return base.clone(), detail


def load_expert_lora(model: Any, lora_name: str, strength: float = 1.0) -> Any:
    """``DCM Expert LoRA Loader``: ``model`` + a pack-native detail-expert file (same coverage check)."""
    from ..formats import load_detail_expert

    with node_errors(EXPERT_NODE):
        path = resolve_file("loras", lora_name, node=EXPERT_NODE)
        key = _file_key(path, "detail")
        detail = _lookup(_EXPERTS, key)
        if detail is None:
            detail = load_detail_expert(path)
            _remember(_EXPERTS, key, detail, EXPERT_CACHE_MAX_ENTRIES)
        if strength == 0:
            return model
        return apply_detail_expert(model, detail, strength, name=lora_name, node=EXPERT_NODE)
