"""Latent-space conventions of the supported families (numbers, not code, from the VAEs).

ComfyUI's LATENT sockets and FastVideo-style datasets hold *raw* VAE latents; the
transformer works on normalised latents. ``to_model_space`` / ``from_model_space`` are
the same maps as ComfyUI's ``Wan21`` / ``HunyuanVideo`` latent formats.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
LATENT_CHANNELS = 16  # Wan2.1 / HunyuanVideo; other VAEs describe themselves (LatentFormat.from_vae_config)


@dataclass(frozen=True)
class LatentFormat:
    """How a VAE's raw latents relate to the transformer's: channels, normalisation and compression.

    Read from the VAE's own ``config.json`` (:meth:`from_vae_config`): Wan VAEs (``AutoencoderKLWan``) carry
    ``z_dim``, ``latents_mean`` / ``latents_std``, ``scale_factor_temporal`` / ``scale_factor_spatial`` (Wan2.1: 16
    channels, 4×/8×; Wan2.2 TI2V-5B: 48 channels, 4×/16×); HunyuanVideo's VAE a ``scaling_factor``. A dataset
    written by ``preprocess`` stores it in ``latent_format.json`` so the trainer normalises with the VAE's numbers.
    """

    family: str
    channels: int = LATENT_CHANNELS
    mean: tuple[float, ...] | None = WAN21_LATENTS_MEAN
    std: tuple[float, ...] | None = WAN21_LATENTS_STD
    scale: float | None = None  # HunyuanVideo: x · scale
    temporal: int = 4
    spatial: int = 8

    @classmethod
    def default(cls, family: str) -> "LatentFormat":
        """Wan2.1 (16 channels, published statistics) or HunyuanVideo (scale 0.476986): the formats before Wan2.2."""
        _check(family)
        if family == FAMILY_WAN:
            return cls(FAMILY_WAN)
        return cls(FAMILY_HUNYUAN, mean=None, std=None, scale=HUNYUAN_SCALE_FACTOR)

    @classmethod
    def from_vae_config(cls, config: dict, family: str, where: str = "vae/config.json") -> "LatentFormat":
        _check(family)
        if family == FAMILY_HUNYUAN:
            ch = int(config.get("latent_channels", LATENT_CHANNELS))
            return cls(
                FAMILY_HUNYUAN, ch, None, None, float(config.get("scaling_factor", HUNYUAN_SCALE_FACTOR)),
                int(config.get("temporal_compression_ratio", 4)), int(config.get("spatial_compression_ratio", 8)),
            )  # fmt: skip
        ch = int(config.get("z_dim", LATENT_CHANNELS))
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is None and std is None and ch == LATENT_CHANNELS:
            mean, std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
        if mean is None or std is None or len(mean) != ch or len(std) != ch:
            raise DCMConfigError(
                f"{where}: z_dim = {ch} but latents_mean / latents_std have "
                f"{None if mean is None else len(mean)} / {None if std is None else len(std)} entries; a Wan VAE config "
                f"must list one mean and one std per latent channel."
            )
        return cls(
            FAMILY_WAN, ch, tuple(float(v) for v in mean), tuple(float(v) for v in std), None,
            int(config.get("scale_factor_temporal") or 4), int(config.get("scale_factor_spatial") or 8),
        )  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatentFormat":
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for k in ("mean", "std"):
            if kw.get(k) is not None:
                kw[k] = tuple(float(v) for v in kw[k])
        return cls(**kw)

    def check(self, x: torch.Tensor, where: str = "latent") -> None:
        if x.ndim >= 2 and x.shape[1] != self.channels:
            raise DCMConfigError(
                f"{where} has {x.shape[1]} channels but the VAE's latent format has {self.channels}: the dataset was "
                f"encoded with another VAE than the model's. Re-run preprocess with this model folder."
            )

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels) + (1,) * (x.ndim - 2)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(shape)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(shape)
        return mean, std

    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        if self.scale is not None:
            return x * self.scale
        mean, std = self._stats(x)
        return (x - mean) / std

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        if self.scale is not None:
            return x / self.scale
        mean, std = self._stats(x)
        return x * std + mean

    def latent_shape(self, frames: int, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int, int]:
        """Latent shape of a clip (frames ``temporal·k + 1``, sides multiples of ``spatial``)."""
        s, t = self.spatial, self.temporal
        if (frames - 1) % t or height % s or width % s:
            raise DCMConfigError(
                f"frames={frames}, height={height}, width={width}: frames must be {t}k+1 and height/width multiples of "
                f"{s} for this VAE (e.g. 81 frames at 480×832 for Wan2.1, 704×1280 for Wan2.2 TI2V-5B)."
            )
        return (batch, self.channels, (frames - 1) // t + 1, height // s, width // s)


def _check(family: str) -> None:
    if family not in (FAMILY_WAN, FAMILY_HUNYUAN):
        raise DCMConfigError(f"Unknown model family {family!r}; expected 'wan' or 'hunyuan_video'.")


def to_model_space(x: torch.Tensor, family: str, fmt: LatentFormat | None = None) -> torch.Tensor:
    """Raw VAE latent → the normalised latent the transformer sees (``fmt``: the VAE's format; default Wan2.1 / HY)."""
    _check(family)
    return (fmt or LatentFormat.default(family)).to_model_space(x)


def from_model_space(x: torch.Tensor, family: str, fmt: LatentFormat | None = None) -> torch.Tensor:
    """Normalised latent → raw VAE latent (what ComfyUI's LATENT holds)."""
    _check(family)
    return (fmt or LatentFormat.default(family)).from_model_space(x)


def latent_shape(frames: int, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int, int]:
    """Latent shape of a clip for the 4× temporal / 8× spatial Wan2.1 and HunyuanVideo VAEs."""
    return LatentFormat(FAMILY_WAN).latent_shape(frames, height, width, batch)
