"""The toy video world: procedural clips of coloured shapes, a latent map, a text encoder.

Everything is deterministic from a seed and cheap enough for two CPU cores:

* **Clips** — one shape (circle, square or diamond) of one colour on a plain dark
  background, ``FRAMES`` frames of ``SIZE × SIZE`` RGB pixels, moving left / right / up /
  down, bouncing off the floor, growing or shrinking. Edges are soft (a sigmoid of the
  signed distance), so clips are smooth functions of position and size.
* **Latents** — a fixed linear map between 2×2 RGB pixel patches (12 numbers in [−1, 1])
  and the 16 latent channels: ``z = LATENT_GAIN · Q · p`` with ``Q`` a 16×12 matrix with
  orthonormal columns (QR of a seeded Gaussian). It is invertible on its range:
  ``p = Qᵀ z / LATENT_GAIN`` recovers the pixels exactly (and projects any other latent to
  the nearest image). A clip becomes a ``[16, FRAMES, SIZE/2, SIZE/2]`` latent, which the
  tiny Wan transformer patchifies 2×2 like the real one.
* **Text** — prompts ``"<colour> <shape> <motion>"`` (e.g. ``"red circle moving right"``).
  Each vocabulary word has a fixed unit vector of width 4096 (seeded by the word's
  SHA-256), so the models keep ComfyUI's Wan text width; a prompt is the sequence of its
  word vectors, zero-padded to ``TEXT_TOKENS`` (like UMT5's zero padding). ``""`` encodes
  to all zeros (the unconditional / caption-dropout embedding).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DCMConfigError

SIZE = 24  # pixels per side
FRAMES = 6  # latent frames == video frames (no temporal compression in the toy map)
PATCH = 2  # latent cell = 2×2 pixels
LATENT_CHANNELS = 16
TEXT_DIM = 4096
TEXT_TOKENS = 8
LATENT_GAIN = 1.6  # brings latents of typical clips near unit standard deviation
_MAP_SEED = 20260611

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.2, 0.85, 0.25),
    "blue": (0.25, 0.4, 1.0),
    "yellow": (0.95, 0.9, 0.2),
    "white": (0.95, 0.95, 0.95),
    "magenta": (0.9, 0.25, 0.85),
}
SHAPES = ("circle", "square", "diamond")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "growing", "shrinking")
BACKGROUNDS = ((0.05, 0.05, 0.08), (0.12, 0.1, 0.18), (0.05, 0.14, 0.12), (0.16, 0.12, 0.08))
SPEED = 2.0  # pixels per frame for translations
GROWTH = 1.0  # radius change per frame for growing / shrinking
GRAVITY = 1.0  # pixels per frame² for bouncing

VOCABULARY: tuple[str, ...] = tuple(COLOURS) + SHAPES + ("moving", "left", "right", "up", "down", "bouncing",
                                                          "growing", "shrinking")


def all_prompts() -> list[str]:
    return [f"{c} {s} {m}" for c in COLOURS for s in SHAPES for m in MOTIONS]


@dataclass(frozen=True)
class Prompt:
    colour: str
    shape: str
    motion: str

    @property
    def text(self) -> str:
        return f"{self.colour} {self.shape} {self.motion}"


def parse_prompt(text: str) -> Prompt:
    """Parse ``"<colour> <shape> <motion>"``; raise with the vocabulary on anything else."""
    words = text.lower().split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    motion = None
    for m in MOTIONS:
        parts = m.split()
        if all(p in words for p in parts) and (len(parts) == 1 or words.index(parts[0]) + 1 == words.index(parts[1])):
            motion = m
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown or colour is None or shape is None or motion is None:
        raise DCMConfigError(
            f"toy prompt {text!r} is not in the toy world's language"
            + (f" (unknown words: {', '.join(unknown)})" if unknown else "")
            + f". Use '<colour> <shape> <motion>' with colour in {list(COLOURS)}, shape in {list(SHAPES)}, "
            f"motion in {list(MOTIONS)}, e.g. 'red circle moving right'."
        )
    return Prompt(colour, shape, motion)


# ----------------------------------------------------------------------------- text


def _word_vector(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(TEXT_DIM)
    return (v / np.linalg.norm(v) * math.sqrt(TEXT_DIM) * 0.05).astype(np.float32)


_WORD_VECTORS = {w: _word_vector(w) for w in VOCABULARY}


def encode_text(text: str) -> torch.Tensor:
    """``[TEXT_TOKENS, 4096]`` embedding of a prompt (all zeros for ``""``)."""
    out = np.zeros((TEXT_TOKENS, TEXT_DIM), dtype=np.float32)
    if text.strip():
        p = parse_prompt(text)
        for i, w in enumerate(p.text.split()):
            out[i] = _WORD_VECTORS[w]
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- latent map


def _latent_map() -> np.ndarray:
    g = np.random.default_rng(_MAP_SEED).standard_normal((LATENT_CHANNELS, 3 * PATCH * PATCH))
    q, r = np.linalg.qr(g)  # q: 16×12, orthonormal columns
    q = q * np.sign(np.diag(r))[None, :]
    return q.astype(np.float32)


Q = torch.from_numpy(_latent_map())


def frames_to_latent(frames: torch.Tensor) -> torch.Tensor:
    """``[F, 3, SIZE, SIZE]`` RGB in [−1, 1] → ``[16, F, SIZE/2, SIZE/2]`` latent."""
    f, c, h, w = frames.shape
    p = frames.reshape(f, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(
        f, h // PATCH, w // PATCH, c * PATCH * PATCH)
    z = LATENT_GAIN * p.float() @ Q.T  # [F, h, w, 16]
    return z.permute(3, 0, 1, 2).contiguous()


def latent_to_frames(latent: torch.Tensor) -> torch.Tensor:
    """``[16, F, h, w]`` latent → ``[F, 3, 2h, 2w]`` RGB in [−1, 1] (least-squares inverse)."""
    c, f, h, w = latent.shape
    p = latent.float().permute(1, 2, 3, 0) @ Q / LATENT_GAIN  # [F, h, w, 12]
    p = p.reshape(f, h, w, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(f, 3, h * PATCH, w * PATCH)
    return p.clamp(-1.0, 1.0)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``[F, 3, H, W]`` in [−1, 1] → ``[F, H, W, 3]`` uint8."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class ClipState:
    """Per-frame ground truth of a clip: centre (x, y) and radius in pixels."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    radii: tuple[float, ...]


def simulate(prompt: Prompt, x0: float, y0: float, r0: float, frames: int = FRAMES, *, speed: float = SPEED,
             growth: float = GROWTH) -> ClipState:
    """The motion law of the toy world, from a start state (``speed`` px/frame for translations,
    ``growth`` px/frame of radius for growing / shrinking; world v2 uses slower, larger objects)."""
    xs, ys, rs = [x0], [y0], [r0]
    vy = 0.0
    for _ in range(1, frames):
        x, y, r = xs[-1], ys[-1], rs[-1]
        m = prompt.motion
        if m == "moving left":
            x -= speed
        elif m == "moving right":
            x += speed
        elif m == "moving up":
            y -= speed
        elif m == "moving down":
            y += speed
        elif m == "growing":
            r += growth
        elif m == "shrinking":
            r = max(1.0, r - growth)
        elif m == "bouncing":
            vy += GRAVITY
            y += vy
            floor = SIZE - 1 - r
            if y > floor:
                y = floor - (y - floor)
                vy = -abs(vy) * 0.9
        xs.append(x)
        ys.append(y)
        rs.append(r)
    return ClipState(tuple(xs), tuple(ys), tuple(rs))


def start_state(prompt: Prompt, rng: np.random.Generator) -> tuple[float, float, float]:
    """A random start (centre, radius) that keeps the motion mostly inside the frame."""
    r = rng.uniform(3.5, 5.0)
    travel = SPEED * (FRAMES - 1)
    x = rng.uniform(r + 1, SIZE - r - 1)
    y = rng.uniform(r + 1, SIZE - r - 1)
    if prompt.motion == "moving right":
        x = rng.uniform(r + 1, SIZE - r - 1 - travel)
    elif prompt.motion == "moving left":
        x = rng.uniform(r + 1 + travel, SIZE - r - 1)
    elif prompt.motion == "moving down":
        y = rng.uniform(r + 1, SIZE - r - 1 - travel)
    elif prompt.motion == "moving up":
        y = rng.uniform(r + 1 + travel, SIZE - r - 1)
    elif prompt.motion == "bouncing":
        y = rng.uniform(r + 1, SIZE / 2)
    elif prompt.motion == "growing":
        r = rng.uniform(2.5, 3.5)
    elif prompt.motion == "shrinking":
        r = rng.uniform(6.5, 7.5)
        x = rng.uniform(r, SIZE - r)
        y = rng.uniform(r, SIZE - r)
    return float(x), float(y), float(r)


def _coverage(shape: str, x: float, y: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = xx - x, yy - y
    if shape == "circle":
        d = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        d = np.maximum(np.abs(dx), np.abs(dy)) - r * 0.88
    else:  # diamond
        d = (np.abs(dx) + np.abs(dy)) / math.sqrt(2.0) - r * 0.92
    return 1.0 / (1.0 + np.exp(np.clip(d * 2.5, -30, 30)))


def render(prompt: Prompt, state: ClipState, background: tuple[float, float, float]) -> torch.Tensor:
    """``[F, 3, SIZE, SIZE]`` RGB in [−1, 1]."""
    col = np.array(COLOURS[prompt.colour], dtype=np.float32)[:, None, None]
    bg = np.array(background, dtype=np.float32)[:, None, None]
    out = []
    for x, y, r in zip(state.xs, state.ys, state.radii):
        a = _coverage(prompt.shape, x, y, r)[None]
        out.append(bg * (1 - a) + col * a)
    return torch.from_numpy(np.stack(out) * 2.0 - 1.0)


@dataclass(frozen=True)
class Clip:
    prompt: Prompt
    state: ClipState
    background: tuple[float, float, float]
    frames: torch.Tensor  # [F, 3, SIZE, SIZE] in [−1, 1]
    latent: torch.Tensor  # [16, F, SIZE/2, SIZE/2]


def make_clip(prompt: str | Prompt, seed: int) -> Clip:
    """The clip for a prompt and seed (same inputs → same clip, on any machine)."""
    p = prompt if isinstance(prompt, Prompt) else parse_prompt(prompt)
    rng = np.random.default_rng(seed)
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    state = simulate(p, *start_state(p, rng))
    frames = render(p, state, bg)
    return Clip(p, state, bg, frames, frames_to_latent(frames))


def random_clip(seed: int) -> Clip:
    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    return make_clip(prompts[int(rng.integers(len(prompts)))], int(rng.integers(2**31)))


def latent_shape(batch: int = 1) -> tuple[int, int, int, int, int]:
    return (batch, LATENT_CHANNELS, FRAMES, SIZE // PATCH, SIZE // PATCH)


# ----------------------------------------------------------------------------- measurement


def track(frames: torch.Tensor, colour: str) -> list[tuple[float, float, float]]:
    """Estimate (x, y, radius) per frame from a rendered / generated clip.

    The foreground is the set of pixels closer to the prompt's colour than to the clip's
    background (taken as the per-channel median of the border pixels); radius from area.
    """
    rgb = (frames.clamp(-1, 1) + 1) / 2  # [F, 3, H, W] in [0, 1]
    col = torch.tensor(COLOURS[colour]).view(1, 3, 1, 1)
    border = torch.cat([rgb[:, :, 0, :], rgb[:, :, -1, :], rgb[:, :, :, 0], rgb[:, :, :, -1]], dim=-1)
    bg = border.median(dim=-1).values.view(-1, 3, 1, 1)
    d_fg = ((rgb - col) ** 2).sum(1)
    d_bg = ((rgb - bg) ** 2).sum(1)
    w = torch.sigmoid((d_bg - d_fg) * 12.0)  # soft mask
    yy, xx = torch.meshgrid(torch.arange(rgb.shape[2]) + 0.5, torch.arange(rgb.shape[3]) + 0.5, indexing="ij")
    out = []
    for m in w:
        area = float(m.sum())
        if area < 1e-3:
            out.append((float("nan"), float("nan"), 0.0))
            continue
        out.append((float((m * xx).sum() / area), float((m * yy).sum() / area), math.sqrt(area / math.pi)))
    return out


def motion_error(frames: torch.Tensor, prompt: str | Prompt) -> float:
    """Temporal-consistency error of a clip against the toy world's motion law (pixels).

    Tracks the shape in every frame, simulates the prompt's motion from the tracked first
    frame, and returns the mean distance between tracked and simulated (x, y, radius)
    over frames 1..F−1. A static, flickering or wrongly moving clip scores high; a clip
    rendered by the world itself scores near 0 (up to tracking error).
    """
    p = prompt if isinstance(prompt, Prompt) else parse_prompt(prompt)
    return track_error(p, track(frames, p.colour))


def track_error(p: Prompt, tr, *, speed: float = SPEED) -> float:
    """Mean distance (px) over frames 1..F−1 between a track ``[(x, y, r)]`` and ``p``'s motion law simulated from
    the track's first frame (translations at ``speed`` px/frame); a frame where the object was lost counts as ``SIZE``."""
    x0, y0, r0 = tr[0]
    if not all(math.isfinite(v) for v in (x0, y0)):
        return float(SIZE)
    sim = simulate(p, x0, y0, r0, frames=len(tr), speed=speed)
    errs = []
    for i in range(1, len(tr)):
        x, y, r = tr[i]
        if not math.isfinite(x):
            errs.append(float(SIZE))
            continue
        errs.append(math.sqrt((x - sim.xs[i]) ** 2 + (y - sim.ys[i]) ** 2 + (r - sim.radii[i]) ** 2))
    return float(np.mean(errs))
