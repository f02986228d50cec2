"""The reference dual-expert sampler and the shared flow arithmetic."""

from __future__ import annotations

import pytest
import torch

from dcm_core import flow
from dcm_core.errors import DCMSamplingError, DCMScheduleError
from dcm_core.sampler import sample_dcm
from dcm_core.schedule import build_sigmas


def test_flow_identities():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    s = 0.7
    xt = flow.add_noise(x0, eps, s)
    v = eps - x0
    assert torch.allclose(flow.denoised_from_velocity(xt, v, s), x0, atol=1e-6)
    assert torch.allclose(flow.noise_from_velocity(xt, v, s), eps, atol=1e-6)
    # an exact-velocity Euler step lands on the path: x_{σ'} = σ'ε + (1−σ')x0
    assert torch.allclose(flow.flow_step(xt, v, s, 0.2), flow.add_noise(x0, eps, 0.2), atol=1e-6)
    # per-sample sigmas broadcast over the batch
    sig = torch.tensor([0.7, 0.3])
    assert torch.allclose(flow.add_noise(x0, eps, sig)[1], flow.add_noise(x0[1:], eps[1:], 0.3)[0])
    # linear re-noising from σ_end to σ_a (detail stage), exact for the straight path
    end, a = 0.016732, 0.6
    x_end = flow.add_noise(x0, eps, end)
    assert torch.allclose(flow.renoise(x_end, eps, end, a), flow.add_noise(x0, eps, a), atol=1e-6)


def test_reference_sampler_is_exact_for_a_linear_model_and_routes_per_step():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
    calls = []

    def model_fn(x, sigma, expert):
        calls.append((round(1000 * sigma, 3), expert))
        return eps - x0  # the true velocity of the straight path from eps to x0

    out = sample_dcm(model_fn, eps, build_sigmas("wan2.1-t2v-6step"), 978)
    assert torch.allclose(out, x0, atol=1e-5)
    assert calls == [(1000.0, "semantic"), (992.0, "semantic"), (982.0, "semantic"),
                     (949.0, "detail"), (905.0, "detail"), (810.0, "detail")]


def test_reference_sampler_golden_loop():
    """diffusers-style full loop: a fixed nonlinear model, golden sum/mean of the result."""
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 16, 3, 4, 4, generator=g)

    def model_fn(x, sigma, expert):
        k = 0.9 if expert == "semantic" else 1.1
        return torch.tanh(x) * k + sigma

    steps = []
    out = sample_dcm(model_fn, noise, build_sigmas("hunyuan-t2v-4step"), 981,
                     callback=lambda i, n, x, e, s: steps.append((i, n, e)))
    assert steps == [(0, 4, "semantic"), (1, 4, "semantic"), (2, 4, "detail"), (3, 4, "detail")]
    # hand-rolled loop with the same formula
    x = noise.clone()
    s = [1.0, 0.992, 0.9818, 0.9124, 0.0]
    for i in range(4):
        k = 0.9 if i < 2 else 1.1
        x = x + (s[i + 1] - s[i]) * (torch.tanh(x) * k + s[i])
    assert torch.allclose(out, x, atol=1e-6)
    assert out.dtype == torch.float32


def test_img2img_start_and_nan_detection():
    lat = torch.ones(1, 2, 1, 1)
    noise = torch.zeros(1, 2, 1, 1)
    seen = []
    sample_dcm(lambda x, s, e: seen.append(x.clone()) or torch.zeros_like(x), noise, [0.5, 0.0], 978, latent_image=lat)
    assert torch.allclose(seen[0], torch.full_like(lat, 0.5))  # σ·ε + (1−σ)·x0
    with pytest.raises(DCMSamplingError, match=r"step 2 \(detail expert, sigma=0.5\)"):
        sample_dcm(lambda x, s, e: torch.full_like(x, float("nan")) if e == "detail" else torch.zeros_like(x),
                   noise, [1.0, 0.99, 0.5, 0.0], 978)
    with pytest.raises(DCMScheduleError):
        sample_dcm(lambda x, s, e: x, noise, [0.5, 0.7, 0.0], 978)
