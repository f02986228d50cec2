"""Toy world v2: the v1 world plus per-clip fine structure that few-step sampling must get right.

Why a second world (issue 12): in v1 one flat blob on a flat background is fully decided by
σ ≈ 0.8, so a few-step Euler sampler already lands on the teacher's sample and a detail expert has
nothing to add. v2 keeps everything the models and ComfyUI see — the prompt language
``'<colour> <shape> <motion>'``, the text encoder, the invertible 2×2-patch latent map, the clip
size and the motion law (all imported from :mod:`dcm_core.toy.world`) — and adds detail that the
prompt does not fix and that is only decided at low noise:

* **Object texture** — stripes or a checkerboard with random frequency (period 3–6 px), orientation
  and phase, drawn on the shape as a brightness modulation of its colour (``LOW`` … 1 × colour).
  The texture lives in the object's own coordinates (origin at its centre), so it moves rigidly with
  the shape; a growing or shrinking shape shows more or less of the same pattern (scaling the pattern
  would alias it below 2 px periods).
* **Background** — a random gradient, or low-contrast stripes / checker, around one of v1's dark
  background colours; static over the clip.

Nothing here is random at import time; a clip is a pure function of ``(prompt, seed)``.
v1 stays the default world of the bundled models (:func:`get_world` selects one by name).

Analytic measurements (what the toy VBench scores a generated clip with, no learned model):

* :func:`object_mask` / :func:`track` — the foreground is "bright" (max RGB channel): every colour has
  a channel ≥ 0.85 and its darkest texture band keeps ≥ ``LOW`` of it (≥ 0.47), while every background
  stays ≤ 0.25, so one threshold separates them for every colour and texture;
* :func:`classify_colour`, :func:`classify_shape`, :func:`classify_motion` — nearest colour by
  chromaticity, best-IoU shape at the tracked size, best-fitting motion law;
* :func:`motion_error` — as v1's (tracked vs simulated centre and radius, px, at v2's speed), on the v2 tracker;
* :func:`hf_energy` — sharpness: mean squared discrete Laplacian (high-frequency energy);
* :func:`warp_error` — temporal consistency of the texture: each frame's object interior against the
  previous frame shifted by the tracked motion of the centre, mean squared difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import world as w1
from .world import (  # noqa: F401  (re-exported: v2 keeps v1's language, text encoder and latent map)
    COLOURS,
    FRAMES,
    MOTIONS,
    PATCH,
    SHAPES,
    SIZE,
    TEXT_TOKENS,
    ClipState,
    Prompt,
    all_prompts,
    encode_text,
    frames_to_latent,
    latent_shape,
    latent_to_frames,
    parse_prompt,
    to_uint8,
)

VERSION = "v2"
#: Objects are larger than v1's (radius 5–6.5 px against 3.5–5) so the shape word decides a visible share of
#: the clip (corners vs. round edges over ≈ 20 px per frame instead of ≈ 8), and move slower (1.5 px/frame
#: against 2) so the larger objects stay inside the 24-px frame over the clip.
RADIUS_RANGE = (5.0, 6.5)
SPEED = 1.5
GROWTH = w1.GROWTH
LOW = 0.55  # darkest texture band, as a fraction of the object's colour
PERIOD_RANGE = (3.0, 6.0)  # object texture period, pixels
BG_AMPLITUDE = 0.05  # background gradient / texture half-range (RGB in [0, 1])
BG_PERIOD_RANGE = (4.0, 8.0)
FG_THRESHOLD = 0.36  # max-channel threshold between object (≥ 0.47) and background (≤ 0.25)
_SHARPNESS = 2.5  # tanh sharpening of the sinusoidal texture (higher: closer to hard bands)


@dataclass(frozen=True)
class Texture:
    """A periodic pattern in object (or image) coordinates: value in [0, 1] at every pixel."""

    kind: str  # "stripes" | "checker"
    period: float  # pixels
    angle: float  # radians
    phase: tuple[float, float]  # in cycles, one per axis (stripes use the first)

    def value(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        a = (c * u + s * v) / self.period + self.phase[0]
        if self.kind == "stripes":
            wave = np.cos(2 * np.pi * a)
        else:
            b = (-s * u + c * v) / self.period + self.phase[1]
            wave = np.cos(2 * np.pi * a) * np.cos(2 * np.pi * b) * 1.6
        return 0.5 + 0.5 * np.tanh(_SHARPNESS * wave) / math.tanh(_SHARPNESS)


@dataclass(frozen=True)
class Background:
    base: tuple[float, float, float]
    kind: str  # "gradient" | "stripes" | "checker"
    angle: float
    texture: Texture | None


def random_texture(rng: np.random.Generator, period_range=PERIOD_RANGE) -> Texture:
    kind = "stripes" if rng.random() < 0.5 else "checker"
    return Texture(kind, float(rng.uniform(*period_range)), float(rng.uniform(0, math.pi)),
                   (float(rng.random()), float(rng.random())))


def random_background(rng: np.random.Generator) -> Background:
    base = w1.BACKGROUNDS[int(rng.integers(len(w1.BACKGROUNDS)))]
    kind = ("gradient", "stripes", "checker")[int(rng.integers(3))]
    angle = float(rng.uniform(0, 2 * math.pi))
    tex = None if kind == "gradient" else Texture(kind, float(rng.uniform(*BG_PERIOD_RANGE)),
                                                  float(rng.uniform(0, math.pi)),
                                                  (float(rng.random()), float(rng.random())))
    return Background(base, kind, angle, tex)


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def background_image(bg: Background) -> np.ndarray:
    """``[3, SIZE, SIZE]`` in [0, 1]."""
    base = np.array(bg.base, dtype=np.float32)[:, None, None]
    if bg.texture is None:
        ramp = (math.cos(bg.angle) * (_XX - SIZE / 2) + math.sin(bg.angle) * (_YY - SIZE / 2)) / (SIZE / 2)
        mod = np.clip(ramp, -1, 1)
    else:
        mod = bg.texture.value(_XX, _YY) * 2 - 1
    return (base + BG_AMPLITUDE * mod[None]).astype(np.float32)


def render(prompt: Prompt, state: ClipState, background: Background, texture: Texture) -> torch.Tensor:
    """``[F, 3, SIZE, SIZE]`` RGB in [−1, 1]; the texture is anchored to the object's centre (rigid motion)."""
    col = np.array(COLOURS[prompt.colour], dtype=np.float32)[:, None, None]
    bg = background_image(background)
    out = []
    for x, y, r in zip(state.xs, state.ys, state.radii):
        a = w1._coverage(prompt.shape, x, y, r)[None]
        m = texture.value(_XX - x, _YY - y)[None]
        fg = col * (LOW + (1 - LOW) * m)
        out.append(bg * (1 - a) + fg * a)
    return torch.from_numpy(np.stack(out).astype(np.float32) * 2.0 - 1.0)



def simulate(prompt: Prompt, x0: float, y0: float, r0: float, frames: int = FRAMES) -> ClipState:
    """v1's motion law at v2's speed."""
    return w1.simulate(prompt, x0, y0, r0, frames, speed=SPEED, growth=GROWTH)


def start_state(prompt: Prompt, rng: np.random.Generator) -> tuple[float, float, float]:
    """A random start (centre, radius) that keeps the object inside the frame over the whole clip."""
    r = rng.uniform(*RADIUS_RANGE)
    travel = SPEED * (FRAMES - 1)
    lo, hi = r + 0.5, SIZE - r - 0.5
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if prompt.motion == "moving right":
        x = rng.uniform(lo, hi - travel)
    elif prompt.motion == "moving left":
        x = rng.uniform(lo + travel, hi)
    elif prompt.motion == "moving down":
        y = rng.uniform(lo, hi - travel)
    elif prompt.motion == "moving up":
        y = rng.uniform(lo + travel, hi)
    elif prompt.motion == "bouncing":
        y = rng.uniform(lo, SIZE / 2)
    elif prompt.motion in ("growing", "shrinking"):
        r = rng.uniform(3.0, 3.5) if prompt.motion == "growing" else rng.uniform(7.5, 8.5)
        big = r + GROWTH * (FRAMES - 1) if prompt.motion == "growing" else r
        x, y = rng.uniform(big - 0.5, SIZE - big + 0.5), rng.uniform(big - 0.5, SIZE - big + 0.5)
    return float(x), float(y), float(r)


@dataclass(frozen=True)
class Clip:
    prompt: Prompt
    state: ClipState
    background: Background
    texture: Texture
    frames: torch.Tensor  # [F, 3, SIZE, SIZE] in [−1, 1]
    latent: torch.Tensor  # [16, F, SIZE/2, SIZE/2]


def make_clip(prompt: str | Prompt, seed: int) -> Clip:
    """The v2 clip for a prompt and seed (same inputs → same clip, on any machine)."""
    p = prompt if isinstance(prompt, Prompt) else parse_prompt(prompt)
    rng = np.random.default_rng(seed)
    bg = random_background(rng)
    tex = random_texture(rng)
    state = simulate(p, *start_state(p, rng))
    frames = render(p, state, bg, tex)
    return Clip(p, state, bg, tex, frames, frames_to_latent(frames))


def random_clip(seed: int) -> Clip:
    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    return make_clip(prompts[int(rng.integers(len(prompts)))], int(rng.integers(2**31)))


def get_world(version: str = "v1"):
    """The world module by name: ``"v1"`` (default; the bundled models) or ``"v2"``."""
    if version == "v1":
        return w1
    if version == "v2":
        import sys

        return sys.modules[__name__]
    raise ValueError(f"unknown toy world {version!r}; use 'v1' or 'v2'")


# ----------------------------------------------------------------------------- measurement


def _rgb01(frames: torch.Tensor) -> torch.Tensor:
    return (frames.float().clamp(-1, 1) + 1) / 2


def object_mask(frames: torch.Tensor) -> torch.Tensor:
    """Soft foreground mask ``[F, H, W]`` in [0, 1] from the max RGB channel."""
    return torch.sigmoid((_rgb01(frames).amax(1) - FG_THRESHOLD) * 40.0)


def track(frames: torch.Tensor) -> list[tuple[float, float, float]]:
    """(x, y, equivalent radius) of the object per frame (nan when no object is found)."""
    m = object_mask(frames)
    xx, yy = torch.from_numpy(_XX), torch.from_numpy(_YY)
    out = []
    for mi in m:
        area = float(mi.sum())
        if area < 1.0:
            out.append((float("nan"), float("nan"), 0.0))
            continue
        out.append((float((mi * xx).sum() / area), float((mi * yy).sum() / area), math.sqrt(area / math.pi)))
    return out


def classify_colour(frames: torch.Tensor) -> str:
    """Nearest world colour by chromaticity (RGB / max channel) of the object's pixels."""
    rgb = _rgb01(frames)
    m = object_mask(frames)[:, None]
    chroma = rgb / rgb.amax(1, keepdim=True).clamp_min(1e-3)
    if float(m.sum()) < 1.0:
        return ""
    mean = (chroma * m).sum((0, 2, 3)) / m.sum()
    best, dist = "", float("inf")
    for name, c in COLOURS.items():
        ct = torch.tensor(c) / max(c)
        d = float(((mean - ct) ** 2).sum())
        if d < dist:
            best, dist = name, d
    return best


def _shape_area(shape: str, r: float) -> float:
    return float(w1._coverage(shape, SIZE / 2, SIZE / 2, r).sum())


def _radius_for_area(shape: str, area: float) -> float:
    # area grows monotonically with r: bisection on the rendered coverage
    lo, hi = 0.3, SIZE * 1.5
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _shape_area(shape, mid) < area else (lo, mid)
    return (lo + hi) / 2


def shape_scores(frames: torch.Tensor) -> dict[str, float]:
    """Mean soft IoU over frames of the object mask with each shape at the tracked centre and area."""
    m = object_mask(frames).numpy()
    tr = track(frames)
    scores = {s: [] for s in SHAPES}
    for mi, (x, y, _) in zip(m, tr):
        area = float(mi.sum())
        if not math.isfinite(x) or area < 4.0:
            continue
        for s in SHAPES:
            cov = w1._coverage(s, x, y, _radius_for_area(s, area))
            scores[s].append(float(np.minimum(mi, cov).sum() / max(np.maximum(mi, cov).sum(), 1e-6)))
    return {s: (float(np.mean(v)) if v else 0.0) for s, v in scores.items()}


def classify_shape(frames: torch.Tensor) -> str:
    sc = shape_scores(frames)
    best = max(sc, key=sc.get)
    return best if sc[best] > 0 else ""


def motion_error(frames: torch.Tensor, prompt: str | Prompt) -> float:
    """Mean distance (px) over frames 1..F−1 between the tracked (x, y, r) and the prompt's motion law
    simulated from the tracked first frame (like v1's, on the colour-agnostic v2 tracker)."""
    p = prompt if isinstance(prompt, Prompt) else parse_prompt(prompt)
    return w1.track_error(p, track(frames), speed=SPEED)


def classify_motion(frames: torch.Tensor, colour: str = "red", shape: str = "circle") -> str:
    """The motion law that fits the tracked object best (smallest :func:`motion_error`)."""
    errs = {m: motion_error(frames, Prompt(colour, shape, m)) for m in MOTIONS}
    return min(errs, key=errs.get)


_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def hf_energy(frames: torch.Tensor) -> float:
    """Sharpness: mean squared discrete Laplacian of the RGB frames (in [−1, 1]) over the interior pixels."""
    x = frames.float().clamp(-1, 1).reshape(-1, 1, *frames.shape[-2:])
    lap = torch.nn.functional.conv2d(x, _LAPLACE)
    return float((lap**2).mean())


def _erode(m: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.max_pool2d(-m[None, None], 3, stride=1, padding=1)[0, 0]


def _shift(img: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """``img`` [C, H, W] sampled at (x + dx, y + dy) (bilinear, zeros outside)."""
    xx, yy = torch.from_numpy(_XX), torch.from_numpy(_YY)
    grid = torch.stack([(xx + dx) / SIZE * 2 - 1, (yy + dy) / SIZE * 2 - 1], -1)[None]
    return torch.nn.functional.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)[0]


def warp_error(frames: torch.Tensor) -> float:
    """Temporal consistency of the object's texture: mean squared difference (RGB in [−1, 1]) between
    consecutive frames after moving both to the midpoint of the tracked motion of the object's centre (the
    world's textures move rigidly, without scaling), over pixels inside the object in both, one pixel away
    from its edges. Both frames are resampled by the same half displacement, so a sub-pixel motion blurs
    them alike and a rigidly moving texture scores near 0; large when the texture flickers or slides over
    the object. nan when no object is tracked."""
    x = frames.float().clamp(-1, 1)
    m = object_mask(frames)
    tr = track(frames)
    num, den = 0.0, 0.0
    for t in range(len(tr) - 1):
        (xa, ya, ra), (xb, yb, rb) = tr[t], tr[t + 1]
        if not all(math.isfinite(v) for v in (xa, ya, xb, yb)) or ra <= 0 or rb <= 0:
            continue
        hx, hy = (xb - xa) / 2, (yb - ya) / 2
        a = _shift(torch.cat([x[t], m[t][None]], 0), -hx, -hy)  # frame t moved forward by half the motion
        b = _shift(torch.cat([x[t + 1], m[t + 1][None]], 0), hx, hy)  # frame t+1 moved back by half
        inside = ((_erode(a[3]) > 0.9) & (_erode(b[3]) > 0.9)).float()  # away from the soft edges
        num += float((((a[:3] - b[:3]) ** 2).sum(0) * inside).sum()) / 3
        den += float(inside.sum())
    return num / den if den > 0 else float("nan")


def score_clip(frames: torch.Tensor, prompt: str | Prompt) -> dict[str, float | bool | str]:
    """Every analytic measurement of one clip against its prompt (the toy VBench's per-sample scores)."""
    p = prompt if isinstance(prompt, Prompt) else parse_prompt(prompt)
    colour, shape, motion = classify_colour(frames), classify_shape(frames), classify_motion(frames, p.colour, p.shape)
    return {
        "colour": colour, "shape": shape, "motion": motion,
        "colour_ok": colour == p.colour, "shape_ok": shape == p.shape, "motion_ok": motion == p.motion,
        "all_ok": colour == p.colour and shape == p.shape and motion == p.motion,
        "motion_error_px": motion_error(frames, p),
        "hf_energy": hf_energy(frames),
        "warp_error": warp_error(frames),
    }
