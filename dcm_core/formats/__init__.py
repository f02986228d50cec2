"""Checkpoint formats: official DCM files, the pack's ComfyUI-native expert files, key maps.

Public contract (other modules code against these names):

* :func:`inspect_file` -> :class:`FileInfo` (kind: official_dcm | dcm_semantic | dcm_detail_expert |
  base_model | lora | unknown)
* :func:`load_experts` -> :class:`ExpertBundle` (semantic state dict with bare ComfyUI keys + :class:`DetailExpert`)
* :func:`load_detail_expert` -> :class:`DetailExpert` (native LoRA patches + expected targets)
* :func:`check_compatible` (raises :class:`~dcm_core.errors.DCMIncompatibleModelError`)
* :func:`convert_official` -> :class:`ConvertResult`
* :func:`diffusers_to_comfy` / :func:`comfy_to_diffusers` (base-model key maps, both directions)

No ComfyUI import happens here.
"""

from __future__ import annotations

from .detect import (
    ALPHA_DEFAULT_SOURCE,
    FORMAT_VERSION,
    KIND_BASE,
    KIND_DETAIL,
    KIND_LORA,
    KIND_OFFICIAL,
    KIND_SEMANTIC,
    KIND_UNKNOWN,
    KINDS,
    ROLE_DETAIL,
    ROLE_SEMANTIC,
    FileInfo,
    inspect_file,
)
from .experts import (
    COMFY_PREFIX,
    DetailExpert,
    ExpertBundle,
    check_compatible,
    load_detail_expert,
    load_experts,
    native_metadata,
    targets_of,
)
from .keymaps import comfy_to_diffusers, diffusers_to_comfy, dims_from_comfy_shapes, size_label
from .safetensors_io import (
    DTYPE_NAMES,
    SafeReader,
    StreamingWriter,
    atomic_output,
    load_state_dict,
    parse_dtype,
    read_header,
    save_state_dict,
)


def convert_official(src, out_dir, *, dtype="bf16", name=None, progress=True):
    """Split an official DCM checkpoint; see :func:`dcm_core.convert.convert_official`."""
    from ..convert import convert_official as _impl

    return _impl(src, out_dir, dtype=dtype, name=name, progress=progress)


def export_official_state_dict(sd, out_dir, *, name, lora_alpha, dtype="bf16", progress=False, metadata=None):
    """Write both pack-native files from an in-memory official-layout state dict (trainer export);
    see :func:`dcm_core.convert.export_official_state_dict`."""
    from ..convert import export_official_state_dict as _impl

    return _impl(sd, out_dir, name=name, lora_alpha=lora_alpha, dtype=dtype, progress=progress, metadata=metadata)


def __getattr__(name: str):
    if name == "ConvertResult":
        from ..convert import ConvertResult

        return ConvertResult
    raise AttributeError(name)


__all__ = [
    "ALPHA_DEFAULT_SOURCE",
    "COMFY_PREFIX",
    "DTYPE_NAMES",
    "FORMAT_VERSION",
    "KINDS",
    "KIND_BASE",
    "KIND_DETAIL",
    "KIND_LORA",
    "KIND_OFFICIAL",
    "KIND_SEMANTIC",
    "KIND_UNKNOWN",
    "ROLE_DETAIL",
    "ROLE_SEMANTIC",
    "ConvertResult",
    "DetailExpert",
    "ExpertBundle",
    "FileInfo",
    "SafeReader",
    "StreamingWriter",
    "atomic_output",
    "check_compatible",
    "comfy_to_diffusers",
    "convert_official",
    "diffusers_to_comfy",
    "dims_from_comfy_shapes",
    "export_official_state_dict",
    "inspect_file",
    "load_detail_expert",
    "load_experts",
    "load_state_dict",
    "native_metadata",
    "parse_dtype",
    "read_header",
    "save_state_dict",
    "size_label",
    "targets_of",
]
