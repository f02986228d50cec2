"""Sigma schedules and expert routing for DCM.

Everything here is plain Python / numpy (no torch, no ComfyUI) so the sampler,
the trainer and the nodes share one definition of the grid, the presets and the
routing rule.

Conventions (dcm-method.md §2): rectified flow ``x_σ = σ·ε + (1−σ)·x0``, the
network is fed ``t = 1000·σ``, and σ is shifted by ``σ(u) = s·u / (1 + (s−1)·u)``
with ``s = 17``.

The 50-point PCM grid used in training::

    sigmas[k]      = σ((k+1)/50)            k = 0..49  (ascending, sigmas[49] = 1)
    sigmas_prev[0] = σ(0.001)               (the lowest point of the 1000-step table)
    sigmas_prev[k] = σ(k/50)                k ≥ 1

Routing: a step whose timestep ``floor(1000·σ)`` (computed in float32, as both the
official code and ComfyUI do) is ``≤ boundary_timestep`` belongs to the detail
expert; every other step belongs to the semantic expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from .errors import DCMScheduleError

Expert = Literal["semantic", "detail"]
SEMANTIC: Expert = "semantic"
DETAIL: Expert = "detail"

#: Flow shift used by DCM in training and in ``InferencePCMFMScheduler(1000, 17, 50)``.
DCM_SHIFT = 17.0
NUM_TRAIN_TIMESTEPS = 1000
PCM_GRID_STEPS = 50

#: Model families the pack knows.
FAMILY_WAN = "wan"
FAMILY_HUNYUAN = "hunyuan_video"
FAMILIES = (FAMILY_WAN, FAMILY_HUNYUAN)

#: Inference routing threshold of the official code (Wan: inference_wan.py, HY: inference_hy.py).
DEFAULT_BOUNDARY_TIMESTEP = {FAMILY_WAN: 978.0, FAMILY_HUNYUAN: 981.0}

#: First grid index of the semantic sub-trajectory in training (Wan K0 = 35, HY K0 = 38).
DEFAULT_K0 = {FAMILY_WAN: 35, FAMILY_HUNYUAN: 38}

#: Recommended preset per family.
DEFAULT_PRESET = {FAMILY_WAN: "wan2.1-t2v-6step", FAMILY_HUNYUAN: "hunyuan-t2v-4step"}

#: The hand-picked official sigma lists (terminal 0 included).
OFFICIAL_PRESETS: dict[str, tuple[float, ...]] = {
    "wan2.1-t2v-6step": (1.0, 0.992, 0.982, 0.949, 0.905, 0.81, 0.0),
    "hunyuan-t2v-4step": (1.0, 0.992, 0.9818, 0.9124, 0.0),
}

PRESET_PER_EXPERT_UNIFORM = "per-expert-uniform"
PRESET_PCM_DEFAULT = "pcm-default"
PRESET_CUSTOM = "custom"

#: Every preset name, in the order the nodes show them. Saved workflows store these strings.
PRESET_NAMES: tuple[str, ...] = (
    "wan2.1-t2v-6step",
    "hunyuan-t2v-4step",
    PRESET_PER_EXPERT_UNIFORM,
    PRESET_PCM_DEFAULT,
    PRESET_CUSTOM,
)


# --------------------------------------------------------------------------- grid


def flow_shift(u: float | np.ndarray, shift: float = DCM_SHIFT) -> float | np.ndarray:
    """Shifted flow-matching sigma ``σ(u) = s·u / (1 + (s−1)·u)``."""
    return shift * u / (1.0 + (shift - 1.0) * u)


@dataclass(frozen=True)
class PCMGrid:
    """The 50-point training grid (ascending) shared by the trainer and the schedules."""

    shift: float
    sigmas: tuple[float, ...]
    sigmas_prev: tuple[float, ...]

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)


def pcm_grid(shift: float = DCM_SHIFT, steps: int = PCM_GRID_STEPS) -> PCMGrid:
    """Build the PCM grid exactly as DCM's ``EulerSolver`` does (dcm-method.md §2).

    ``sigmas[k] = σ((k+1)/steps)``; ``sigmas_prev[0] = σ(1/NUM_TRAIN_TIMESTEPS)`` and
    ``sigmas_prev[k] = σ(k/steps)`` for ``k ≥ 1``.
    """
    if steps < 1 or NUM_TRAIN_TIMESTEPS % steps:
        raise DCMScheduleError(f"grid steps={steps} must divide {NUM_TRAIN_TIMESTEPS}; DCM uses 50.")
    ratio = NUM_TRAIN_TIMESTEPS // steps
    # The 1000-point ascending table of diffusers' FlowMatchEulerDiscreteScheduler, asc[i] = σ((i+1)/1000).
    asc = [float(flow_shift((i + 1) / NUM_TRAIN_TIMESTEPS, shift)) for i in range(NUM_TRAIN_TIMESTEPS)]
    sig = tuple(asc[ratio * k + ratio - 1] for k in range(steps))
    prev = (asc[0],) + tuple(asc[ratio * k - 1] for k in range(1, steps))
    return PCMGrid(shift=shift, sigmas=sig, sigmas_prev=prev)


def inference_pcm_sigmas(shift: float = DCM_SHIFT, steps: int = PCM_GRID_STEPS) -> list[float]:
    """Descending 50-point list of ``InferencePCMFMScheduler``: ``σ((50−j)/50)``, j = 0..49."""
    return [float(flow_shift((steps - j) / steps, shift)) for j in range(steps)]


# --------------------------------------------------------------------------- routing


def timestep_of(sigma: float) -> float:
    """The network timestep ``1000·σ`` computed in float32 (as the official code and ComfyUI do)."""
    return float(np.float32(sigma) * np.float32(NUM_TRAIN_TIMESTEPS))


def validate_boundary(boundary_timestep: float) -> float:
    b = float(boundary_timestep)
    if not math.isfinite(b) or not (0.0 < b < NUM_TRAIN_TIMESTEPS):
        raise DCMScheduleError(
            f"boundary_timestep={boundary_timestep!r} is outside (0, 1000). Use the family default: "
            f"978 for Wan2.1, 981 for HunyuanVideo (steps with floor(1000·σ) ≤ boundary go to the detail expert)."
        )
    return b


def expert_for_sigma(sigma: float, boundary_timestep: float) -> Expert:
    """The expert that owns a step starting at ``sigma`` (``floor(1000·σ) ≤ boundary`` → detail)."""
    return DETAIL if math.floor(timestep_of(sigma)) <= boundary_timestep else SEMANTIC


def route(sigmas: Sequence[float], boundary_timestep: float) -> list[Expert]:
    """Expert for each step of a sigma list (one entry per step, i.e. ``len(sigmas) − 1``)."""
    b = validate_boundary(boundary_timestep)
    return [expert_for_sigma(s, b) for s in list(sigmas)[:-1]]


def split_index(sigmas: Sequence[float], boundary_timestep: float) -> int:
    """Index of the switch sigma: the first step owned by the detail expert.

    Returns ``len(sigmas) − 1`` when no step belongs to the detail expert and 0 when every
    step does. Routing is assumed monotone (sigmas descending), which :func:`validate_sigmas`
    guarantees.
    """
    b = validate_boundary(boundary_timestep)
    s = list(sigmas)
    for i, sigma in enumerate(s[:-1]):
        if expert_for_sigma(sigma, b) == DETAIL:
            return i
    return len(s) - 1


def split_sigmas(sigmas: Sequence[float], boundary_timestep: float) -> tuple[list[float], list[float]]:
    """Split a sigma list into the semantic and the detail segment.

    The two segments share the switch sigma: ``semantic[-1] == detail[0]``. A segment with a
    single entry has no steps (that expert is not used).
    """
    s = [float(x) for x in sigmas]
    i = split_index(s, boundary_timestep)
    return s[: i + 1], s[i:]


# --------------------------------------------------------------------------- presets


#: Sigmas may exceed 1 by float noise only (flow models live in σ ∈ [0, 1]).
SIGMA_MAX = 1.0 + 1e-4


def validate_sigmas(sigmas: Sequence[float], *, source: str = "sigmas", terminal_zero: bool = True) -> list[float]:
    """The pack's one sigma check: ≥ 2 values (one step), finite, within [0, 1], strictly descending.

    ``terminal_zero`` (full schedules: presets, custom lists, the reference sampler) also requires the
    last value to be 0; a SIGMAS socket may carry a partial list (e.g. a split segment), so the nodes
    pass ``terminal_zero=False``. ``source`` starts every message (a node name or an input name).
    """
    s = [float(x) for x in sigmas]
    if len(s) < 2:
        raise DCMScheduleError(
            f"{source}: the sigma list has {len(s)} value(s) {s}; it needs at least two (one step). Use a preset "
            f"such as 'wan2.1-t2v-6step', connect DCM Schedule, or give a list like '1.0, 0.992, 0.982'."
        )
    for i, x in enumerate(s):
        if not math.isfinite(x) or not (0.0 <= x <= SIGMA_MAX):
            raise DCMScheduleError(
                f"{source}: sigma #{i} = {x} is outside [0, 1]. DCM experts are flow models: sigmas run from 1.0 "
                f"(pure noise) down to 0 (clean)."
            )
    for i in range(len(s) - 1):
        if not s[i] > s[i + 1]:
            raise DCMScheduleError(
                f"{source}: sigmas must be strictly descending, but sigma #{i} = {s[i]} is followed by "
                f"#{i + 1} = {s[i + 1]}. Sort them from 1.0 down and remove duplicates."
            )
    if terminal_zero and s[-1] != 0.0:
        raise DCMScheduleError(f"{source}: the last sigma must be 0 (got {s[-1]}); it marks the clean sample.")
    return s


def parse_custom_sigmas(text: str) -> list[float]:
    """Parse ``"1.0, 0.992, 0.982"`` (commas / spaces / newlines) and append the terminal 0.

    Values must be strictly descending and within (0, 1]; a trailing ``0`` may be given.
    """
    src = "custom_sigmas"
    tokens = [t for t in text.replace(",", " ").replace(";", " ").split() if t]
    if not tokens:
        raise DCMScheduleError(
            f"{src} is empty. Type a descending list of sigmas in (0, 1], e.g. '1.0, 0.992, 0.982, 0.949', "
            f"or pick a preset. A terminal 0 is appended for you."
        )
    values: list[float] = []
    for tok in tokens:
        try:
            values.append(float(tok))
        except ValueError:
            raise DCMScheduleError(f"{src}: {tok!r} is not a number. Use decimals such as 0.992.") from None
    if values[-1] == 0.0:
        values = values[:-1]
    if not values:
        raise DCMScheduleError(f"{src}: only a 0 was given; add at least one sigma in (0, 1].")
    return validate_sigmas(values + [0.0], source=src)


def pcm_default_sigmas(steps: int, shift: float = DCM_SHIFT) -> list[float]:
    """PCM default spacing: ``idx = floor(linspace(0, 50, n, endpoint=False))`` on the inference grid."""
    if not 1 <= int(steps) <= PCM_GRID_STEPS:
        raise DCMScheduleError(f"pcm-default: steps={steps} must be between 1 and {PCM_GRID_STEPS}.")
    table = inference_pcm_sigmas(shift)
    idx = np.floor(np.linspace(0, PCM_GRID_STEPS, int(steps), endpoint=False)).astype(int)
    return validate_sigmas([table[i] for i in idx] + [0.0], source="pcm-default")


def per_expert_uniform_sigmas(
    semantic_steps: int,
    detail_steps: int,
    boundary_timestep: float,
    shift: float = DCM_SHIFT,
) -> list[float]:
    """N semantic + M detail steps spread uniformly over each expert's part of the grid.

    The authors' advice for other step counts (DCM issue #15: "evenly splitting the total steps
    between the two experts … uniformly sampled within each sub-trajectory"). The rule:

    1. Partition the 50-point grid ``sigmas[k] = σ((k+1)/50)`` by the routing rule: the
       semantic sub-trajectory is every k with ``floor(1000·sigmas[k]) > boundary`` (the top
       ``L`` points), the detail sub-trajectory the other ``K = 50 − L`` points.
    2. In each sub-trajectory, starting at its top point, take PCM spacing
       ``floor(linspace(0, size, n, endpoint=False))`` grid indices downward.
    3. Append the terminal 0.

    By construction every semantic step is routed to the semantic expert and every detail
    step to the detail expert. With HunyuanVideo's boundary 981 and 2 + 2 steps this gives
    ``[1.0, 0.99204, 0.98176, 0.91243, 0]``, the official ``hunyuan-t2v-4step`` list to 4
    decimals.
    """
    b = validate_boundary(boundary_timestep)
    n, m = int(semantic_steps), int(detail_steps)
    grid = pcm_grid(shift)
    detail_ks = [k for k in range(grid.num_steps) if expert_for_sigma(grid.sigmas[k], b) == DETAIL]
    k_split = len(detail_ks)  # grid points 0..k_split-1 are detail, k_split..49 semantic
    n_sem_points = grid.num_steps - k_split
    if n < 1 or m < 1:
        raise DCMScheduleError(
            f"per-expert-uniform: semantic_steps={n} and detail_steps={m} must both be ≥ 1 "
            f"(each expert needs at least one step)."
        )
    if n > n_sem_points:
        raise DCMScheduleError(
            f"per-expert-uniform: semantic_steps={n} but only {n_sem_points} grid points lie above "
            f"boundary_timestep={b:g}. Use at most {n_sem_points} semantic steps or lower the boundary."
        )
    if m > k_split:
        raise DCMScheduleError(
            f"per-expert-uniform: detail_steps={m} but only {k_split} grid points lie at or below "
            f"boundary_timestep={b:g}. Use at most {k_split} detail steps or raise the boundary."
        )
    sem_idx = np.floor(np.linspace(0, n_sem_points, n, endpoint=False)).astype(int)
    det_idx = np.floor(np.linspace(0, k_split, m, endpoint=False)).astype(int)
    top = grid.num_steps - 1
    sem = [grid.sigmas[top - i] for i in sem_idx]
    det = [grid.sigmas[k_split - 1 - i] for i in det_idx]
    return validate_sigmas(sem + det + [0.0], source="per-expert-uniform")


def build_sigmas(
    preset: str,
    *,
    steps: int = 6,
    semantic_steps: int = 3,
    detail_steps: int = 3,
    boundary_timestep: float = DEFAULT_BOUNDARY_TIMESTEP[FAMILY_WAN],
    custom_sigmas: str = "",
    shift: float = DCM_SHIFT,
) -> list[float]:
    """The sigma list (terminal 0 included) for a preset name; see :data:`PRESET_NAMES`."""
    if preset in OFFICIAL_PRESETS:
        return list(OFFICIAL_PRESETS[preset])
    if preset == PRESET_PCM_DEFAULT:
        return pcm_default_sigmas(steps, shift)
    if preset == PRESET_PER_EXPERT_UNIFORM:
        return per_expert_uniform_sigmas(semantic_steps, detail_steps, boundary_timestep, shift)
    if preset == PRESET_CUSTOM:
        return parse_custom_sigmas(custom_sigmas)
    raise DCMScheduleError(f"Unknown preset {preset!r}. Choose one of: {', '.join(PRESET_NAMES)}.")
