"""Test-only ComfyUI nodes for the soak tier (tests/soak); copied into the soak server's custom_nodes,
never shipped with the pack.

* ``DCMSoakPace``   — MODEL → MODEL clone whose every diffusion-model call sleeps ``ms`` first (a
  ``DIFFUSION_MODEL`` wrapper). The result is unchanged; the soak's ``/interrupt`` lands on a step
  (or on the expert switch) it aimed at instead of after the run already finished.
* ``DCMSoakDigest`` — output node: loads the MODEL as a sampler would (``load_models_gpu``: the
  ModelPatcher applies its weight patches, unpatching whatever clone was loaded before) and reports
  the SHA-256 of its weights in the UI output (``/history``). Always re-runs (``IS_CHANGED`` = NaN).
  A patch left applied by an interrupted run shows up as a digest that differs from a fresh server's.
"""

from __future__ import annotations

import hashlib
import time

import comfy.model_management
import comfy.patcher_extension
import torch


class DCMSoakPace:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "ms": ("INT", {"default": 10, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "pace"
    CATEGORY = "testing/DCM soak"

    def pace(self, model, ms):
        delay = ms / 1000.0

        def slow(executor, *args, **kwargs):
            time.sleep(delay)
            return executor(*args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "dcm_soak_pace", slow)
        return (m,)


class DCMSoakDigest:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": "model"})}}

    RETURN_TYPES = ()
    FUNCTION = "digest"
    OUTPUT_NODE = True
    CATEGORY = "testing/DCM soak"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def digest(self, model, label):
        comfy.model_management.load_models_gpu([model])
        h = hashlib.sha256()
        for k, v in sorted(model.model.diffusion_model.state_dict().items()):
            h.update(k.encode() + b"\0" + str(v.dtype).encode() + b"\0")
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return {"ui": {"dcm_soak_digest": [{"label": label, "sha256": h.hexdigest()}]}}


NODE_CLASS_MAPPINGS = {"DCMSoakPace": DCMSoakPace, "DCMSoakDigest": DCMSoakDigest}
