"""Rectified-flow arithmetic shared by the sampler and the trainer.

One definition of each formula, so the losses the trainer optimises and the steps the
sampler takes cannot drift apart (dcm-method.md §2, §3.1, §5.2, §6.2). Arithmetic is
done in float32 whatever the model's dtype, as the official scheduler does.
"""

from __future__ import annotations

import torch


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _coef(c, ref: torch.Tensor) -> torch.Tensor | float:
    """Scalars stay Python floats; per-sample tensors broadcast over all but the batch dim."""
    if isinstance(c, torch.Tensor):
        c = c.to(device=ref.device, dtype=torch.float32)
        if c.ndim == 1 and ref.ndim > 1:
            c = c.view(-1, *([1] * (ref.ndim - 1)))
    return c


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Forward process ``x_σ = σ·ε + (1−σ)·x0``."""
    s = _coef(sigma, x0)
    return s * _f32(noise) + (1.0 - s) * _f32(x0)


def flow_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_to) -> torch.Tensor:
    """Deterministic flow-Euler jump ``x + (σ_to − σ)·v`` (also the PCM "jump to boundary").

    This is ``InferencePCMFMScheduler.step`` and the solver's ``euler_step`` /
    single-phase ``euler_style_multiphase_pred`` in one formula.
    """
    d = _coef(sigma_to, x) - _coef(sigma, x)
    return _f32(x) + d * _f32(v)


def denoised_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """``x0̂ = x − σ·v``."""
    return _f32(x) - _coef(sigma, x) * _f32(v)


def noise_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """``ε̂ = x + (1−σ)·v``."""
    return _f32(x) + (1.0 - _coef(sigma, x)) * _f32(v)


def renoise(x: torch.Tensor, noise: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
    """Linear re-noising from ``sigma_from`` up to ``sigma_to`` with the given noise.

    ``((1−σ_to)·x + (σ_to − σ_from)·n) / (1 − σ_from)`` — the detail stage's adversarial
    re-noising (dcm-method.md §6.2 step 5; σ_from = σ_end = sigmas_prev[0]).
    """
    a = _coef(sigma_to, x)
    b = _coef(sigma_from, x)
    return ((1.0 - a) * _f32(x) + (a - b) * _f32(noise)) / (1.0 - b)
