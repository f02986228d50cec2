"""Schedule nodes: preset sigma lists (with a picture) and the boundary split."""

from __future__ import annotations

from typing import Any

from comfy_api.v0_0_2 import io

from ..dcm_core import schedule
from ..dcm_core.comfy_adapter import schedules
from . import texts as T


def boundary_input(default: float = schedule.DEFAULT_BOUNDARY_TIMESTEP[schedule.FAMILY_WAN]) -> io.Float.Input:
    """The shared boundary_timestep widget (checked again in validate_inputs)."""
    return io.Float.Input("boundary_timestep", default=default, min=1.0, max=999.0, step=1.0, tooltip=T.BOUNDARY)


class DCMSchedule(io.ComfyNode):
    """Preset → SIGMAS + a picture of the schedule and its routing."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCMSchedule",
            display_name=T.SCHEDULE_NAME,
            category=T.CATEGORY_SAMPLING,
            description=T.SCHEDULE_DESC,
            inputs=[
                io.Combo.Input("preset", options=list(schedule.PRESET_NAMES), default=schedule.PRESET_NAMES[0], tooltip=T.PRESET),
                io.Int.Input("semantic_steps", default=3, min=1, max=49, tooltip=T.SEMANTIC_STEPS),
                io.Int.Input("detail_steps", default=3, min=1, max=49, tooltip=T.DETAIL_STEPS),
                io.Int.Input("steps", default=6, min=1, max=schedule.PCM_GRID_STEPS, tooltip=T.STEPS),
                boundary_input(),
                io.String.Input("custom_sigmas", default="1.0, 0.992, 0.982, 0.949, 0.905, 0.81", multiline=False, tooltip=T.CUSTOM_SIGMAS),
            ],
            outputs=[
                io.Sigmas.Output("sigmas", display_name="sigmas", tooltip=T.SIGMAS_OUT),
                io.Image.Output("plot", display_name="plot", tooltip=T.PLOT_OUT),
            ],
        )

    @classmethod
    def validate_inputs(cls, preset: str, boundary_timestep: float, custom_sigmas: str) -> bool | str:
        return schedules.check_schedule_inputs(preset, boundary_timestep, custom_sigmas)

    @classmethod
    def execute(
        cls, preset: str, semantic_steps: int, detail_steps: int, steps: int, boundary_timestep: float, custom_sigmas: str
    ) -> io.NodeOutput:
        sigmas, plot = schedules.make_schedule(preset, semantic_steps, detail_steps, steps, boundary_timestep, custom_sigmas)
        return io.NodeOutput(sigmas, plot)


class DCMTimestepSplit(io.ComfyNode):
    """SIGMAS → (semantic part, detail part) at the boundary."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCMTimestepSplit",
            display_name=T.SPLIT_NAME,
            category=T.CATEGORY_SAMPLING,
            description=T.SPLIT_DESC,
            inputs=[io.Sigmas.Input("sigmas", tooltip=T.SPLIT_SIGMAS), boundary_input()],
            outputs=[
                io.Sigmas.Output("semantic_sigmas", display_name="semantic_sigmas", tooltip=T.SEMANTIC_SIGMAS_OUT),
                io.Sigmas.Output("detail_sigmas", display_name="detail_sigmas", tooltip=T.DETAIL_SIGMAS_OUT),
            ],
        )

    @classmethod
    def validate_inputs(cls, boundary_timestep: float) -> bool | str:
        return schedules.check_boundary_input(boundary_timestep)

    @classmethod
    def execute(cls, sigmas: Any, boundary_timestep: float) -> io.NodeOutput:
        return io.NodeOutput(*schedules.split_at_boundary(sigmas, boundary_timestep))
