"""The detail expert's LoRA as a forward-time bypass on the shared base weights.

Stock ComfyUI applies a LoRA by *merging* it (``W + s·B·A``) into every patched weight when the
model is loaded, backing the original up first. For the two DCM experts, which share one set of base
weights, that design costs on every expert switch (and again when the next run starts with the
semantic expert):

* time: ``unpatch_model`` + a fp32 merge of every LoRA layer (240 ``1536×1536`` layers for Wan
  1.3B; 2·r·in·out FLOPs each, then a rounding pass back to the storage dtype);
* memory: the merged weights are new tensors while the originals stay referenced as backups, so
  the detail segment holds a second copy of ~40 % of the model.

Here the LoRA is never merged: each target ``Linear`` gets a PyTorch forward hook computing
``y = W·x + b + s·B·(A·x)`` (the PEFT formulation the official checkpoint was trained with) while
the detail patcher is the one loaded. The hooks are a ComfyUI *injection*
(``ModelPatcher.set_injections``): ComfyUI installs them when it loads the detail clone and removes
them when it loads the semantic clone or unloads. The replaced layers (embedders, head: ``diff``
patches, ~2 % of the weights) stay ordinary weight patches, so the detail clone still differs from
the semantic one in ``patches`` and ``patches_uuid`` and ComfyUI's own bookkeeping (which clone's
weights are current) applies unchanged.

Each hook also checks ``model.current_weight_patches_uuid`` against the patcher that installed it,
so hooks that outlive their patcher (a clone garbage-collected while loaded) can never leak the
detail LoRA into another clone's forward.

Loads that ask for patched weights (``force_patch_weights``: ComfyUI's checkpoint / model saving and
LoRA extraction) get the LoRA *merged* instead, by ComfyUI's own ``patch_weight_to_device`` (an
``ON_LOAD`` callback), with the hooks off: a saved detail model holds the detail weights. Not covered:
the model-merging nodes read ``get_key_patches()``, which lists weight patches only, so they see the
detail clone without its LoRA (as they would see any hook- or wrapper-based model).

Cost: 2·r·(in+out) extra FLOPs per token on each LoRA layer of a detail-expert call (Wan 1.3B,
r 128: +7 % of a call) instead of a merge per switch. Memory: the LoRA factors only (already held
by the loader), moved to the compute device while injected (not in lowvram mode, where they are
cast per call like ComfyUI's lowvram weights).
"""

from __future__ import annotations

import logging
import uuid
import weakref
from typing import Any

import comfy.patcher_extension
import comfy.utils
import comfy.weight_adapter
import torch
import torch.nn.functional as F

log = logging.getLogger("DCM.comfy")

INJECTION_PREFIX = "dcm_detail_lora_bypass"


def _is_cpu(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


class LoRABypass:
    """Forward hooks adding ``scale·B·(A·x)`` to the outputs of a set of ``Linear`` modules.

    ``targets`` maps a module path on the ``BaseModel`` (``diffusion_model.blocks.0.self_attn.q``)
    to a list of ``(A, B, scale)``; the tensors are shared, never copied, on the host.
    """

    def __init__(self, targets: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]], patches: dict | None = None):
        self.targets = targets
        #: the original ComfyUI patches ``{weight key: (strength, adapter)}``, merged for forced loads
        self.patches = patches or {}
        self._merged_uuid: Any = None
        self.key = f"{INJECTION_PREFIX}_{uuid.uuid4().hex[:12]}"
        self._handles: list[Any] = []
        self._owner: weakref.ReferenceType | None = None
        self._active_uuid: Any = None
        self._cache_on_device = False
        self._device_cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    # -- ComfyUI injection protocol (ModelPatcher.inject_model / eject_model)
    def inject(self, patcher: Any) -> None:
        self._remove()
        base = patcher.model
        self._owner = weakref.ref(patcher)
        self._active_uuid = patcher.patches_uuid
        # keep the factors on the compute device while loaded, except in lowvram mode (cast per call)
        self._cache_on_device = not getattr(base, "model_lowvram", False)
        for path, entries in self.targets.items():
            module = comfy.utils.get_attr(base, path)
            self._handles.append(module.register_forward_hook(self._hook_for(base, entries)))

    def eject(self, patcher: Any) -> None:
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not patcher:
            return  # a clone that copied the injected flag: the owner's hooks stay
        self._remove()

    def on_load(self, patcher: Any, device_to: Any, lowvram_model_memory: Any, force_patch_weights: bool, full_load: bool) -> None:
        """``CallbacksMP.ON_LOAD``: a load that must produce patched weights gets the LoRA merged, hooks off."""
        if not force_patch_weights:
            self._merged_uuid = None
            return
        for key, (strength, adapter) in self.patches.items():
            saved = patcher.patches.get(key)
            # the weight may already carry this key's other patches (merged by load()): add only ours on top;
            # the original stays in patcher.backup either way, so unpatching restores it
            patcher.patches[key] = [(strength, adapter, 1.0, None, None)]
            try:
                patcher.patch_weight_to_device(key)
            finally:
                if saved is None:
                    patcher.patches.pop(key, None)
                else:
                    patcher.patches[key] = saved
        self._merged_uuid = patcher.patches_uuid

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._device_cache.clear()
        self._owner = None
        self._active_uuid = None

    # -- the hook
    def _cast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if t.device == like.device and t.dtype == like.dtype:
            return t
        if not self._cache_on_device or _is_cpu(like.device):
            return t.to(device=like.device, dtype=like.dtype)
        k = (id(t), like.device, like.dtype)
        c = self._device_cache.get(k)
        if c is None:
            c = self._device_cache[k] = t.to(device=like.device, dtype=like.dtype)
        return c

    def _hook_for(self, base: Any, entries: list[tuple[torch.Tensor, torch.Tensor, float]]):
        def hook(module, args, output):
            current = getattr(base, "current_weight_patches_uuid", None)
            if current is None or current != self._active_uuid or current == self._merged_uuid:
                return None
            x = args[0]
            delta = None
            for a, b, scale in entries:
                h = F.linear(x, self._cast(a, x))
                if scale != 1.0:
                    h = h * scale
                d = F.linear(h, self._cast(b, x))
                delta = d if delta is None else delta + d
            if delta is None:
                return None
            if delta.dtype != output.dtype:
                delta = delta.to(output.dtype)
            if torch.is_inference_mode_enabled() or not (torch.is_grad_enabled() and output.requires_grad):
                return output.add_(delta)
            return output + delta

        return hook


def split_bypass(model: Any, patches: dict, strength: float) -> tuple[LoRABypass | None, dict, set[str]]:
    """Split ``comfy.lora.load_lora`` output into (bypass, remaining weight patches, bypassed keys).

    A patch is bypassed when it is a plain LoRA (no DoRA / LoCon mid / reshape) on the full weight of a
    ``Linear`` module of ``model``; everything else (``diff`` patches of replaced layers, offset slices,
    conv LoRAs, other adapter types) stays a stock ComfyUI weight patch.
    """
    base = model.model
    sd_keys = None
    targets: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    originals: dict = {}
    rest: dict = {}
    bypassed: set[str] = set()
    for key, value in patches.items():
        entry = _lora_entry(base, key, value, strength)
        if entry is None:
            rest[key] = value
            continue
        if sd_keys is None:
            sd_keys = set(model.model_state_dict().keys())
        if key not in sd_keys:
            rest[key] = value  # let add_patches drop / report it like any other key
            continue
        targets.setdefault(key[: -len(".weight")], []).append(entry)
        originals[key] = (float(strength), value)
        bypassed.add(key)
    return (LoRABypass(targets, originals) if targets else None), rest, bypassed


def _lora_entry(base: Any, key: Any, value: Any, strength: float):
    if not isinstance(key, str) or not key.endswith(".weight"):
        return None
    if not isinstance(value, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = value.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    if up.ndim != 2 or down.ndim != 2:
        return None
    try:
        module = comfy.utils.get_attr(base, key[: -len(".weight")])
    except AttributeError:
        return None
    if not isinstance(module, torch.nn.Linear):
        return None
    w = module.weight
    if tuple(w.shape) != (up.shape[0], down.shape[1]) or up.shape[1] != down.shape[0]:
        return None
    rank = down.shape[0]
    scale = float(strength) * ((float(alpha) / rank) if alpha is not None else 1.0)
    return (down, up, scale)


def attach(clone: Any, bypass: LoRABypass) -> None:
    """Register ``bypass`` as an injection of ``clone`` and give the clone its own weights identity."""
    clone.set_injections(bypass.key, [comfy.patcher_extension.PatcherInjection(inject=bypass.inject, eject=bypass.eject)])
    clone.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, bypass.key, bypass.on_load)
    # the clone computes different weights from its parent even if it has no weight patch of its own
    clone.patches_uuid = uuid.uuid4()
