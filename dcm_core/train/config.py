"""Training configuration: one documented dataclass per section, official defaults.

Every field carries a ``help`` text (``dataclasses.field(metadata={"help": ...})``, the peft /
diffusers-example convention) and the default of the official DCM recipe (dcm-method.md §5.1,
§6.1). Fields whose official value depends on the model family or the stage default to
``None`` and are filled in by :meth:`TrainConfig.resolved` (e.g. the learning rate: 1e-6 for
the semantic stage, 5e-6 for the detail stage).

A config is read from a TOML or JSON file with one table per section::

    stage = "semantic"
    [model]
    pretrained = "/models/Wan2.1-T2V-1.3B-Diffusers"
    [data]
    path = "/data/my_latents"

and can be changed from the command line with ``section.key=value`` overrides
(``optim.lr=2e-6``, ``data.batch_size=4``, ``loss.tc_weight=0``). Values are parsed as
TOML literals when possible (``true``, ``[0.0, 0.999]``, ``"text"``) and otherwise taken as
plain strings; every value is type-checked against the field and a wrong one raises
:class:`~dcm_core.errors.DCMConfigError` naming the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

try:  # Python ≥ 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..errors import DCMConfigError
from ..schedule import DCM_SHIFT, DEFAULT_BOUNDARY_TIMESTEP, DEFAULT_K0, FAMILIES, FAMILY_HUNYUAN, FAMILY_WAN

STAGE_SEMANTIC = "semantic"
STAGE_DETAIL = "detail"
STAGES = (STAGE_SEMANTIC, STAGE_DETAIL)

#: Official learning rates of the generator (dcm-method.md §5.1 / §6.1).
OFFICIAL_LR = {STAGE_SEMANTIC: 1e-6, STAGE_DETAIL: 5e-6}
#: Official teacher CFG scale in the ``v_c + w(v_c − v_u)`` sense: Wan 5, HunyuanVideo none (0).
OFFICIAL_CFG = {FAMILY_WAN: 5.0, FAMILY_HUNYUAN: 0.0}
#: Official feature-matching weight: Wan ×10 (detail script line 552), HunyuanVideo ×1 (line 706).
OFFICIAL_FM_WEIGHT = {FAMILY_WAN: 10.0, FAMILY_HUNYUAN: 1.0}
#: Caption dropout: the Wan video dataset hard-codes 10 %, the HunyuanVideo latent dataset 0 %.
OFFICIAL_CAPTION_DROPOUT = {FAMILY_WAN: 0.1, FAMILY_HUNYUAN: 0.0}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ModelConfig:
    """Which weights are trained, and how."""

    family: str | None = field(
        default=None,
        metadata=_help(
            "Model family: 'wan' or 'hunyuan_video'. Empty: detected from the loaded transformer "
            "(WanTransformer3DModel / HunyuanVideoTransformer3DModel)."
        ),
    )
    pretrained: str = field(
        default="",
        metadata=_help(
            "The ORIGINAL base model = the teacher (and the student's initialisation in the semantic stage): a "
            "diffusers model folder (with a transformer/ subfolder, or a transformer folder with config.json), a "
            "single diffusers-keyed .safetensors file next to a config.json, or 'tiny:wan' / 'tiny:hunyuan_video' "
            "for a random tiny model (tests, dry runs). Official: Wan-AI/Wan2.1-T2V-1.3B-Diffusers, "
            "hunyuanvideo-community/HunyuanVideo."
        ),
    )
    transformer_config: str = field(
        default="",
        metadata=_help("config.json to use when 'pretrained' / 'semantic_expert' is a single file without one beside it."),
    )
    tiny_config: dict = field(
        default_factory=dict,
        metadata=_help(
            "Keyword arguments of dcm_core.tiny.wan_config / hunyuan_config when pretrained = 'tiny:<family>' "
            "(e.g. {dim = 128, num_layers = 2, ffn_dim = 256})."
        ),
    )
    tiny_seed: int = field(default=0, metadata=_help("Weight seed of a 'tiny:<family>' model."))
    semantic_expert: str = field(
        default="",
        metadata=_help(
            "Detail stage only: the stage-1 result (an exported run folder, its transformer/ folder or a "
            "diffusers-keyed .safetensors file). Its weights become the frozen base of the student. Empty: the "
            "pretrained weights are used (only sensible for tests; a warning is logged)."
        ),
    )
    semantic_lora: bool = field(
        default=False,
        metadata=_help(
            "Semantic stage: train a LoRA on the teacher instead of the official full fine-tune (memory saving: "
            "the teacher is then the same weights with the adapter off, no second copy). Export merges it."
        ),
    )
    semantic_lora_rank: int = field(default=128, metadata=_help("Rank of the semantic-stage LoRA (semantic_lora = true)."))
    semantic_lora_alpha: float = field(default=256.0, metadata=_help("Alpha of the semantic-stage LoRA."))
    lora_rank: int = field(default=128, metadata=_help("Detail expert LoRA rank (official 128)."))
    lora_alpha: float = field(default=256.0, metadata=_help("Detail expert LoRA alpha (official 256, i.e. scale 2)."))
    teacher_dtype: str = field(
        default="auto",
        metadata=_help(
            "Storage dtype of the frozen teacher: 'fp32', 'bf16' or 'auto' (bf16 when mixed_precision is bf16, "
            "else fp32). Trainable weights are always fp32 masters."
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "Recompute transformer blocks in backward, student and frozen teacher (official: on, via FSDP activation "
            "checkpointing of both)."
        ),
    )
    detail_base_dtype: str = field(
        default="fp32",
        metadata=_help(
            "Detail stage: storage dtype of the student's FROZEN base (the semantic expert under the LoRA): 'fp32' "
            "(default, official) or 'bf16' (needs mixed_precision = 'bf16'; halves that copy, the LoRA, *_lora "
            "modules and diffusers' fp32 modules stay fp32). Opt-in because it moves the numbers slightly (tiny "
            "model, first step: 1.8e-5 relative in the loss; an earlier measurement of the step saw ~2e-3)."
        ),
    )


@dataclass
class ScheduleConfig:
    """The PCM grid (dcm-method.md §2) and the expert split."""

    shift: float = field(default=DCM_SHIFT, metadata=_help("Flow shift s of σ(u) = s·u / (1 + (s−1)·u). Official 17."))
    grid_steps: int = field(default=50, metadata=_help("Points of the PCM Euler grid. Official 50."))
    k0: int | None = field(
        default=None,
        metadata=_help(
            "First grid index of the semantic sub-trajectory: the semantic stage trains k ∈ [k0, grid_steps−1] "
            "towards σ_prev[k0]; the detail stage k ∈ [0, k0−1] towards σ_prev[0]. Empty: Wan 35, HunyuanVideo 38; a "
            "two-transformer base (Wan2.2 A14B) its boundary index (T2V 875 → 14, I2V 900 → 17)."
        ),
    )
    phase_edges: list[int] = field(
        default_factory=list,
        metadata=_help(
            "Semantic stage only: PCM-style phases of a single expert. Sorted grid indices [e_0, e_1, …] with e_0 = k0, "
            "all < grid_steps: the phases are [e_0, e_1), …, [e_last, grid_steps) and a sample drawn at k is trained "
            "towards σ_prev[largest edge ≤ k] instead of σ_prev[k0] (e.g. [0, 12, 25, 37] with k0 = 0: the paper's "
            "4-phase PCM baseline). Empty: one phase (official DCM). k0 empty: k0 = e_0."
        ),
    )
    phases: int = field(
        default=0,
        metadata=_help(
            "Semantic stage only: N equal PCM phases over [k0, grid_steps), i.e. phase_edges = k0 + "
            "floor(linspace(0, grid_steps − k0, N, endpoint=False)) (the official PCM spacing; k0 = 0, N = 4 → "
            "[0, 12, 25, 37]). 0: off (phase_edges as given)."
        ),
    )
    boundary_timestep: float | None = field(
        default=None,
        metadata=_help(
            "Routing threshold of the validation sampler (floor(1000·σ) ≤ it → detail expert). Empty: Wan 978, "
            "HunyuanVideo 981 (the official inference values); a Wan2.2 A14B base its own boundary (875 / 900)."
        ),
    )


@dataclass
class GuidanceConfig:
    """How the teacher is conditioned."""

    cfg_scale: float | None = field(
        default=None,
        metadata=_help(
            "Teacher CFG w in v = v_c + w·(v_c − v_u) (uncond = the embedding of \"\"). 0 disables it. Empty: Wan 5 "
            "(official distill_cfg, an effective scale of 6), HunyuanVideo 0 (guidance-distilled)."
        ),
    )
    embedded_guidance: float = field(
        default=6016.0,
        metadata=_help(
            "HunyuanVideo only: the guidance value fed to the guidance embedder of teacher and student. Official "
            "training: 6016 = bf16(6.0·1000); the inference pipelines feed 6000."
        ),
    )


@dataclass
class LossConfig:
    """Loss weights (dcm-method.md §5.2, §6.2)."""

    huber_c: float = field(default=0.001, metadata=_help("Pseudo-Huber c of the consistency loss. Official 0.001."))
    tc_weight: float = field(
        default=1.0, metadata=_help("Semantic stage: weight of the Temporal Coherence loss. Official 1. 0 disables it.")
    )
    tc_stride: int = field(
        default=3,
        metadata=_help("Latent-frame stride of the TC differences; the loss is skipped when T ≤ stride. Official 3."),
    )
    adv_weight: float = field(
        default=0.1, metadata=_help("Detail stage: total adversarial weight on (hinge G + FM). Official 0.1. 0 disables the GAN.")
    )
    gan_g_weight: float = field(default=5.0, metadata=_help("Detail stage: multiplier of the hinge generator loss. Official 5."))
    fm_weight: float | None = field(
        default=None,
        metadata=_help("Detail stage: multiplier of the feature-matching loss. Empty: Wan 10, HunyuanVideo 1."),
    )


@dataclass
class DiscriminatorConfig:
    """Discriminator heads on the frozen teacher (dcm-method.md §6.3)."""

    stride: int = field(
        default=2,
        metadata=_help("A head on every stride-th block (Wan: blocks; HunyuanVideo: single-stream blocks). Official 2."),
    )
    inner_channels: int = field(
        default=1024, metadata=_help("Width of the 1×1 conv stack (a multiple of 32 for GroupNorm(32)). Official 1024.")
    )
    lr: float = field(default=1e-5, metadata=_help("Discriminator AdamW learning rate. Official 1e-5."))
    betas: list = field(default_factory=lambda: [0.0, 0.999], metadata=_help("Discriminator AdamW betas. Official (0, 0.999)."))
    weight_decay: float = field(default=1e-3, metadata=_help("Discriminator AdamW weight decay. Official 1e-3."))


@dataclass
class OptimConfig:
    """Generator (student) optimiser."""

    lr: float | None = field(
        default=None, metadata=_help("AdamW learning rate. Empty: 1e-6 (semantic stage), 5e-6 (detail stage).")
    )
    betas: list = field(default_factory=lambda: [0.9, 0.999], metadata=_help("AdamW betas. Official (0.9, 0.999)."))
    weight_decay: float = field(default=1e-3, metadata=_help("AdamW weight decay. Official 1e-3."))
    eps: float = field(default=1e-8, metadata=_help("AdamW epsilon. Official 1e-8."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (generator and discriminator). Official 1.0."))
    lr_scheduler: str = field(
        default="constant",
        metadata=_help("'constant' (official), 'constant_with_warmup', 'linear' or 'cosine' (decay to 0 at max_train_steps)."),
    )
    lr_warmup_steps: int = field(default=0, metadata=_help("Warm-up steps of the LR schedule. Official 0."))
    use_ema: bool = field(
        default=False,
        metadata=_help("Use an EMA of the trainable weights as the consistency target network. Official: off (online student)."),
    )
    ema_decay: float = field(default=0.95, metadata=_help("EMA decay when use_ema is on (official code default 0.95)."))


@dataclass
class DataConfig:
    """The precomputed latent dataset (dcm-method.md §7.1; written by `python -m dcm_core preprocess`)."""

    path: str = field(
        default="",
        metadata=_help("Dataset folder holding videos2caption.json + latent/ prompt_embed/ prompt_attention_mask/, or the JSON file."),
    )
    batch_size: int = field(default=1, metadata=_help("Samples per process per step. Official script 1 (authors: 4 Wan, 6 HY)."))
    num_latent_t: int = field(
        default=0, metadata=_help("Keep only the LAST N latent frames of each sample (official HY 32 / 16). 0 keeps all.")
    )
    caption_dropout: float | None = field(
        default=None,
        metadata=_help("Probability of replacing a caption by the \"\" embedding. Empty: Wan 0.1, HunyuanVideo 0."),
    )
    uncond_embed: str = field(
        default="",
        metadata=_help(
            "safetensors file with the embedding of \"\" (keys prompt_embed, prompt_attention_mask). Empty: "
            "<dataset>/uncond/ (written by preprocess); zeros with a warning when missing."
        ),
    )
    shuffle: bool = field(
        default=True, metadata=_help("Seeded reshuffle every epoch (the official sampler does not shuffle; false reproduces it).")
    )
    num_workers: int = field(default=0, metadata=_help("DataLoader worker processes."))


@dataclass
class CheckpointConfig:
    """Periodic training checkpoints (safetensors + JSON, atomic, verified by a manifest)."""

    every_steps: int = field(default=100, metadata=_help("Save a checkpoint every N optimiser steps (0: only at the end)."))
    keep: int = field(default=3, metadata=_help("Keep the newest K checkpoints (0 keeps all)."))


@dataclass
class LoggingConfig:
    """Progress and metrics."""

    log_every: int = field(default=1, metadata=_help("Write loss components to metrics.jsonl every N steps."))
    tensorboard: bool = field(default=False, metadata=_help("Also log to TensorBoard (only if the tensorboard package is installed)."))
    progress_bar: bool = field(default=True, metadata=_help("Show a tqdm progress bar on the main process."))


@dataclass
class ValidationConfig:
    """Validation samples with dcm_core.sampler.sample_dcm."""

    every_steps: int = field(default=0, metadata=_help("Sample every M steps (0: off). Official HY 64, Wan detail 10."))
    num_samples: int = field(default=1, metadata=_help("How many dataset captions to sample (the first N items)."))
    sigmas: str = field(
        default="",
        metadata=_help(
            "Sigma preset (dcm_core.schedule.PRESET_NAMES) or a comma list. Empty: semantic stage 'pcm-default' with "
            "`steps`; detail stage the family's official list (wan2.1-t2v-6step / hunyuan-t2v-4step)."
        ),
    )
    steps: int = field(default=4, metadata=_help("Steps of the pcm-default list in the semantic stage."))
    seed: int = field(default=40, metadata=_help("Noise seed of the validation samples (official Wan: 40)."))
    vae: str = field(
        default="",
        metadata=_help("diffusers model folder (or its vae/ subfolder) to decode validation latents to mp4. Empty: latents only."),
    )
    fps: int = field(default=0, metadata=_help("Frame rate of decoded videos. 0: Wan 16, HunyuanVideo 24."))


@dataclass
class ExportConfig:
    """What is written at the end of training (and by `python -m dcm_core export RUN_DIR`)."""

    name: str = field(default="dcm", metadata=_help("Base name of the pack-native files (NAME_semantic / NAME_detail_expert)."))
    dtype: str = field(default="fp32", metadata=_help("dtype of exported weights: fp32 (official Wan), bf16 (official HY) or fp16."))
    native: bool = field(
        default=True, metadata=_help("Detail stage: also write the pack-native files through dcm_core.formats.convert_official.")
    )
    at_end: bool = field(default=True, metadata=_help("Export automatically when training finishes."))


@dataclass
class ParallelConfig:
    """How the run is spread over processes (beyond what ``accelerate launch`` chooses)."""

    shard_teacher: bool = field(
        default=False,
        metadata=_help(
            "Under FSDP (accelerate launch --use_fsdp): shard the frozen teacher's transformer blocks over the "
            "processes too (FSDP2, gathered block by block in their storage dtype) instead of one whole teacher per "
            "process. Its embedders and output head stay whole (the discriminator decodes features with the head). "
            "Ignored without FSDP."
        ),
    )
    sequence_parallel: int = field(
        default=1,
        metadata=_help(
            "Sequence parallelism: split each clip's tokens over this many processes (diffusers' Ulysses context "
            "parallelism; Wan only, GPUs only). Must divide the process count, the heads and the clip's tokens; the data "
            "is split over processes / sequence_parallel groups. 1: off. The official HunyuanVideo recipes used 4."
        ),
    )


@dataclass
class TrainConfig:
    """Complete configuration of one DCM training run (one stage)."""

    stage: str = field(default=STAGE_SEMANTIC, metadata=_help("'semantic' (stage 1) or 'detail' (stage 2)."))
    output_dir: str = field(default="runs/dcm", metadata=_help("Run folder: checkpoints/, export/, validation/, metrics.jsonl."))
    max_train_steps: int = field(
        default=1000, metadata=_help("Optimiser steps. Official 1000 (the HY semantic script uses 1500; the paper 1000).")
    )
    seed: int = field(default=42, metadata=_help("Seed of weights-independent randomness (noise, indices, data order)."))
    mixed_precision: str = field(
        default="no",
        metadata=_help("'no' or 'bf16' (forwards under bf16 autocast, fp32 master weights). Official bf16 (use it on GPUs)."),
    )
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimiser step. Official 1."))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_help("Model section."))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata=_help("Grid section."))
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig, metadata=_help("Teacher guidance section."))
    loss: LossConfig = field(default_factory=LossConfig, metadata=_help("Loss section."))
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig, metadata=_help("Discriminator section."))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=_help("Optimiser section."))
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("Data section."))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=_help("Checkpoint section."))
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=_help("Logging section."))
    validation: ValidationConfig = field(default_factory=ValidationConfig, metadata=_help("Validation section."))
    export: ExportConfig = field(default_factory=ExportConfig, metadata=_help("Export section."))
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata=_help("Parallelism section."))

    # ------------------------------------------------------------------ helpers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, family: str | None = None) -> "TrainConfig":
        """A copy with every family/stage-dependent ``None`` replaced by its official value.

        ``family`` overrides :attr:`ModelConfig.family` (e.g. the family detected from the model).
        """
        cfg = from_dict(self.to_dict())
        fam = family or cfg.model.family
        if fam is None:
            raise DCMConfigError(
                "model.family is not set and could not be detected. Set model.family = 'wan' or 'hunyuan_video'."
            )
        cfg.model.family = fam
        if cfg.schedule.k0 is None:
            cfg.schedule.k0 = int(cfg.schedule.phase_edges[0]) if cfg.schedule.phase_edges else DEFAULT_K0[fam]
        if cfg.schedule.phases and not cfg.schedule.phase_edges:
            cfg.schedule.phase_edges = equal_phase_edges(cfg.schedule.k0, cfg.schedule.grid_steps, cfg.schedule.phases)
        if cfg.schedule.boundary_timestep is None:
            cfg.schedule.boundary_timestep = DEFAULT_BOUNDARY_TIMESTEP[fam]
        if cfg.guidance.cfg_scale is None:
            cfg.guidance.cfg_scale = OFFICIAL_CFG[fam]
        if cfg.loss.fm_weight is None:
            cfg.loss.fm_weight = OFFICIAL_FM_WEIGHT[fam]
        if cfg.optim.lr is None:
            cfg.optim.lr = OFFICIAL_LR[cfg.stage]
        if cfg.data.caption_dropout is None:
            cfg.data.caption_dropout = OFFICIAL_CAPTION_DROPOUT[fam]
        validate(cfg)
        return cfg


# ---------------------------------------------------------------------------- validation


def validate(cfg: TrainConfig) -> None:
    """Range / choice checks that types alone cannot express."""

    def bad(key: str, value: Any, why: str) -> None:
        raise DCMConfigError(f"config {key}={value!r}: {why}")

    if cfg.stage not in STAGES:
        bad("stage", cfg.stage, "must be 'semantic' or 'detail'.")
    if cfg.model.family is not None and cfg.model.family not in FAMILIES:
        bad("model.family", cfg.model.family, f"must be one of {', '.join(FAMILIES)}.")
    if cfg.max_train_steps < 1:
        bad("max_train_steps", cfg.max_train_steps, "must be ≥ 1.")
    if cfg.mixed_precision not in ("no", "bf16"):
        bad("mixed_precision", cfg.mixed_precision, "must be 'no' or 'bf16' (fp16 needs loss scaling, which DCM never used).")
    if cfg.gradient_accumulation_steps < 1:
        bad("gradient_accumulation_steps", cfg.gradient_accumulation_steps, "must be ≥ 1.")
    if cfg.model.teacher_dtype not in ("auto", "fp32", "bf16", "fp16"):
        bad("model.teacher_dtype", cfg.model.teacher_dtype, "must be 'auto', 'fp32', 'bf16' or 'fp16'.")
    if cfg.model.detail_base_dtype not in ("fp32", "bf16"):
        bad("model.detail_base_dtype", cfg.model.detail_base_dtype, "must be 'fp32' (default) or 'bf16'.")
    if cfg.model.detail_base_dtype == "bf16" and cfg.mixed_precision != "bf16":
        bad("model.detail_base_dtype", cfg.model.detail_base_dtype, "bf16 needs mixed_precision = 'bf16' (the LoRA "
            "layers mix the bf16 base with fp32 adapters under autocast only).")
    for key, v in (("model.lora_rank", cfg.model.lora_rank), ("model.semantic_lora_rank", cfg.model.semantic_lora_rank)):
        if v < 1:
            bad(key, v, "a LoRA rank must be ≥ 1 (official 128).")
    g = cfg.schedule.grid_steps
    if g < 2 or 1000 % g:
        bad("schedule.grid_steps", g, "must divide 1000 (official 50).")
    k0_min = 0 if cfg.stage == STAGE_SEMANTIC else 1
    if cfg.schedule.k0 is not None and not (k0_min <= cfg.schedule.k0 <= g - 1):
        bad(
            "schedule.k0",
            cfg.schedule.k0,
            f"must lie in [{k0_min}, {g - 1}] (Wan 35, HunyuanVideo 38) so the stage gets grid indices "
            f"(0 is allowed for the semantic stage only: a single-expert consistency model over the whole trajectory).",
        )
    _validate_phases(cfg, bad)
    if cfg.schedule.shift <= 0:
        bad("schedule.shift", cfg.schedule.shift, "must be > 0 (official 17).")
    if cfg.guidance.cfg_scale is not None and cfg.guidance.cfg_scale < 0:
        bad("guidance.cfg_scale", cfg.guidance.cfg_scale, "must be ≥ 0 (0 disables CFG).")
    if cfg.loss.huber_c <= 0:
        bad("loss.huber_c", cfg.loss.huber_c, "must be > 0 (official 0.001).")
    if cfg.loss.tc_stride < 1:
        bad("loss.tc_stride", cfg.loss.tc_stride, "must be ≥ 1 (official 3).")
    for key in ("tc_weight", "adv_weight", "gan_g_weight"):
        if getattr(cfg.loss, key) < 0:
            bad(f"loss.{key}", getattr(cfg.loss, key), "weights must be ≥ 0.")
    if cfg.disc.stride < 1:
        bad("disc.stride", cfg.disc.stride, "must be ≥ 1 (official 2).")
    if cfg.disc.inner_channels < 32 or cfg.disc.inner_channels % 32:
        bad("disc.inner_channels", cfg.disc.inner_channels, "must be a positive multiple of 32 (GroupNorm(32)); official 1024.")
    for key, betas in (("optim.betas", cfg.optim.betas), ("disc.betas", cfg.disc.betas)):
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            bad(key, betas, "must be two numbers in [0, 1), e.g. [0.9, 0.999].")
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        bad("optim.lr", cfg.optim.lr, "must be > 0.")
    if cfg.optim.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine"):
        bad("optim.lr_scheduler", cfg.optim.lr_scheduler, "must be constant, constant_with_warmup, linear or cosine.")
    if not 0 < cfg.optim.ema_decay < 1:
        bad("optim.ema_decay", cfg.optim.ema_decay, "must lie in (0, 1).")
    if cfg.data.batch_size < 1:
        bad("data.batch_size", cfg.data.batch_size, "must be ≥ 1.")
    if cfg.data.num_latent_t < 0:
        bad("data.num_latent_t", cfg.data.num_latent_t, "must be ≥ 0 (0 keeps every latent frame).")
    if cfg.data.caption_dropout is not None and not 0 <= cfg.data.caption_dropout <= 1:
        bad("data.caption_dropout", cfg.data.caption_dropout, "is a probability in [0, 1].")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.keep < 0:
        bad("checkpoint", (cfg.checkpoint.every_steps, cfg.checkpoint.keep), "every_steps and keep must be ≥ 0.")
    if cfg.export.dtype not in ("fp32", "bf16", "fp16"):
        bad("export.dtype", cfg.export.dtype, "must be fp32, bf16 or fp16.")
    if cfg.parallel.sequence_parallel < 1:
        bad("parallel.sequence_parallel", cfg.parallel.sequence_parallel, "must be ≥ 1 (1: off).")


def equal_phase_edges(k0: int, grid_steps: int, phases: int) -> list[int]:
    """``schedule.phases = N``: ``k0 + floor(linspace(0, grid_steps − k0, N, endpoint=False))``.

    The spacing of the official ``euler_style_multiphase_pred`` (boundaries ``floor(linspace(0, 50, P,
    endpoint=False))``), taken over the stage's own range ``[k0, grid_steps)`` so no phase reaches past the grid.
    """
    import numpy as np

    span = grid_steps - k0
    return [int(k0 + i) for i in np.floor(np.linspace(0, span, int(phases), endpoint=False)).astype(int)]


def _validate_phases(cfg: TrainConfig, bad: Any) -> None:
    """schedule.phase_edges / schedule.phases: semantic stage, sorted unique indices starting at k0."""
    s, g = cfg.schedule, cfg.schedule.grid_steps
    edges, n = s.phase_edges, s.phases
    if n < 0:
        bad("schedule.phases", n, "must be ≥ 0 (0: off; N: N equal phases over [k0, grid_steps)).")
    if not edges and not n:
        return
    key, value = ("schedule.phase_edges", edges) if edges else ("schedule.phases", n)
    if cfg.stage != STAGE_SEMANTIC:
        bad(key, value, f"phases split the single expert's trajectory and exist in the semantic stage only (this run is "
            f"the {cfg.stage} stage, whose consistency target is σ_prev[0] and whose adversarial re-noising starts "
            f"there). Drop {key} or use --stage semantic.")
    if edges:
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in edges):
            bad(key, edges, "must be a list of grid indices (integers), e.g. [0, 12, 25, 37].")
        if any(b <= a for a, b in zip(edges, edges[1:])):
            bad(key, edges, f"must be sorted and unique, e.g. {sorted(set(edges))}.")
        if edges[0] < 0 or edges[-1] > g - 1:
            bad(key, edges, f"edges are grid indices in [0, {g - 1}] (schedule.grid_steps = {g}).")
        if s.k0 is not None and edges[0] != s.k0:
            bad(key, edges, f"the first edge must be schedule.k0 = {s.k0} (the start of the trained range [k0, {g})). "
                f"Start the list at {s.k0}, or set schedule.k0={edges[0]} (or leave k0 empty: it then defaults to the first edge).")
    if n and s.k0 is not None:
        if n > g - s.k0:
            bad("schedule.phases", n, f"[k0, grid_steps) = [{s.k0}, {g}) has only {g - s.k0} grid indices; use at most that many phases.")
        if edges and list(edges) != equal_phase_edges(s.k0, g, n):
            bad("schedule.phase_edges", edges, f"disagrees with schedule.phases={n} (edges {equal_phase_edges(s.k0, g, n)}). "
                f"Set only one of them.")
    elif n and edges:
        bad("schedule.phases", n, "and schedule.phase_edges are both set; set only one of them.")


# ---------------------------------------------------------------------------- (de)serialisation

def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in hints if dataclasses.is_dataclass(hints[name])}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {type(None): "empty (the official default)", float: "a number", int: "an integer", str: "a string",
             bool: "true or false", list: "a list", dict: "a table"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "") and type(None) in args):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except DCMConfigError:
                pass
        raise DCMConfigError(f"config {key}={value!r}: expected {_type_name(tp)}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DCMConfigError(f"config {key}={value!r}: expected true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DCMConfigError(f"config {key}={value!r}: expected an integer.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise DCMConfigError(f"config {key}={value!r}: expected a number.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise DCMConfigError(f"config {key}={value!r}: expected a string.")
    if origin is list and typing.get_args(tp) == (int,):  # grid indices: [0, 12, 25] or "0,12,25" from a shell
        if isinstance(value, str) and value.strip():
            try:
                value = [int(v) for v in value.split(",")]
            except ValueError:
                raise DCMConfigError(f"config {key}={value!r}: expected a list of integers such as [0, 12, 25] or 0,12,25.") from None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # "k=0" from a shell: a one-element list
        try:
            if isinstance(value, (list, tuple)):
                return [_coerce(key, v, int) for v in value]
        except DCMConfigError:
            pass
        raise DCMConfigError(f"config {key}={value!r}: expected a list of integers such as [0, 12, 25] or 0,12,25.")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise DCMConfigError(f"config {key}={value!r}: expected a list such as [0.9, 0.999].")
    if tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise DCMConfigError(f"config {key}={value!r}: expected a table such as {{dim = 128}}.")
    return value


def _known(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest(name: str, options: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(options)}."


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested mappings, type-checking every value."""
    sections = _section_types()
    top_types = _field_types(TrainConfig)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, Mapping):
                raise DCMConfigError(f"config [{key}] must be a table of keys, got {value!r}.")
            cls = sections[key]
            ftypes = _field_types(cls)
            sub = {}
            for k, v in value.items():
                if k not in ftypes:
                    raise DCMConfigError(f"config {key}.{k}: unknown key.{_suggest(k, _known(cls))}")
                sub[k] = _coerce(f"{key}.{k}", v, ftypes[k])
            kwargs[key] = cls(**sub)
        elif key in top_types:
            kwargs[key] = _coerce(key, value, top_types[key])
        else:
            raise DCMConfigError(f"config {key}: unknown key.{_suggest(key, _known(TrainConfig))}")
    cfg = TrainConfig(**kwargs)
    validate(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    """A ``key=value`` right-hand side: a TOML literal when it parses, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested config mapping (in place, returned)."""
    sections = _section_types()
    for item in overrides:
        if "=" not in item:
            raise DCMConfigError(
                f"override {item!r} is not key=value. Write e.g. optim.lr=2e-6 or data.path=/data/latents."
            )
        key, _, raw = item.partition("=")
        key = key.strip()
        value = _parse_value(raw.strip())
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] in sections:
                raise DCMConfigError(f"override {item!r}: '{parts[0]}' is a section; name a key in it, e.g. {parts[0]}.<key>=...")
            data[parts[0]] = value
        elif len(parts) == 2:
            sec, k = parts
            if sec not in sections:
                raise DCMConfigError(f"override {item!r}: unknown section '{sec}'.{_suggest(sec, list(sections))}")
            data.setdefault(sec, {})[k] = value
        else:
            raise DCMConfigError(f"override {item!r}: keys have the form section.key (one dot).")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON (``.json``) config file into a nested mapping."""
    p = Path(path)
    if not p.is_file():
        raise DCMConfigError(f"config file {str(p)!r} does not exist. Example configs live in dcm_core/train/configs/.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise DCMConfigError(f"config file {str(p)!r} is not valid {p.suffix.lstrip('.').upper() or 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise DCMConfigError(f"config file {str(p)!r} must hold a table / object at the top level.")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    stage: str | None = None,
) -> TrainConfig:
    """Config file (optional) + overrides (+ ``--stage``) → a validated :class:`TrainConfig`.

    Relative paths in the file (model.pretrained, data.path, ...) are kept as written: they are
    resolved against the current working directory, like the official shell scripts.
    """
    data = read_config_file(path) if path else {}
    data = apply_overrides(data, overrides)
    if stage is not None:
        if "stage" in data and data["stage"] != stage:
            raise DCMConfigError(
                f"--stage {stage} contradicts stage = {data['stage']!r} in the config file. Drop one of them."
            )
        data["stage"] = stage
    return from_dict(data)


def describe_fields() -> str:
    """Every field with its default and help, one per line (for ``--help-config``)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        cls = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if cls is not None and dataclasses.is_dataclass(cls):
            lines.append(f"[{f.name}]  {cls.__doc__.strip() if cls.__doc__ else ''}")
            for sf in dataclasses.fields(cls):
                default = sf.default if sf.default is not dataclasses.MISSING else sf.default_factory()  # type: ignore[misc]
                lines.append(f"  {f.name}.{sf.name} = {default!r}\n      {sf.metadata.get('help', '')}")
        else:
            lines.append(f"{f.name} = {f.default!r}\n    {f.metadata.get('help', '')}")
    return "\n".join(lines)
