"""Model loading for the DCM nodes: files → ComfyUI ModelPatchers.

* The **semantic expert** is a plain ComfyUI model built from the converted state dict by the steps of
  ``comfy.sd.load_diffusion_model_state_dict`` (the stock ``UNETLoader`` path, plus bf16 / fp16), except
  that the converted tensors *become* the model's weights instead of being copied into it: peak RAM
  is ~1× the model, not 2× (:func:`_model_from_state_dict`).
* The **detail expert** is ``semantic.clone()``: the same key mapping as stock ``LoraLoaderModelOnly``
  (``comfy.lora.load_lora``); its LoRA layers run as a forward-time bypass (:mod:`.bypass`, no merge
  per expert switch, no second copy of the patched weights) and its replaced layers (embedders, head)
  as ``add_patches`` weight patches. Both outputs share one set of base weights. Unlike the stock
  loader (which only logs "NOT LOADED"), every patch the expert needs must be accepted, or
  :class:`DCMCoverageError` lists the keys that were not.
* A module-level cache keyed by ``(realpath, size, mtime_ns, dtype)`` keeps the last loaded
  checkpoint, so a re-run with a fresh node cache does not read the file again. It holds the
  *built* base model, not the tensors (a tensor cache would hold every weight twice).
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
    DCMError,
    DCMFileNotFoundError,
    DCMIncompatibleModelError,
    DCMUnsupportedFileError,
)
from ..schedule import FAMILY_HUNYUAN, FAMILY_WAN
from . import bypass

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
    """The semantic expert as a ComfyUI ModelPatcher (stock UNETLoader path, with bf16/fp16 added).

    **Consumes** ``semantic_sd``: its tensors become the model's weights (see :func:`_model_from_state_dict`)
    and the dict is emptied, so the caller's converted tensors are never held twice.
    """
    model = _model_from_state_dict(semantic_sd, model_options_for(weight_dtype))
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


def _model_from_state_dict(sd: dict, model_options: dict) -> Any:
    """``comfy.sd.load_diffusion_model_state_dict`` without the second copy of the weights.

    The stock call builds the model with empty parameters and then *copies* the state dict into them
    (``load_state_dict``), so while it runs the process holds every weight twice (2× the model for a
    bf16 1.3B Wan: 5.7 GB instead of 2.8 GB). Here the same steps run (prefix, model detection,
    storage / compute dtype, ``get_model``), then each tensor *becomes* its parameter (converted only
    if ComfyUI chose another dtype or device) and is dropped from ``sd`` at once: the untouched empty
    parameters are never paged in, and peak RAM stays ~1× the model. Anything unexpected (no model config, a diffusers-layout state dict) goes
    through the stock call unchanged.
    """
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    work = sd
    prefix = comfy.model_detection.unet_prefix_from_state_dict(work)
    stripped = comfy.utils.state_dict_prefix_replace(work, {prefix: ""}, filter_keys=True)
    if len(stripped) > 0:
        work = stripped
    model_config = comfy.model_detection.model_config_from_unet(work, "")
    if model_config is None:  # not a ComfyUI-layout diffusion model: the stock path decides (and logs)
        merged = dict(work)
        sd.clear()
        return comfy.sd.load_diffusion_model_state_dict(merged, model_options=model_options)
    dtype = model_options.get("dtype", None)
    parameters = comfy.utils.calculate_parameters(work)
    weight_dtype = comfy.utils.weight_dtype(work)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    if model_config.scaled_fp8 is not None:
        weight_dtype = None
    if dtype is None:
        unet_dtype = mm.unet_dtype(
            model_params=parameters, supported_dtypes=list(model_config.supported_inference_dtypes), weight_dtype=weight_dtype
        )
    else:
        unet_dtype = dtype
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    model_config.custom_operations = model_options.get("custom_operations", model_config.custom_operations)
    if model_options.get("fp8_optimizations", False):
        model_config.optimizations["fp8"] = True
    model = model_config.get_model(work, "")
    model = model.to(offload_device)
    to_load = dict(model_config.process_unet_state_dict(work))  # may return ``work`` itself
    work.clear()
    sd.clear()
    _assign_weights(model.diffusion_model, to_load)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def _assign_weights(module: torch.nn.Module, to_load: dict) -> None:
    """``module.load_state_dict(to_load, strict=False)`` by assignment, emptying ``to_load`` as it goes."""
    slots: dict[str, tuple[torch.nn.Module, str, bool]] = {}
    for mod_name, mod in module.named_modules():
        pre = f"{mod_name}." if mod_name else ""
        for n, p in mod._parameters.items():
            if p is not None:
                slots[pre + n] = (mod, n, True)
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                slots[pre + n] = (mod, n, False)
    unexpected = []
    with torch.no_grad():
        for key in list(to_load):
            t = to_load.pop(key)
            slot = slots.pop(key, None)
            if slot is None:
                unexpected.append(key)
                continue
            mod, n, is_param = slot
            old = mod._parameters[n] if is_param else mod._buffers[n]
            if tuple(old.shape) != tuple(t.shape):
                raise DCMUnsupportedFileError(
                    f"{CHECKPOINT_NODE}: tensor '{key}' has shape {tuple(t.shape)} but ComfyUI's model expects "
                    f"{tuple(old.shape)}; the file is damaged or was edited."
                )
            # the pack's reader returns tensors that own their memory (never views of the file), so the
            # model does not depend on the file after loading
            if t.dtype != old.dtype or t.device != old.device:
                t = t.to(device=old.device, dtype=old.dtype)
            if is_param:
                mod._parameters[n] = torch.nn.Parameter(t, requires_grad=old.requires_grad)
            else:
                mod._buffers[n] = t
            del t, old
    if slots:
        log.warning("unet missing: %s", sorted(slots))
    if unexpected:
        log.warning("unet unexpected: %s", unexpected)


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

    Same key mapping as stock ``LoraLoaderModelOnly`` (``model_lora_keys_unet`` → ``load_lora``), but the
    plain LoRA layers are applied as a forward-time bypass (:mod:`.bypass`) instead of merged weight
    patches; the replaced layers (``diff``) stay ``add_patches`` weight patches. The input model is never
    modified.
    """
    from ..formats import check_compatible

    check_compatible(detail, model_shapes(model), name=model_label)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(detail.patches, key_map, log_missing=False)
    unknown = _unmatched_file_keys(detail.patches, key_map)
    out = model.clone()
    # LoRA layers: forward-time bypass (no merge, no second copy per switch); the rest: weight patches
    lora_bypass, weight_patches, bypassed = bypass.split_bypass(out, loaded, float(strength))
    accepted = out.add_patches(weight_patches, float(strength))
    if lora_bypass is not None:
        bypass.attach(out, lora_bypass)
    accepted_keys = {k if isinstance(k, str) else k[0] for k in accepted} | bypassed
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
    semantic_sd, expert, family, sources = bundle.semantic_sd, bundle.detail, bundle.family, bundle.sources
    bundle.semantic_sd = {}
    del bundle  # the build below takes the converted tensors over as the model's weights (no second copy)
    base = build_semantic_model(semantic_sd, weight_dtype, family=family, name=ckpt_name)
    del semantic_sd
    try:
        detail = apply_detail_expert(base, expert, 1.0, name=ckpt_name, node=node, model_label=label)
    except DCMError as e:
        raise _with_node(node, e) from e
    # the partner file of a converted pair (whichever of the two was picked) is watched too
    deps = tuple(_file_key(p, "")[:3] for p in sources if os.path.realpath(p) != key[0])
    _remember(_CHECKPOINTS, key, _CheckpointEntry(base, expert, deps), CACHE_MAX_ENTRIES)
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
