"""Test-only ComfyUI nodes (never shipped): inject conditioning without a text encoder."""

from __future__ import annotations

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


class _Ext(ComfyExtension):
    async def get_node_list(self):
        return [DCMTestConditioning]


async def comfy_entrypoint():
    return _Ext()
