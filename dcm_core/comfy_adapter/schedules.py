"""Schedule helpers for the nodes: presets → SIGMAS tensors + the plot IMAGE, the boundary split.

No ComfyUI import is needed here (SIGMAS is a 1-D float tensor, IMAGE a ``[B, H, W, 3]`` float
tensor in 0..1); it lives in the adapter because it speaks ComfyUI's socket conventions.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..errors import DCMScheduleError, node_errors
from ..schedule import (
    PRESET_CUSTOM,
    PRESET_NAMES,
    build_sigmas,
    parse_custom_sigmas,
    split_sigmas,
    validate_boundary,
    validate_sigmas,
)
from .names import SCHEDULE_NODE, SPLIT_NODE
from .plot import render_schedule

log = logging.getLogger("DCM.comfy")


def check_boundary_input(boundary_timestep: Any) -> bool | str:
    """``validate_inputs`` helper: True, or the message the UI shows before the run."""
    if boundary_timestep is None:  # linked from another node: checked at run time
        return True
    try:
        validate_boundary(boundary_timestep)
    except DCMScheduleError as e:
        return str(e)
    return True


def check_schedule_inputs(preset: Any, boundary_timestep: Any, custom_sigmas: Any) -> bool | str:
    """``DCM Schedule.validate_inputs``: preset name, boundary, and the custom list when it is used."""
    if preset is not None and preset not in PRESET_NAMES:
        return f"preset {preset!r} is unknown; choose one of: {', '.join(PRESET_NAMES)}."
    ok = check_boundary_input(boundary_timestep)
    if ok is not True:
        return ok
    if preset == PRESET_CUSTOM and custom_sigmas is not None:
        try:
            parse_custom_sigmas(str(custom_sigmas))
        except DCMScheduleError as e:
            return str(e)
    return True


def sigmas_tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def plot_image(values: list[float], boundary_timestep: float) -> torch.Tensor:
    """The schedule picture as a ComfyUI IMAGE (``[1, H, W, 3]``, float 0..1)."""
    arr = render_schedule(values, boundary_timestep).astype(np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def make_schedule(
    preset: str,
    semantic_steps: int,
    detail_steps: int,
    steps: int,
    boundary_timestep: float,
    custom_sigmas: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``DCM Schedule``: (SIGMAS, plot IMAGE)."""
    with node_errors(SCHEDULE_NODE):
        values = build_sigmas(
            preset,
            steps=steps,
            semantic_steps=semantic_steps,
            detail_steps=detail_steps,
            boundary_timestep=boundary_timestep,
            custom_sigmas=custom_sigmas,
        )
        validate_boundary(boundary_timestep)
    return sigmas_tensor(values), plot_image(values, boundary_timestep)


def split_at_boundary(sigmas: torch.Tensor, boundary_timestep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``DCM Timestep Split``: (semantic sigmas, detail sigmas) sharing the switch sigma."""
    with node_errors(SPLIT_NODE):
        values = validate_sigmas(torch.as_tensor(sigmas).flatten().tolist(), source=SPLIT_NODE, terminal_zero=False)
        sem, det = split_sigmas(values, boundary_timestep)
    for name, part in (("semantic", sem), ("detail", det)):
        if len(part) < 2:
            log.warning(
                "%s: boundary_timestep=%g gives the %s expert no steps (its sigma list is %s); the sampler fed "
                "with it does nothing.",
                SPLIT_NODE, boundary_timestep, name, part,
            )
    return sigmas_tensor(sem), sigmas_tensor(det)
