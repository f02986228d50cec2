"""DCM for ComfyUI — node pack entry point.

ComfyUI imports this file; it only exposes ``comfy_entrypoint`` and does no work at import
time (the node modules are imported when ComfyUI asks for the extension).
"""


async def comfy_entrypoint():
    from .nodes import DCMExtension

    return DCMExtension()


__all__ = ["comfy_entrypoint"]
