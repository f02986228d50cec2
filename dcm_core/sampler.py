"""Reference dual-expert sampler (pure torch, no ComfyUI).

This is the numerical definition the ComfyUI nodes, the demo and the trainer's
validation are tested against: the official ``InferencePCMFMScheduler`` loop with a
custom sigma list (dcm-method.md §3.1), one model call per step, routed per step by
:func:`dcm_core.schedule.expert_for_sigma`, arithmetic in float32.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from .errors import DCMSamplingError
from .flow import add_noise, flow_step
from .schedule import Expert, route, validate_boundary, validate_sigmas

#: ``model_fn(x, sigma, expert) -> velocity``: x in model (normalised latent) space, sigma a float.
ModelFn = Callable[[torch.Tensor, float, Expert], torch.Tensor]


class StepCallback(Protocol):
    def __call__(self, step: int, total: int, x: torch.Tensor, expert: Expert, sigma: float) -> None: ...


def check_finite(t: torch.Tensor, *, what: str, step: int, expert: str, sigma: float) -> None:
    """Raise :class:`DCMSamplingError` naming the step and expert if ``t`` has NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise DCMSamplingError(
            f"{what} at step {step} ({expert} expert, sigma={sigma:.6g}) contains {n_nan} NaN and {n_inf} Inf values. "
            f"The model or its weights are broken at this noise level: check the expert file, the weight dtype "
            f"(fp16 overflows on some models; try bf16) and the inputs."
        )


def sample_dcm(
    model_fn: ModelFn,
    noise: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    boundary_timestep: float,
    *,
    latent_image: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    detect_nonfinite: bool = True,
) -> torch.Tensor:
    """Run DCM's deterministic flow-Euler sampler with two experts.

    Args:
        model_fn: ``(x, sigma, expert) -> velocity`` with ``v ≈ ε − x0``.
        noise: standard normal noise, shape ``[B, C, T, H, W]`` (model space).
        sigmas: descending sigma list ending in 0, e.g. ``wan2.1-t2v-6step``.
        boundary_timestep: steps with ``floor(1000·σ) ≤ boundary`` use the detail expert.
        latent_image: clean latent to start from when ``sigmas[0] < 1`` (img2img-style);
            zeros when omitted, so ``sigmas[0] == 1`` starts from pure noise.
        callback: called after every step with ``(step, total, x, expert, sigma)``.
        detect_nonfinite: raise :class:`DCMSamplingError` on NaN/Inf velocities.

    Returns:
        The final sample (float32), the model-space x0 when the list ends in 0.
    """
    s = [float(x) for x in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    s = validate_sigmas(s)
    validate_boundary(boundary_timestep)
    experts = route(s, boundary_timestep)
    x0 = torch.zeros_like(noise, dtype=torch.float32) if latent_image is None else latent_image.float()
    x = add_noise(x0, noise, s[0])
    total = len(s) - 1
    for i in range(total):
        v = model_fn(x, s[i], experts[i])
        if detect_nonfinite:
            check_finite(v, what="Model output", step=i, expert=experts[i], sigma=s[i])
        x = flow_step(x, v, s[i], s[i + 1])
        if callback is not None:
            callback(i, total, x, experts[i], s[i])
    return x
