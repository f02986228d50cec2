"""Latent-space conventions of the supported families (numbers, not code, from the VAEs).

ComfyUI's LATENT sockets and FastVideo-style datasets hold *raw* VAE latents; the
transformer works on normalised latents. ``to_model_space`` / ``from_model_space`` are
the same maps as ComfyUI's ``Wan21`` / ``HunyuanVideo`` latent formats.
"""

from __future__ import annotations

import torch

from .errors import DCMConfigError
from .schedule import FAMILY_HUNYUAN, FAMILY_WAN

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
HUNYUAN_SCALE_FACTOR = 0.476986
LATENT_CHANNELS = 16


def _check(family: str) -> None:
    if family not in (FAMILY_WAN, FAMILY_HUNYUAN):
        raise DCMConfigError(f"Unknown model family {family!r}; expected 'wan' or 'hunyuan_video'.")


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, LATENT_CHANNELS) + (1,) * (x.ndim - 2)
    mean = torch.tensor(WAN21_LATENTS_MEAN, device=x.device, dtype=x.dtype).view(shape)
    std = torch.tensor(WAN21_LATENTS_STD, device=x.device, dtype=x.dtype).view(shape)
    return mean, std


def to_model_space(x: torch.Tensor, family: str) -> torch.Tensor:
    """Raw VAE latent → the normalised latent the transformer sees."""
    _check(family)
    if family == FAMILY_WAN:
        mean, std = _stats(x)
        return (x - mean) / std
    return x * HUNYUAN_SCALE_FACTOR


def from_model_space(x: torch.Tensor, family: str) -> torch.Tensor:
    """Normalised latent → raw VAE latent (what ComfyUI's LATENT holds)."""
    _check(family)
    if family == FAMILY_WAN:
        mean, std = _stats(x)
        return x * std + mean
    return x / HUNYUAN_SCALE_FACTOR


def latent_shape(frames: int, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int, int]:
    """Latent shape of a clip for the 4× temporal / 8× spatial Wan2.1 and HunyuanVideo VAEs."""
    if (frames - 1) % 4 or height % 8 or width % 8:
        raise DCMConfigError(
            f"frames={frames}, height={height}, width={width}: frames must be 4k+1 and height/width multiples of 8 "
            f"(e.g. 81 frames at 480×832)."
        )
    return (batch, LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8)
