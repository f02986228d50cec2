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
    dim: int | None = None  # transformer width of the released model (None: not checked)
    num_layers: int | None = None  # transformer blocks of the released model

    @property
    def expert_bases(self) -> tuple[str, ...]:
        """The transformers an expert of this base can belong to (two-transformer bases only)."""
        return EXPERT_BASES if self.two_transformers else ()


BASES: dict[str, Base] = {
    b.id: b
    for b in (
        Base("wan2.1-t2v-1.3b", FAMILY_WAN, TASK_T2V, "Wan2.1 T2V 1.3B", 16, 16, dim=1536, num_layers=30),
        Base("wan2.1-t2v-14b", FAMILY_WAN, TASK_T2V, "Wan2.1 T2V 14B", 16, 16, dim=5120, num_layers=40),
        Base("wan2.1-i2v-14b", FAMILY_WAN, TASK_I2V, "Wan2.1 I2V 14B", 36, 16, image_embedder=True, dim=5120, num_layers=40),
        Base("wan2.2-ti2v-5b", FAMILY_WAN, TASK_TI2V, "Wan2.2 TI2V 5B", 48, 48, dim=3072, num_layers=30),
        Base("wan2.2-t2v-a14b", FAMILY_WAN, TASK_T2V, "Wan2.2 T2V A14B", 16, 16, True, 875.0, dim=5120, num_layers=40),
        Base("wan2.2-i2v-a14b", FAMILY_WAN, TASK_I2V, "Wan2.2 I2V A14B", 36, 16, True, 900.0, dim=5120, num_layers=40),
        Base("hunyuan-t2v", FAMILY_HUNYUAN, TASK_T2V, "HunyuanVideo T2V", 16, 16, dim=3072, num_layers=20),
    )
}

#: ``DCM Dual-Expert Sampler`` boundary presets for two-model bases (ComfyUI timestep convention).
WAN22_BOUNDARY = {TASK_T2V: 875.0, TASK_I2V: 900.0}
