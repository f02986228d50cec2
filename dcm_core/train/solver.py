"""The training-time PCM solver: grid look-ups, index sampling and the consistency arithmetic.

This is the trainer's half of the math the sampler uses: the grid comes from
:func:`dcm_core.schedule.pcm_grid` and every step from :mod:`dcm_core.flow`, so training
targets and sampling steps are one definition (dcm-method.md §2, §5.2, §6.2).

Stage semantic (single phase, boundary ``σ_b = sigmas_prev[K0]``)::

    k ~ U{K0 … 49},  σ = sigmas[k],  σ' = sigmas_prev[k]
    x_t  = σ·ε + (1−σ)·x0                                  flow.add_noise
    ŷ    = x_t + (σ_b − σ)·v_student(x_t, σ)               flow.flow_step   (student jump)
    x'   = x_t + (σ' − σ)·v_teacher(x_t, σ)                flow.flow_step   (one teacher Euler step)
    y    = x' + (σ_b − σ')·v_target(x', σ')                flow.flow_step   (target jump, no grad)

Phased (``schedule.phase_edges = [e_0 = K0, e_1, …]``, stage semantic only, the PCM baseline): the same with a
per-sample ``σ_b = sigmas_prev[b(k)]``, ``b(k)`` = the largest edge ≤ k, so every phase is its own consistency
sub-trajectory; at an edge (k = b(k)) the target is x' itself, as at K0 in the single phase.

Stage detail: the same with ``k ~ U{0 … K0−1}`` and ``σ_b = σ_end = sigmas_prev[0]``, plus
the adversarial re-noising of ŷ (fake) and y (real) with ONE shared noise to
``σ_a = sigmas_prev[adv_index]``, ``adv_index ~ U{0 … K0−1}`` (:func:`flow.renoise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..flow import add_noise, flow_step, renoise
from ..schedule import DCM_SHIFT, PCM_GRID_STEPS, pcm_grid
from .config import STAGE_DETAIL, STAGE_SEMANTIC


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Teacher CFG in the official sense ``v_c + w·(v_c − v_u)`` (w = 5 for Wan: an effective scale of 6).

    ``scale == 0`` (or no unconditional output) returns ``v_c`` unchanged (HunyuanVideo).
    """
    if scale == 0 or v_uncond is None:
        return v_cond.float()
    vc = v_cond.float()
    return vc + scale * (vc - v_uncond.float())


def renoise_coefficients(sigma_a: torch.Tensor | float, sigma_end: float) -> tuple:
    """The two coefficients of the adversarial re-noising ``a·x + b·n`` (dcm-method.md §6.2 step 5).

    ``a = (1 − σ_a)/(1 − σ_end)`` on the sample and ``b = (σ_a − σ_end)/(1 − σ_end)`` on the noise.
    """
    a = (1.0 - sigma_a) / (1.0 - sigma_end)
    b = (sigma_a - sigma_end) / (1.0 - sigma_end)
    return a, b


def boundary_k0(boundary_timestep: float, shift: float = DCM_SHIFT, steps: int = PCM_GRID_STEPS) -> int:
    """K0 of a two-transformer base: the first grid index whose σ is above the model's own boundary.

    Every semantic-stage teacher call (σ[k], k ≥ K0) then lies above ``boundary_timestep / 1000`` (the high-noise
    transformer) and every detail-stage call (σ[k] and σ_prev[k], k < K0) at or below it (the low-noise one). Wan2.2
    on the shift-17, 50-point grid: T2V A14B (875) → K0 = 14 (σ[14] = 0.8793, semantic phase end σ_prev[14] =
    0.8686); I2V A14B (900) → K0 = 17 (σ[17] = 0.9053, σ_prev[17] = 0.8975).
    """
    grid = pcm_grid(shift, steps)
    for k, s in enumerate(grid.sigmas):
        if s * 1000.0 > boundary_timestep:
            return max(1, k)
    raise ValueError(f"no grid point lies above the boundary {boundary_timestep}")


@dataclass
class IndexDraw:
    """The per-sample grid indices and sigmas of one training step."""

    index: torch.Tensor  # [B] long
    sigma: torch.Tensor  # [B] float32, sigmas[k]
    sigma_prev: torch.Tensor  # [B] float32, sigmas_prev[k]
    sigma_boundary: float | torch.Tensor  # σ_b (semantic: sigmas_prev[K0]; detail: sigmas_prev[0]); phased: [B] float32
    boundary_index: torch.Tensor | None = None  # phased: [B] long, the phase edge of each k; else None


class PCMSolver:
    """The 50-point PCM grid as float32 tensors plus the stage's index ranges.

    Args:
        stage: ``"semantic"`` or ``"detail"``.
        k0: first grid index of the semantic sub-trajectory (Wan 35, HunyuanVideo 38).
        shift: flow shift (17).
        steps: grid size (50).
        phase_edges: PCM phases of the semantic stage (``schedule.phase_edges``): sorted grid indices starting at
            ``k0``; each k is trained towards ``sigmas_prev`` of the largest edge ≤ k. Empty: one phase, and
            ``IndexDraw.sigma_boundary`` stays the float of today.
    """

    def __init__(
        self,
        stage: str,
        k0: int,
        shift: float = DCM_SHIFT,
        steps: int = PCM_GRID_STEPS,
        phase_edges: Sequence[int] = (),
    ) -> None:
        if stage not in (STAGE_SEMANTIC, STAGE_DETAIL):
            raise ValueError(f"stage must be 'semantic' or 'detail', got {stage!r}")
        grid = pcm_grid(shift, steps)
        k0_min = 0 if stage == STAGE_SEMANTIC else 1  # k0 = 0: one phase over the whole trajectory
        if not k0_min <= k0 <= grid.num_steps - 1:
            raise ValueError(f"k0={k0} must lie in [{k0_min}, {grid.num_steps - 1}] for the {stage} stage")
        self.stage = stage
        self.k0 = int(k0)
        self.grid = grid
        self.sigmas = torch.tensor(grid.sigmas, dtype=torch.float32)
        self.sigmas_prev = torch.tensor(grid.sigmas_prev, dtype=torch.float32)
        self.phase_edges = tuple(int(e) for e in phase_edges)
        self._edge_of: torch.Tensor | None = None
        if self.phase_edges:
            e = self.phase_edges
            if stage != STAGE_SEMANTIC:
                raise ValueError(f"phase_edges={list(e)}: phases exist in the semantic stage only, this is the {stage} stage")
            if e[0] != self.k0 or any(b <= a for a, b in zip(e, e[1:])) or e[-1] > grid.num_steps - 1:
                raise ValueError(
                    f"phase_edges={list(e)} must be sorted, unique, start at k0={self.k0} and lie below {grid.num_steps}"
                )
            # edge_of[k] = the largest edge ≤ k (indices below k0 are never drawn; they map to k0)
            edge_of = [self.k0] * grid.num_steps
            for lo, hi in zip(e, (*e[1:], grid.num_steps)):
                edge_of[lo:hi] = [lo] * (hi - lo)
            self._edge_of = torch.tensor(edge_of, dtype=torch.long)

    # ------------------------------------------------------------------ ranges

    @property
    def index_range(self) -> tuple[int, int]:
        """Half-open ``[lo, hi)`` range of the training index k."""
        if self.stage == STAGE_SEMANTIC:
            return self.k0, self.grid.num_steps
        return 0, self.k0

    @property
    def boundary_index(self) -> int:
        """The phase end of the stage: ``K0`` (semantic) or ``0`` (detail)."""
        return self.k0 if self.stage == STAGE_SEMANTIC else 0

    @property
    def sigma_boundary(self) -> float:
        """σ_b = ``sigmas_prev[boundary_index]``: Wan semantic 0.975410, HY 0.981763, detail 0.016732."""
        return float(self.grid.sigmas_prev[self.boundary_index])

    @property
    def phased(self) -> bool:
        """Whether the trajectory is split into PCM phases (per-sample boundaries)."""
        return self._edge_of is not None

    @property
    def phase_sigmas(self) -> list[float]:
        """``sigmas_prev`` of every phase edge (empty when not phased)."""
        return [float(self.grid.sigmas_prev[e]) for e in self.phase_edges]

    @property
    def adv_index_range(self) -> tuple[int, int]:
        """Half-open range of the adversarial index: ``end … end + K0 − 1`` with end = 0 (detail stage)."""
        end = self.boundary_index
        return end, end + self.k0

    # ------------------------------------------------------------------ draws

    def draw(self, batch: int, generator: torch.Generator) -> IndexDraw:
        """Draw ``k`` per sample from the stage's range (official ``randint(lo, hi, (bsz,))``)."""
        lo, hi = self.index_range
        return self.index_draw(torch.randint(lo, hi, (batch,), generator=generator))

    def index_draw(self, k: torch.Tensor) -> IndexDraw:
        """The :class:`IndexDraw` of given grid indices ``k`` [B]."""
        k = k.long()
        if self._edge_of is None:
            return IndexDraw(k, self.sigmas[k], self.sigmas_prev[k], self.sigma_boundary)
        b = self._edge_of[k]
        return IndexDraw(k, self.sigmas[k], self.sigmas_prev[k], self.sigmas_prev[b], b)

    def draw_adv_index(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Draw the adversarial grid index per sample (share it across processes: see the trainer)."""
        lo, hi = self.adv_index_range
        return torch.randint(lo, hi, (batch,), generator=generator)

    def adv_sigma(self, adv_index: torch.Tensor) -> torch.Tensor:
        """σ_a = ``sigmas_prev[adv_index]``."""
        return self.sigmas_prev[adv_index.cpu()]

    # ------------------------------------------------------------------ arithmetic (dcm_core.flow)

    @staticmethod
    def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x_t = σ·ε + (1−σ)·x0``."""
        return add_noise(x0, noise, sigma)

    def teacher_step(self, x_t: torch.Tensor, v_teacher: torch.Tensor, draw: IndexDraw) -> torch.Tensor:
        """One teacher Euler step down the grid: ``x' = x_t + (σ' − σ)·v_T`` (official ``euler_step``)."""
        return flow_step(x_t, v_teacher, draw.sigma, draw.sigma_prev)

    def student_prediction(self, x_t: torch.Tensor, v_student: torch.Tensor, draw: IndexDraw) -> torch.Tensor:
        """ŷ = ``x_t + (σ_b − σ)·v_s`` (σ_b per sample when phased)."""
        return flow_step(x_t, v_student, draw.sigma, draw.sigma_boundary)

    def target(self, x_prev: torch.Tensor, v_target: torch.Tensor, draw: IndexDraw) -> torch.Tensor:
        """y = ``x' + (σ_b − σ')·v_tgt`` (equals x' when k is the phase end, the boundary condition)."""
        return flow_step(x_prev, v_target, draw.sigma_prev, draw.sigma_boundary)

    def adversarial_pair(
        self,
        fake_x0: torch.Tensor,
        real_x0: torch.Tensor,
        noise: torch.Tensor,
        sigma_a: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-noise ŷ (fake) and y (real) from σ_end to σ_a with ONE shared noise (dcm-method.md §6.2 step 5).

        Detail stage only, so σ_end is the one boundary ``sigmas_prev[0]`` (phases are refused outside stage semantic).
        """
        end = self.sigma_boundary
        return renoise(fake_x0, noise, end, sigma_a), renoise(real_x0, noise, end, sigma_a)
