"""Test-only ComfyUI nodes (never shipped).

* ``DCMTestConditioning`` — conditioning without a text encoder.
* ``DCMTestCapture``      — output node that keeps a LATENT in ``DCMTestCapture.STORE[key]``.
* ``DCMTestRecordCalls``  — clones a MODEL and records ``(tag, timestep)`` of every diffusion-model
  call into ``DCMTestRecordCalls.CALLS`` (a ``DIFFUSION_MODEL`` wrapper), and ``(tag, timestep,
  cond_or_uncond)`` into ``PASSES``: which passes the call ran (ComfyUI's 0 = positive, 1 = negative;
  one call may batch both).

* ``DCMTestModelInfo``    — output node that keeps facts about a MODEL in ``DCMTestModelInfo.STORE[key]``: the
  weight dtype, the number of weight patches, the fp8-matmul flag, and the id of the shared base model.
* ``DCMTestStockUNETLoader`` — stock ``UNETLoader``'s code path (``comfy.sd.load_diffusion_model`` with
  ``model_options``) for every weight dtype, bf16 / fp16 included, which the stock node does not offer.

Class-level containers are mutated, never reassigned: V3 runs a shallow class clone per execution.
"""

from __future__ import annotations

import comfy.patcher_extension
import torch
from comfy_api.latest import ComfyExtension, io


class DCMTestConditioning(io.ComfyNode):
    """Deterministic random conditioning [[tensor(B, L, 4096), extras]] for tiny models."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMTestConditioning",
            category="testing/DCM",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31),
                io.Int.Input("tokens", default=8, min=1, max=512),
                io.Int.Input("batch", default=1, min=1, max=8),
                io.Int.Input("dim", default=4096, min=1, max=8192),
                io.Boolean.Input("hunyuan", default=False),
                io.Float.Input("guidance", default=6.0, min=0.0, max=100.0),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed, tokens, batch, dim, hunyuan, guidance):
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn(batch, tokens, dim, generator=g)
        extra = {}
        if hunyuan:
            extra["pooled_output"] = torch.randn(batch, 768, generator=g)
            extra["guidance"] = guidance
        return io.NodeOutput([[ctx, extra]])


class DCMTestCapture(io.ComfyNode):
    """Keep a LATENT for the test (``STORE[key]``)."""

    STORE: dict = {}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMTestCapture",
            category="testing/DCM",
            inputs=[io.Latent.Input("samples"), io.String.Input("key", default="out")],
            outputs=[],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, samples, key):
        return float("nan")  # never equal to the last run: always store, even when upstream is cached

    @classmethod
    def execute(cls, samples, key):
        cls.STORE[key] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in samples.items()}
        return io.NodeOutput()


class DCMTestRecordCalls(io.ComfyNode):
    """Clone a MODEL and record (tag, timestep) of each diffusion-model call into ``CALLS``."""

    CALLS: list = []
    PASSES: list = []

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMTestRecordCalls",
            category="testing/DCM",
            inputs=[io.Model.Input("model"), io.String.Input("tag", default="model")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, tag):
        calls, passes = DCMTestRecordCalls.CALLS, DCMTestRecordCalls.PASSES

        def record(executor, x, timestep, *args, **kwargs):
            t = float(timestep.flatten()[0])
            calls.append((tag, t))
            # transformer_options is passed positionally by some models (Wan, HunyuanVideo) and by keyword by others
            opts = next((a for a in (*args, *kwargs.values()) if isinstance(a, dict) and "cond_or_uncond" in a), {})
            passes.append((tag, t, tuple(opts.get("cond_or_uncond", ()))))
            return executor(x, timestep, *args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "dcm_test_record", record)
        return io.NodeOutput(m)


class DCMTestModelInfo(io.ComfyNode):
    """Keep dtype / patch count / fp8 flag / base-model id of a MODEL (``STORE[key]``)."""

    STORE: dict = {}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMTestModelInfo",
            category="testing/DCM",
            inputs=[io.Model.Input("model"), io.String.Input("key", default="model")],
            outputs=[],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, model, key):
        return float("nan")

    @classmethod
    def execute(cls, model, key):
        base = model.model
        DCMTestModelInfo.STORE[key] = {
            "dtype": base.get_dtype(),
            "patches": len(model.patches),
            "fp8_optimizations": bool(base.model_config.optimizations.get("fp8", False)),
            "base_id": id(base),
        }
        return io.NodeOutput()


WEIGHT_DTYPES = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


class DCMTestStockUNETLoader(io.ComfyNode):
    """``UNETLoader.load_unet`` with any weight dtype (same call, same ``model_options`` keys)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMTestStockUNETLoader",
            category="testing/DCM",
            inputs=[io.String.Input("unet_name"), io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES))],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, weight_dtype):
        import comfy.sd
        import folder_paths

        opts = {"dtype": WEIGHT_DTYPES[weight_dtype]}
        if weight_dtype == "fp8_e4m3fn_fast":
            opts["fp8_optimizations"] = True
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return io.NodeOutput(comfy.sd.load_diffusion_model(path, model_options=opts))


class _TestVAE:
    """What stock WanImageToVideo / Wan22ImageToVideoLatent call on a VAE: ``encode(pixels [F, H, W, C])`` →
    a video latent ``[1, channels, (F − 1)//4 + 1, H/down, W/down]`` (frames 0, 4, 8 …, average-pooled, a fixed
    random 3 → channels projection). Deterministic; no decoder."""

    def __init__(self, channels: int, down: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.channels, self.down = channels, down
        self.proj = torch.randn(channels, 3, generator=g)

    def encode(self, pixels):
        x = pixels[..., :3].movedim(-1, 1).float()  # F, 3, H, W
        x = torch.nn.functional.avg_pool2d(x, self.down)[::4]  # F', 3, h, w
        lat = torch.einsum("oc,fchw->ofhw", self.proj, x * 2.0 - 1.0)
        return lat[None]


class DCMTestVAE(io.ComfyNode):
    """A test VAE (encode only) for the image-to-video conditioning nodes: 16 channels / 8× (Wan2.1 VAE) or
    48 channels / 16× (Wan2.2 VAE)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMTestVAE",
            category="testing/DCM",
            inputs=[io.Int.Input("channels", default=16, min=1, max=64), io.Int.Input("downscale", default=8, min=1, max=32),
                    io.Int.Input("seed", default=0, min=0, max=2**31)],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, channels, downscale, seed):
        return io.NodeOutput(_TestVAE(channels, downscale, seed))


class DCMTestImage(io.ComfyNode):
    """A deterministic random IMAGE ``[frames, height, width, 3]`` in 0..1 (the start image)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMTestImage",
            category="testing/DCM",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31), io.Int.Input("width", default=32, min=8, max=512),
                    io.Int.Input("height", default=32, min=8, max=512), io.Int.Input("frames", default=1, min=1, max=64)],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, seed, width, height, frames):
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput(torch.rand(frames, height, width, 3, generator=g))


class _ClipVisionOut:
    def __init__(self, penultimate_hidden_states):
        self.penultimate_hidden_states = penultimate_hidden_states


class DCMTestClipVisionOutput(io.ComfyNode):
    """A CLIP_VISION_OUTPUT with random ``penultimate_hidden_states`` [1, 257, 1280] (what Wan2.1 I2V's image
    embedder reads), for WanImageToVideo's clip_vision_output input."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMTestClipVisionOutput",
            category="testing/DCM",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31)],
            outputs=[io.ClipVisionOutput.Output()],
        )

    @classmethod
    def execute(cls, seed):
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput(_ClipVisionOut(torch.randn(1, 257, 1280, generator=g)))


class _Ext(ComfyExtension):
    async def get_node_list(self):
        return [DCMTestConditioning, DCMTestCapture, DCMTestRecordCalls, DCMTestModelInfo, DCMTestStockUNETLoader,
                DCMTestVAE, DCMTestImage, DCMTestClipVisionOutput]


async def comfy_entrypoint():
    return _Ext()
