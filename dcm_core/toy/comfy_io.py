"""ComfyUI-shaped values for the toy world (pure torch; used by nodes/toy_nodes.py).

ComfyUI's LATENT holds raw "VAE" latents and its Wan model normalises them with the Wan2.1
mean/std (``latents.to_model_space``). The toy world's latent map produces model-space
latents, so decoding a ComfyUI latent first applies ``to_model_space``.
"""

from __future__ import annotations

import torch

from ..errors import DCMError
from ..latents import to_model_space
from ..schedule import FAMILY_WAN
from . import world


def check_prompt(prompt: str) -> bool | str:
    """``True`` or the error text (for ``validate_inputs``)."""
    if not prompt.strip():
        return True
    try:
        world.parse_prompt(prompt)
    except DCMError as e:
        return str(e)
    return True


def encode_conditioning(prompt: str) -> list:
    """``[[tensor(1, 8, 4096), {}]]``: ComfyUI CONDITIONING for a toy prompt."""
    return [[world.encode_text(prompt)[None], {}]]


def decode_images(samples: torch.Tensor) -> torch.Tensor:
    """``[B, 16, F, h, w]`` raw latent → ``[B·F, 2h, 2w, 3]`` images in [0, 1] (ComfyUI IMAGE)."""
    if samples.ndim != 5 or samples.shape[1] != world.LATENT_CHANNELS:
        raise DCMError(
            f"DCM Toy Decode: expected a toy video latent [batch, 16, frames, h, w], got shape {list(samples.shape)}. "
            f"Connect the LATENT of a sampler that used the toy experts."
        )
    z = to_model_space(samples.float().cpu(), FAMILY_WAN)
    frames = [world.latent_to_frames(z[b]) for b in range(z.shape[0])]  # each [F, 3, H, W] in [-1, 1]
    imgs = torch.cat(frames, dim=0).permute(0, 2, 3, 1)
    return ((imgs + 1.0) / 2.0).clamp(0.0, 1.0).contiguous()
