"""The small picture ``DCM Schedule`` outputs: the sigma curve, the boundary and each step's expert.

Pure PIL + numpy (no matplotlib, no ComfyUI), so it is cheap to import and unit-testable.

The y axis uses ``sqrt(1 − σ)``: DCM's sigmas crowd near 1 (``1.0, 0.992, 0.982, 0.949 …``) and a
linear axis would draw the whole semantic segment as one dot. Gridlines are labelled in σ.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..schedule import DETAIL, SEMANTIC, route, timestep_of, validate_boundary

#: Default picture size (width, height) in pixels.
PLOT_SIZE = (512, 288)

SEMANTIC_COLOR = (46, 110, 230)
DETAIL_COLOR = (235, 130, 20)
BOUNDARY_COLOR = (200, 30, 45)
AXIS_COLOR = (90, 90, 90)
GRID_COLOR = (225, 225, 225)
TEXT_COLOR = (30, 30, 30)
BACKGROUND = (255, 255, 255)

_GRID_SIGMAS = (1.0, 0.99, 0.95, 0.9, 0.8, 0.5, 0.0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 (scalable when FreeType is present)
    except TypeError:  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def _y_of_sigma(sigma: float) -> float:
    """0 at σ = 1 (top), 1 at σ = 0 (bottom)."""
    return math.sqrt(max(0.0, min(1.0, 1.0 - float(sigma))))


def render_schedule(
    sigmas: Sequence[float],
    boundary_timestep: float,
    *,
    size: tuple[int, int] = PLOT_SIZE,
) -> np.ndarray:
    """Draw a sigma schedule and its expert routing.

    Args:
        sigmas: descending sigma list (the terminal 0 included).
        boundary_timestep: steps with ``floor(1000·σ) ≤ boundary`` belong to the detail expert.
        size: (width, height) of the picture.

    Returns:
        ``uint8`` array of shape ``(height, width, 3)``.
    """
    s = [float(x) for x in sigmas]
    b = validate_boundary(boundary_timestep)
    experts = route(s, b) if len(s) > 1 else []
    w, h = size
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    small, normal = _font(10), _font(12)

    left, right, top, bottom = 44, w - 12, 22, h - 46
    pw, ph = right - left, bottom - top
    n = max(1, len(s) - 1)

    def px(i: float) -> float:
        return left + pw * i / n

    def py(sigma: float) -> float:
        return top + ph * _y_of_sigma(sigma)

    # grid + σ labels
    for g in _GRID_SIGMAS:
        y = py(g)
        draw.line([(left, y), (right, y)], fill=GRID_COLOR, width=1)
        draw.text((4, y - 6), f"{g:g}", fill=AXIS_COLOR, font=small)
    draw.line([(left, top), (left, bottom)], fill=AXIS_COLOR, width=1)
    draw.line([(left, bottom), (right, bottom)], fill=AXIS_COLOR, width=1)

    # boundary (routing is floor(1000σ) ≤ b, i.e. σ < (b + 1) / 1000)
    yb = py(min(1.0, (b + 1.0) / 1000.0))
    x = left
    while x < right:
        draw.line([(x, yb), (min(x + 6, right), yb)], fill=BOUNDARY_COLOR, width=2)
        x += 10
    draw.text((right - 120, yb - 14), f"boundary t={b:g}", fill=BOUNDARY_COLOR, font=small)

    # steps
    for i, expert in enumerate(experts):
        color = SEMANTIC_COLOR if expert == SEMANTIC else DETAIL_COLOR
        draw.line([(px(i), py(s[i])), (px(i + 1), py(s[i + 1]))], fill=color, width=3)
    for i, sigma in enumerate(s):
        color = (SEMANTIC_COLOR if experts[i] == SEMANTIC else DETAIL_COLOR) if i < len(experts) else AXIS_COLOR
        r = 4
        draw.ellipse([(px(i) - r, py(sigma) - r), (px(i) + r, py(sigma) + r)], fill=color)
        if i < len(experts):
            label = f"{timestep_of(sigma):.0f}"
            draw.text((px(i) - 8, bottom + 4), label, fill=color, font=small)

    n_sem = sum(1 for e in experts if e == SEMANTIC)
    n_det = sum(1 for e in experts if e == DETAIL)
    draw.text((left, 4), "DCM schedule (y: sigma, sqrt scale)", fill=TEXT_COLOR, font=normal)
    legend_y = h - 22
    draw.rectangle([(left, legend_y + 2), (left + 10, legend_y + 12)], fill=SEMANTIC_COLOR)
    draw.text((left + 14, legend_y), f"semantic: {n_sem} step(s)", fill=TEXT_COLOR, font=normal)
    draw.rectangle([(left + 170, legend_y + 2), (left + 180, legend_y + 12)], fill=DETAIL_COLOR)
    draw.text((left + 184, legend_y), f"detail: {n_det} step(s)", fill=TEXT_COLOR, font=normal)
    draw.text((left + 330, legend_y), "labels: t = 1000*sigma", fill=AXIS_COLOR, font=small)
    return np.asarray(img, dtype=np.uint8).copy()
