"""Toy-world nodes: run the bundled toy DCM experts inside ComfyUI with no downloads."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..dcm_core.toy import comfy_io
from . import texts as T


class DCMToyTextEncode(io.ComfyNode):
    """Prompt of the toy world → conditioning."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCMToyTextEncode",
            display_name=T.TOY_TEXT_NAME,
            category=T.CATEGORY_TOY,
            description=T.TOY_TEXT_DESC,
            inputs=[io.String.Input("prompt", default="red circle moving right", tooltip=T.TOY_PROMPT)],
            outputs=[io.Conditioning.Output("conditioning", display_name="conditioning", tooltip=T.TOY_CONDITIONING_OUT)],
        )

    @classmethod
    def validate_inputs(cls, prompt: str) -> bool | str:
        return comfy_io.check_prompt(prompt)

    @classmethod
    def execute(cls, prompt: str) -> io.NodeOutput:
        return io.NodeOutput(comfy_io.encode_conditioning(prompt))


class DCMToyDecode(io.ComfyNode):
    """Toy latent → RGB frames."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCMToyDecode",
            display_name=T.TOY_DECODE_NAME,
            category=T.CATEGORY_TOY,
            description=T.TOY_DECODE_DESC,
            inputs=[io.Latent.Input("samples", tooltip=T.TOY_SAMPLES)],
            outputs=[io.Image.Output("images", display_name="images", tooltip=T.TOY_IMAGES_OUT)],
        )

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        return io.NodeOutput(comfy_io.decode_images(samples["samples"]))
