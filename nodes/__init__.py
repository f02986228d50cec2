"""ComfyUI V3 nodes of the DCM pack (thin schemas over dcm_core)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension


class DCMExtension(ComfyExtension):
    async def get_node_list(self):
        return []
