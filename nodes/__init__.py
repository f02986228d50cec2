"""ComfyUI V3 nodes of the DCM pack (thin schemas over dcm_core.comfy_adapter).

Node ids and input names are a contract: saved workflows store them. Never rename them.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io


class DCMExtension(ComfyExtension):
    """Registers every DCM node with ComfyUI (imported lazily by the pack's ``comfy_entrypoint``)."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .loader_nodes import DCMCheckpointLoader, DCMExpertLoraLoader
        from .sampler_nodes import DCMDualExpertGuider, DCMDualExpertSampler
        from .schedule_nodes import DCMSchedule, DCMTimestepSplit
        from .toy_nodes import DCMToyDecode, DCMToyTextEncode

        return [
            DCMCheckpointLoader,
            DCMExpertLoraLoader,
            DCMSchedule,
            DCMTimestepSplit,
            DCMDualExpertSampler,
            DCMDualExpertGuider,
            DCMToyTextEncode,
            DCMToyDecode,
        ]
