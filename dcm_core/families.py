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


#: ``boundary_preset`` choices of DCM Dual-Expert Sampler / Guider: ``manual`` uses the ``boundary_timestep``
#: widget; the others replace it (ComfyUI timestep convention, ``1000·σ``).
BOUNDARY_MANUAL = "manual"
BOUNDARY_PRESETS: dict[str, float | None] = {
    BOUNDARY_MANUAL: None,
    "wan2.2-t2v-a14b (875)": WAN22_BOUNDARY[TASK_T2V],
    "wan2.2-i2v-a14b (900)": WAN22_BOUNDARY[TASK_I2V],
    "wan2.1 DCM (978)": 978.0,
    "hunyuan DCM (981)": 981.0,
}


def resolve_boundary(preset: str | None, boundary_timestep: float) -> float:
    """The boundary a sampler uses: the preset's value, or ``boundary_timestep`` for ``manual`` / no preset."""
    if preset is None or preset == BOUNDARY_MANUAL:
        return float(boundary_timestep)
    if preset not in BOUNDARY_PRESETS:
        from .errors import DCMScheduleError

        raise DCMScheduleError(
            f"boundary_preset {preset!r} is unknown; choose one of: {', '.join(BOUNDARY_PRESETS)}."
        )
    return float(BOUNDARY_PRESETS[preset])  # type: ignore[arg-type]


def task_from_dims(family: str | None, dims: dict) -> str | None:
    """The task a transformer's shapes imply: input channels (noisy latent + image conditioning) against output
    channels. Wan: 16 → 16 text-to-video, 36 (16 noisy + 4 mask + 16 image latent) → 16 image-to-video, 48 → 48
    Wan2.2 TI2V (image in the first latent frame, no extra channels). ``None`` when the shapes say nothing."""
    try:
        cin, cout = int(dims.get("in_dim")), int(dims.get("out_dim"))
    except (TypeError, ValueError):
        return None
    if family == FAMILY_WAN:
        if cin == cout == 16:
            return TASK_T2V
        if cin == 36 and cout == 16:
            return TASK_I2V
        if cin == cout == 48:
            return TASK_TI2V
        return None
    if family == FAMILY_HUNYUAN:
        return TASK_T2V if cin == cout == 16 else None
    return None


def bases_for(family: str | None, dims: dict) -> tuple[str, ...]:
    """Ids of the bases a transformer with these shapes can be: same family, input/output channels and image
    embedder; when the width and depth are those of a released model, only the bases of that size. A tiny test
    model (no released size) keeps every channel-compatible base."""
    if not family or not dims:
        return ()
    has_img = bool(dims.get("image_dim"))
    fit = [
        b
        for b in BASES.values()
        if b.family == family
        and dims.get("in_dim") == b.in_channels
        and dims.get("out_dim") == b.latent_channels
        and (family != FAMILY_WAN or has_img == b.image_embedder)
    ]
    sized = [b for b in fit if b.dim == dims.get("dim") and b.num_layers == dims.get("num_layers")]
    return tuple(b.id for b in (sized or fit))


def describe_base(base_id: str | None) -> str:
    """``'Wan2.2 I2V A14B (wan2.2-i2v-a14b)'`` or ``'unknown base'``."""
    b = BASES.get(base_id or "")
    return f"{b.label} ({b.id})" if b else "unknown base"
