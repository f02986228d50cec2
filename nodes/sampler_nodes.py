"""Sampling nodes: the one-node dual-expert sampler and the GUIDER for SamplerCustomAdvanced."""

from __future__ import annotations

from typing import Any

from comfy_api.v0_0_2 import io

from ..dcm_core import families, schedule
from ..dcm_core.comfy_adapter import sampling, schedules
from . import texts as T
from .schedule_nodes import boundary_input


def expert_inputs() -> list:
    """Inputs shared by the sampler and the guider, in their contract order."""
    return [
        io.Model.Input("semantic_model", tooltip=T.SEMANTIC_MODEL),
        io.Model.Input("detail_model", tooltip=T.DETAIL_MODEL),
        io.Conditioning.Input("positive", tooltip=T.POSITIVE),
        io.Conditioning.Input("negative", tooltip=T.NEGATIVE),
    ]


def boundary_preset_input() -> io.Combo.Input:
    """Optional Wan2.2 / DCM boundary presets (``manual`` = the boundary_timestep widget); last, so saved
    workflows keep their widget order."""
    return io.Combo.Input(
        "boundary_preset", options=list(families.BOUNDARY_PRESETS), default=families.BOUNDARY_MANUAL, optional=True,
        tooltip=T.BOUNDARY_PRESET,
    )


def cfg_inputs() -> list:
    """The per-expert cfg widgets (1.0 = DCM default, skips the negative pass)."""
    return [
        io.Float.Input("cfg_semantic", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=T.CFG_SEMANTIC),
        io.Float.Input("cfg_detail", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=T.CFG_DETAIL),
    ]


class DCMDualExpertSampler(io.ComfyNode):
    """Both experts, one node: seed → noise → semantic steps → detail steps → LATENT."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCMDualExpertSampler",
            display_name=T.SAMPLER_NAME,
            category=T.CATEGORY_SAMPLING,
            description=T.SAMPLER_DESC,
            inputs=[
                *expert_inputs(),
                io.Latent.Input("latent_image", tooltip=T.SAMPLER_LATENT),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=T.SEED),
                io.Combo.Input("preset", options=list(schedule.PRESET_NAMES), default=schedule.PRESET_NAMES[0], tooltip=T.SAMPLER_PRESET),
                boundary_input(),
                *cfg_inputs(),
                io.Sigmas.Input("sigmas", optional=True, tooltip=T.SAMPLER_SIGMAS),
                boundary_preset_input(),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip=T.LATENT_OUT)],
        )

    @classmethod
    def validate_inputs(
        cls, boundary_timestep: float | None = None, preset: str | None = None, boundary_preset: str | None = None
    ) -> bool | str:
        return sampling.boundary_preset_problem(boundary_preset) or schedules.check_schedule_inputs(preset, boundary_timestep, None)

    @classmethod
    def execute(
        cls, semantic_model: Any, detail_model: Any, positive: Any, negative: Any, latent_image: dict, seed: int,
        preset: str, boundary_timestep: float, cfg_semantic: float, cfg_detail: float, sigmas: Any = None,
        boundary_preset: str = families.BOUNDARY_MANUAL,
    ) -> io.NodeOutput:
        return io.NodeOutput(sampling.sample_dual_expert(
            semantic_model, detail_model, positive, negative, latent_image, seed=seed, preset=preset,
            boundary_timestep=boundary_timestep, cfg_semantic=cfg_semantic, cfg_detail=cfg_detail, sigmas=sigmas,
            boundary_preset=boundary_preset,
        ))


class DCMDualExpertGuider(io.ComfyNode):
    """Both experts as one GUIDER for the stock SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCMDualExpertGuider",
            display_name=T.GUIDER_NAME,
            category=T.CATEGORY_SAMPLING,
            description=T.GUIDER_DESC,
            inputs=[*expert_inputs(), boundary_input(), *cfg_inputs(), boundary_preset_input()],
            outputs=[io.Guider.Output("guider", display_name="guider", tooltip=T.GUIDER_OUT)],
        )

    @classmethod
    def validate_inputs(cls, boundary_timestep: float, boundary_preset: str | None = None) -> bool | str:
        return sampling.boundary_preset_problem(boundary_preset) or schedules.check_boundary_input(boundary_timestep)

    @classmethod
    def execute(
        cls, semantic_model: Any, detail_model: Any, positive: Any, negative: Any, boundary_timestep: float,
        cfg_semantic: float, cfg_detail: float, boundary_preset: str = families.BOUNDARY_MANUAL,
    ) -> io.NodeOutput:
        return io.NodeOutput(sampling.make_guider(
            semantic_model, detail_model, positive, negative, boundary_timestep=boundary_timestep,
            cfg_semantic=cfg_semantic, cfg_detail=cfg_detail, boundary_preset=boundary_preset,
        ))
