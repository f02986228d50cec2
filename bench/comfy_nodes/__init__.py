"""Bench-only ComfyUI nodes (never shipped; loaded by bench/comfy_env.py).

* ``DCMBenchConditioning`` — deterministic random conditioning ``[[tensor(B, L, 4096), {}]]`` (no text encoder).
* ``DCMBenchCallTimer``    — clones a MODEL and records every diffusion-model call (a ``DIFFUSION_MODEL``
  wrapper): ``(tag, wall start, wall end, cpu start, cpu end, batch, timestep, lowvram, loaded bytes,
  model bytes)`` into ``CALLS`` (``time.perf_counter`` and ``time.process_time``; the last three: how much
  of the model ComfyUI had on the compute device during that call).
* ``DCMBenchModelSink``    — output node taking a MODEL (so a prompt can run just the loaders); stores
  its size in ``STORE[key]``.
* ``DCMBenchCapture``      — output node keeping a LATENT in ``STORE[key]``.

Class-level containers are mutated, never reassigned: V3 runs a shallow class clone per execution.
"""

from __future__ import annotations

import time

import comfy.patcher_extension
import torch
from comfy_api.latest import ComfyExtension, io


class DCMBenchConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMBenchConditioning",
            category="testing/DCM bench",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31),
                io.Int.Input("tokens", default=8, min=1, max=512),
                io.Int.Input("batch", default=1, min=1, max=8),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed, tokens, batch):
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput([[torch.randn(batch, tokens, 4096, generator=g), {}]])


class DCMBenchCallTimer(io.ComfyNode):
    CALLS: list = []

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMBenchCallTimer",
            category="testing/DCM bench",
            inputs=[io.Model.Input("model"), io.String.Input("tag", default="model")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, tag):
        calls = DCMBenchCallTimer.CALLS
        clock, cpu = time.perf_counter, time.process_time

        def timed(executor, x, timestep, *args, **kwargs):
            cuda = x.is_cuda
            if cuda:  # GPU work is asynchronous: time the call's kernels, not their launch
                torch.cuda.synchronize(x.device)
            t0, c0 = clock(), cpu()
            out = executor(x, timestep, *args, **kwargs)
            if cuda:
                torch.cuda.synchronize(x.device)
            base = m.model
            calls.append((tag, t0, clock(), c0, cpu(), int(x.shape[0]), float(timestep.flatten()[0]),
                          bool(getattr(base, "model_lowvram", False)), int(getattr(base, "model_loaded_weight_memory", 0)),
                          int(m.model_size())))
            return out

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "dcm_bench_timer", timed)
        return io.NodeOutput(m)


class DCMBenchCapture(io.ComfyNode):
    STORE: dict = {}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMBenchCapture",
            category="testing/DCM bench",
            inputs=[io.Latent.Input("samples"), io.String.Input("key", default="out")],
            outputs=[],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, samples, key):
        return float("nan")

    @classmethod
    def execute(cls, samples, key):
        cls.STORE[key] = samples["samples"].clone()
        return io.NodeOutput()


class DCMBenchModelSink(io.ComfyNode):
    STORE: dict = {}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DCMBenchModelSink",
            category="testing/DCM bench",
            inputs=[io.Model.Input("model"), io.String.Input("key", default="model")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, key):
        cls.STORE[key] = {"model_size": int(model.model_size()), "dtype": str(model.model_dtype()),
                          "patches": len(model.patches)}
        return io.NodeOutput()


class _Ext(ComfyExtension):
    async def get_node_list(self):
        return [DCMBenchConditioning, DCMBenchCallTimer, DCMBenchCapture, DCMBenchModelSink]


async def comfy_entrypoint():
    return _Ext()
