"""The DCM Schedule picture (PIL + numpy, no ComfyUI)."""

from __future__ import annotations

import numpy as np
import pytest

from dcm_core.comfy_adapter.plot import DETAIL_COLOR, PLOT_SIZE, SEMANTIC_COLOR, render_schedule
from dcm_core.errors import DCMScheduleError
from dcm_core.schedule import PRESET_NAMES, build_sigmas


def _count(img: np.ndarray, color) -> int:
    return int(np.all(img == np.array(color, dtype=np.uint8), axis=-1).sum())


@pytest.mark.parametrize("preset", [p for p in PRESET_NAMES if p != "custom"])
def test_presets_render_both_experts(preset):
    img = render_schedule(build_sigmas(preset), 978.0)
    assert img.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 3) and img.dtype == np.uint8
    assert _count(img, SEMANTIC_COLOR) > 50 and _count(img, DETAIL_COLOR) > 50


def test_boundary_changes_the_colouring():
    sig = build_sigmas("wan2.1-t2v-6step")
    a, b = render_schedule(sig, 978.0), render_schedule(sig, 1.0)  # boundary 1: every step semantic
    legend = 11 * 11  # the legend swatch is always drawn
    assert _count(b, DETAIL_COLOR) <= legend < _count(a, DETAIL_COLOR)
    assert _count(b, SEMANTIC_COLOR) > _count(a, SEMANTIC_COLOR)


def test_single_step_and_custom_size():
    img = render_schedule([1.0, 0.0], 978.0, size=(256, 160))
    assert img.shape == (160, 256, 3)


def test_invalid_boundary_raises():
    with pytest.raises(DCMScheduleError, match="outside"):
        render_schedule(build_sigmas("wan2.1-t2v-6step"), 1000.0)
