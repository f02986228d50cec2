"""The model families DCM experts are made for and run on: one table shared by trainer, converter and nodes.

A *family* (``dcm.family`` in file metadata: ``'wan'`` / ``'hunyuan_video'``) is the transformer architecture;
a *base* (``dcm.base``) is the released model a DCM expert was distilled from, which fixes the task (text-to-video,
image-to-video, text+image-to-video), the transformer's input channels, and — for the Wan2.2 A14B pairs — which of
the two released transformers an expert belongs to (``dcm.expert_base``: ``high_noise`` = ``transformer/``,
``low_noise`` = ``transformer_2/``).

Metadata keys written on pack-native files (absent on files made before this table existed, which are all
text-to-video single-transformer bases):

``dcm.task``         ``t2v`` | ``i2v`` | ``ti2v``
``dcm.base``         a key of :data:`BASES`
``dcm.expert_base``  ``high_noise`` | ``low_noise`` (two-transformer bases only)

Boundaries use ComfyUI's timestep convention (``1000·σ``; a step at or below the boundary belongs to the
low-noise / detail side). Wan2.2's own ``boundary_ratio`` (0.875 T2V, 0.900 I2V) is the same number divided by
1000.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule import FAMILY_HUNYUAN, FAMILY_WAN

TASK_T2V = "t2v"
TASK_I2V = "i2v"
TASK_TI2V = "ti2v"
TASKS = (TASK_T2V, TASK_I2V, TASK_TI2V)

HIGH_NOISE = "high_noise"
LOW_NOISE = "low_noise"
EXPERT_BASES = (HIGH_NOISE, LOW_NOISE)

META_TASK = "dcm.task"
META_BASE = "dcm.base"
META_EXPERT_BASE = "dcm.expert_base"


@dataclass(frozen=True)
class Base:
    """A released base model: what its transformer takes and how its latents are made."""

    id: str
    family: str
    task: str
    label: str
    in_channels: int  # transformer input channels (noisy latent + image conditioning)
    latent_channels: int  # VAE latent channels (= transformer output channels)
    two_transformers: bool = False
    boundary_timestep: float | None = None  # the base's own high/low switch (two-transformer bases)
    image_embedder: bool = False  # CLIP image features go into the transformer
    dim: int | None = None  # transformer width (heads × head_dim) of the released model

    @property
    def boundary_ratio(self) -> float | None:
        """diffusers' ``boundary_ratio`` (``boundary_timestep / 1000``) of a two-transformer base."""
        return None if self.boundary_timestep is None else self.boundary_timestep / 1000.0


BASES: dict[str, Base] = {
    b.id: b
    for b in (
        Base("wan2.1-t2v-1.3b", FAMILY_WAN, TASK_T2V, "Wan2.1 T2V 1.3B", 16, 16, dim=1536),
        Base("wan2.1-t2v-14b", FAMILY_WAN, TASK_T2V, "Wan2.1 T2V 14B", 16, 16, dim=5120),
        Base("wan2.1-i2v-14b", FAMILY_WAN, TASK_I2V, "Wan2.1 I2V 14B", 36, 16, image_embedder=True, dim=5120),
        Base("wan2.2-ti2v-5b", FAMILY_WAN, TASK_TI2V, "Wan2.2 TI2V 5B", 48, 48, dim=3072),
        Base("wan2.2-t2v-a14b", FAMILY_WAN, TASK_T2V, "Wan2.2 T2V A14B", 16, 16, True, 875.0, dim=5120),
        Base("wan2.2-i2v-a14b", FAMILY_WAN, TASK_I2V, "Wan2.2 I2V A14B", 36, 16, True, 900.0, dim=5120),
        Base("hunyuan-t2v", FAMILY_HUNYUAN, TASK_T2V, "HunyuanVideo T2V", 16, 16, dim=3072),
    )
}

#: ``DCM Dual-Expert Sampler`` boundary presets for two-model bases (ComfyUI timestep convention).
WAN22_BOUNDARY = {TASK_T2V: 875.0, TASK_I2V: 900.0}


def base_for(
    family: str,
    in_channels: int,
    out_channels: int,
    *,
    image_embedder: bool = False,
    two_transformers: bool = False,
    dim: int | None = None,
) -> Base | None:
    """The base whose transformer layout matches (channels, image embedder, one or two transformers).

    Several bases share a layout (Wan2.1 T2V 1.3B / 14B): the one whose ``dim`` equals ``dim`` is taken, else the
    first listed (a tiny test model of that layout is labelled with it). ``None`` when no base has the layout.
    """
    cands = [
        b
        for b in BASES.values()
        if b.family == family
        and b.in_channels == int(in_channels)
        and b.latent_channels == int(out_channels)
        and b.image_embedder == bool(image_embedder)
        and b.two_transformers == bool(two_transformers)
    ]
    if not cands:
        return None
    return next((b for b in cands if dim is not None and b.dim == int(dim)), cands[0])


def image_channels(base: Base) -> int:
    """Channels concatenated to the noisy latent for image conditioning (Wan I2V: 4 mask + 16 image latent)."""
    return base.in_channels - base.latent_channels if base.task == TASK_I2V else 0
