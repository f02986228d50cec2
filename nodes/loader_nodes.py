"""Loader nodes: the DCM checkpoint (both experts) and a pack-native detail-expert file."""

from __future__ import annotations

from typing import Any

from comfy_api.v0_0_2 import io

from ..dcm_core.comfy_adapter import loading
from . import texts as T


class DCMCheckpointLoader(io.ComfyNode):
    """Official DCM checkpoint (or converted semantic file) → semantic + detail MODEL."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCMCheckpointLoader",
            display_name=T.CHECKPOINT_LOADER_NAME,
            category=T.CATEGORY_LOADERS,
            description=T.CHECKPOINT_LOADER_DESC,
            inputs=[
                io.Combo.Input("ckpt_name", options=loading.list_files("diffusion_models"), tooltip=T.CKPT_NAME),
                io.Combo.Input("weight_dtype", options=list(loading.WEIGHT_DTYPES), default="default", tooltip=T.WEIGHT_DTYPE),
            ],
            outputs=[
                io.Model.Output("semantic_model", display_name="semantic_model", tooltip=T.SEMANTIC_OUT),
                io.Model.Output("detail_model", display_name="detail_model", tooltip=T.DETAIL_OUT),
            ],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name: str | None = None, weight_dtype: str | None = None) -> bool | str:
        return loading.check_checkpoint_inputs(ckpt_name, weight_dtype)

    @classmethod
    def fingerprint_inputs(cls, ckpt_name: str, weight_dtype: str = "default", **_: Any) -> str:
        return loading.checkpoint_fingerprint(ckpt_name, weight_dtype)

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str) -> io.NodeOutput:
        return io.NodeOutput(*loading.load_dcm_checkpoint(ckpt_name, weight_dtype))


class DCMExpertLoraLoader(io.ComfyNode):
    """MODEL + pack-native detail-expert file → MODEL (with a coverage check)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCMExpertLoraLoader",
            display_name=T.EXPERT_LOADER_NAME,
            category=T.CATEGORY_LOADERS,
            description=T.EXPERT_LOADER_DESC,
            inputs=[
                io.Model.Input("model", tooltip=T.EXPERT_MODEL),
                io.Combo.Input("lora_name", options=loading.list_files("loras"), tooltip=T.EXPERT_LORA_NAME),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=T.EXPERT_STRENGTH),
            ],
            outputs=[io.Model.Output("model_out", display_name="model", tooltip=T.EXPERT_OUT)],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str | None = None) -> bool | str:
        return loading.check_expert_inputs(lora_name)

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, **_: Any) -> str:
        return loading.expert_fingerprint(lora_name)

    @classmethod
    def execute(cls, model: Any, lora_name: str, strength: float) -> io.NodeOutput:
        return io.NodeOutput(loading.load_expert_lora(model, lora_name, strength))
