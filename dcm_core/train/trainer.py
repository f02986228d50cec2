"""The DCM expert trainer: stage semantic and stage detail on accelerate (dcm-method.md §5, §6).

Anatomy (the diffusers training-example layout):

1. setup (``DCMTrainer.__init__``, numbered phases): 0. accelerator and the strategy that spreads the
   run over processes (:mod:`.parallel`: one process / DDP, or FSDP2 under ``accelerate launch
   --use_fsdp`` — the only place that knows the difference), 1. data and models (:mod:`.models`),
   2. data order, 3. discriminator (:mod:`.discriminator`), 4. optimisers, LR schedule, EMA,
   5. devices, 6. generators, 7. resume;
2. the step (:meth:`DCMTrainer.train_step`: 1. draws, 2. consistency pair, 3. CD / TC loss,
   4. adversarial G terms, 5. backward, 6. generator update, 7. discriminator update):

   * stage semantic — ``k ~ U{K0…49}``; student jump to ``σ_prev[K0]``; one teacher Euler step
     with CFG ``v_c + w(v_c − v_u)``; target = the online (or EMA) student jump from ``x'``
     under ``no_grad``; loss = pseudo-Huber + Temporal Coherence (§5.2). With ``schedule.phase_edges``
     (the PCM baseline) each sample jumps to the end of its own phase instead (:class:`.solver.PCMSolver`);
   * stage detail — ``k ~ U{0…K0−1}`` to ``σ_prev[0]``; consistency loss; ŷ (fake) and y (real)
     re-noised with ONE shared noise to ``σ_a = σ_prev[adv_index]``; hinge G ×5 on
     discriminator heads over the frozen teacher's block features + feature matching on the
     teacher-head-decoded features, total weight 0.1; then one discriminator hinge step (§6.2).
     ``adv_index`` is drawn from a generator seeded identically on every process and
     broadcast from process 0 (the official code forgot to share it, §6.5);
3. checkpoints (:mod:`.checkpoint`), metrics, validation samples, export (:mod:`.export`).

Everything random comes from named generators whose states are checkpointed, so a resumed
run reproduces an uninterrupted one exactly. All grid arithmetic is :mod:`.solver` over
:mod:`dcm_core.flow` / :mod:`dcm_core.schedule`, the same code the sampler uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import DCMCheckpointError, DCMConfigError
from ..latents import LatentFormat
from ..schedule import DEFAULT_PRESET, FAMILY_WAN, build_sigmas, pcm_default_sigmas
from . import checkpoint as ck
from . import fsdp as fs
from .config import STAGE_DETAIL, STAGE_SEMANTIC, TrainConfig
from .data import Batch, DataStream, LatentDataset, apply_caption_dropout, collate, load_uncond, pad_uncond
from .discriminator import Discriminator, TeacherFeatures
from .losses import feature_matching, hinge_d_loss, hinge_g_loss, pseudo_huber, temporal_coherence
from .models import (
    IMAGE_CONCAT,
    IMAGE_FIRST_FRAME,
    IMAGE_NONE,
    Conditioning,
    StageModels,
    adapters_disabled,
    call_velocity,
    clean_first_frame,
    noisy_frames,
)
from .parallel import Replicated, make_strategy
from .seqpar import SequenceParallel
from .solver import PCMSolver, cfg_velocity

log = logging.getLogger("DCM.train")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------- helpers


def lr_lambda_for(name: str, warmup: int, total: int):
    """LR multiplier per step: constant / constant_with_warmup / linear / cosine (diffusers semantics)."""

    def fn(step: int) -> float:
        if name != "constant" and step < warmup:
            return float(step) / float(max(1, warmup))
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return fn


class EMA:
    """EMA of the trainable parameters, used as the consistency target network (optim.use_ema)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float, *, inplace: bool = False) -> None:
        self.decay = decay
        self.params = dict(named)
        self.shadow = {n: p.detach().clone() for n, p in named}
        # FSDP2 all-gathers from its own shard storage: the EMA weights must be copied into it, not pointer-swapped
        self.inplace = inplace

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the live parameters (no_grad use only)."""
        if self.inplace:
            saved = {n: p.detach().clone() for n, p in self.params.items()}
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.shadow[n])
            try:
                yield
            finally:
                with torch.no_grad():
                    for n, p in self.params.items():
                        p.copy_(saved[n])
            return
        for n, p in self.params.items():
            p.data, self.shadow[n] = self.shadow[n], p.data
        try:
            yield
        finally:
            for n, p in self.params.items():
                p.data, self.shadow[n] = self.shadow[n], p.data


@dataclass
class _Draws:
    """One micro-batch and everything drawn for it (phase 1 of :meth:`DCMTrainer.train_step`)."""

    batch: Batch
    x0: torch.Tensor
    noise: torch.Tensor
    draw: Any
    cond: Conditioning
    adv_all: torch.Tensor | None
    adv_noise: torch.Tensor | None


@dataclass
class TrainResult:
    """What :meth:`DCMTrainer.train` returns (on every process; history only on the main one)."""

    run_dir: Path
    global_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    exported: dict[str, str] = field(default_factory=dict)
    steps_per_second: float = 0.0


# ---------------------------------------------------------------------------- the trainer


class DCMTrainer:
    """One DCM training run (one stage).

    Args:
        cfg: the (unresolved or resolved) config; family-dependent defaults are resolved
            once the pretrained model is loaded.
        resume: ``None``, ``"latest"`` or a checkpoint folder.
    """

    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # 0. processes: accelerate + how the run is spread over them (one process / DDP / FSDP2, see .parallel)
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        self.strategy: Replicated = make_strategy(acc)
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.is_main = acc.is_main_process
        if not self.is_main:
            log.setLevel(logging.ERROR)  # one voice: the main process logs
        self.last_checkpoint: Path | None = None
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self._tb = None

        # 1. data first (cheap, fails fast), then the models with identical seeds everywhere (LoRA / discriminator
        #    initialisation must agree across processes); family-dependent defaults resolve once the model is known
        if not cfg.data.path:
            raise DCMConfigError("data.path is empty. Point it at a dataset folder written by `python -m dcm_core preprocess`.")
        self.dataset = LatentDataset(cfg.data.path, cfg.data.num_latent_t)
        self._seed_everything(cfg.seed)
        self.models: StageModels = self.strategy.build_models(cfg)
        if self.strategy.activation_checkpointing and not cfg.model.gradient_checkpointing:
            log.info("FSDP activation checkpointing: per-block gradient checkpointing of the student and teacher is on.")
            self.models.enable_gradient_checkpointing()
        self.family = self.models.family
        self._setup_family(cfg.model.pretrained)
        self.cfg = cfg = cfg.resolved(self.family)
        self.stage = cfg.stage
        self.solver = PCMSolver(
            cfg.stage, cfg.schedule.k0, cfg.schedule.shift, cfg.schedule.grid_steps, phase_edges=cfg.schedule.phase_edges
        )
        self.use_adv = cfg.stage == STAGE_DETAIL and cfg.loss.adv_weight > 0
        # 1b. sequence parallelism (parallel.sequence_parallel): diffusers' context parallelism on the student and
        #     teacher; the data and the per-sample randomness are then split over the sequence groups (.seqpar)
        self.sp = SequenceParallel.create(acc, cfg.parallel.sequence_parallel, self.family)
        if self.sp is not None:
            self._enable_sequence_parallel()

        # 2. data order and the empty-caption embedding (CFG, caption dropout)
        self._build_data()
        # 3. the discriminator on the frozen teacher (detail stage)
        self.features: TeacherFeatures | None = None
        self.disc: nn.Module | None = None
        if self.use_adv:
            split = self.sp.discriminator_frames if self.sp is not None else None
            self.features = TeacherFeatures(self.models.teacher, self.family, cfg.disc.stride, split=split)
            self.disc = Discriminator(self.features.num_features, self.features.feature_dim, cfg.disc.inner_channels)
        # 4. optimisers, LR schedule, EMA (on the sharded parameters when sharded: shard first)
        self._build_optimisers()
        # 5. devices / processes
        self._place()
        # 6. randomness: per-sample generators and the process-shared one (adversarial index)
        self._build_generators()

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
        # 7. resume
        if resume:
            self._resume(resume)
        n_train = sum(p.numel() for _, p in self.trainable)
        log.info(
            "DCM %s stage, %s: %s trainable parameters (%d tensors), %d samples, %d process(es)%s, k in %s, %s%s",
            cfg.stage,
            self.family,
            f"{n_train:,}",
            len(self.trainable),
            len(self.dataset),
            acc.num_processes,
            self.strategy.label,
            self.solver.index_range,
            _boundary_text(self.solver),
            f", {self.features.num_features} discriminator heads" if self.features else "",
        )

    # ------------------------------------------------------------------ set-up phases

    def _enable_sequence_parallel(self) -> None:
        from ..modeling import EXPERT_MODULES
        from .discriminator import token_grid

        sp, m = self.sp, self.models
        shape = (1, *self.dataset[0].latent.shape)
        grid = token_grid(m.student, self.family, shape)
        tokens = math.prod(grid)
        sp.check_model(m.student, tokens, f"latent {tuple(shape[1:])} of {self.cfg.data.path}", frames=grid[0])
        sp.enable(m.student, EXPERT_MODULES[self.family])
        for teacher in (m.teacher, m.teacher_other):  # (a two-transformer base: both sides)
            if teacher is not None:
                sp.enable(teacher)
        log.info("sequence parallel: %d processes per clip (%d tokens each), %d data-parallel group(s)",
                 sp.degree, tokens // sp.degree, sp.dp_size)

    @property
    def _dp(self) -> tuple[int, int]:
        """(data-parallel size, this process's data-parallel rank): the processes, or the sequence groups."""
        if self.sp is not None:
            return self.sp.dp_size, self.sp.dp_rank
        return self.accelerator.num_processes, self.accelerator.process_index

    def _setup_family(self, cfg_source: str) -> None:
        """The latent format (the dataset's, else the model folder's VAE, else Wan2.1 / HunyuanVideo) and how the
        dataset's images condition the model (Wan I2V needs them; Wan2.2 TI2V uses them when the dataset has them)."""
        stored = self.dataset.latent_format()
        if stored is not None:
            self.latent_format = LatentFormat.from_dict(stored)
        elif self.models.latent_format is not None:
            self.latent_format = self.models.latent_format
        else:
            self.latent_format = LatentFormat.default(self.family)
        channels = int(self.dataset[0].latent.shape[0])
        out_ch = int(self.models.student.config.out_channels or self.models.student.config.in_channels)
        if channels != out_ch or self.latent_format.channels != out_ch:
            raise DCMConfigError(
                f"{self.dataset.root}: latents have {channels} channels (latent format {self.latent_format.channels}) but "
                f"the transformer ({cfg_source}) outputs {out_ch}: the dataset was encoded with another VAE. "
                f"Re-run preprocess with this model folder."
            )
        mode = self.models.image_mode
        if mode == IMAGE_CONCAT and not self.dataset.has_images:
            raise DCMConfigError(
                f"{self.dataset.root}: the model is image-to-video ({self.models.student.config.in_channels} input "
                f"channels: noisy latent + mask + image latent) but the dataset has no image latents. Re-run preprocess "
                f"with this model folder (it writes image_latent/)."
            )
        if mode == IMAGE_FIRST_FRAME and not self.dataset.has_images:
            mode = IMAGE_NONE  # TI2V trained text-to-video
        if mode == IMAGE_NONE and self.dataset.has_images:
            log.warning("the dataset has image latents but the model takes no image conditioning; they are not used.")
        if self.models.image_embedder and not self.dataset.has_clip:
            raise DCMConfigError(
                f"{self.dataset.root}: the model has a CLIP image embedder (Wan2.1 I2V) but the dataset has no CLIP "
                f"features. Re-run preprocess with the model folder (it needs image_encoder/ and image_processor/)."
            )
        self.image_mode = mode
        if mode != IMAGE_NONE:
            log.info("image conditioning: %s%s", mode, " + CLIP image features" if self.models.image_embedder else "")

    def _build_data(self) -> None:
        cfg = self.cfg
        self.data = DataStream(
            self.dataset,
            batch_size=cfg.data.batch_size,
            num_replicas=self._dp[0],
            rank=self._dp[1],
            shuffle=cfg.data.shuffle,
            seed=cfg.seed,
            num_workers=cfg.data.num_workers,
        )
        self.uncond = load_uncond(self.dataset.root, cfg.data.uncond_embed)
        needs_uncond = cfg.guidance.cfg_scale > 0 or cfg.data.caption_dropout > 0
        if self.uncond is None and needs_uncond:
            sample = self.dataset[0]
            log.warning(
                "no embedding of \"\" found (data.uncond_embed / <dataset>/uncond/): the teacher CFG and caption dropout "
                "use an all-zero embedding instead. Re-run preprocess to write the real one."
            )
            self.uncond = (torch.zeros_like(sample.prompt_embed), torch.zeros_like(sample.prompt_mask))

    def _build_optimisers(self) -> None:
        cfg = self.cfg
        self.strategy.shard(self.models.student, self.family, teacher=self.models.teacher if cfg.parallel.shard_teacher else None)
        self.trainable = self.models.trainable()
        if not self.trainable:
            raise DCMConfigError("no trainable parameters: check model.semantic_lora / the detail expert setup.")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.trainable], lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_for(o.lr_scheduler, o.lr_warmup_steps, cfg.max_train_steps)
        )
        self.ema = EMA(self.trainable, o.ema_decay, inplace=self.strategy.ema_inplace) if o.use_ema else None
        self.d_optimizer = None
        if self.disc is not None:
            self.d_optimizer = torch.optim.AdamW(
                self.disc.parameters(), lr=cfg.disc.lr, betas=tuple(cfg.disc.betas), weight_decay=cfg.disc.weight_decay
            )

    def _place(self) -> None:
        device = self.accelerator.device
        self.student_unwrapped = self.models.student
        p = self.strategy.prepare(self.models.student, self.optimizer, self.disc, self.d_optimizer)
        self.student, self.optimizer, self.disc, self.disc_unwrapped, self.d_optimizer = (
            p.student, p.optimizer, p.disc, p.disc_unwrapped, p.d_optimizer
        )
        for t in (self.models.teacher, self.models.teacher_other):
            if t is not None:
                t.to(device)
        if self.ema is not None:
            self.ema.shadow = {n: t.to(device) for n, t in self.ema.shadow.items()}

    def _build_generators(self) -> None:
        """Per-sample randomness (noise, indices, dropout) and the process-shared one (adversarial index).

        Sample i of process r's batch is slot j = i·P + r of the global batch (the DistributedSampler interleave)
        and draws from its own generator, seeded with j: a run with P processes × batch b draws exactly what one
        process with batch P·b draws (for b = 1 this is the former per-process seed).
        """
        cfg = self.cfg
        n_proc, rank = self._dp  # under sequence parallelism every rank of a group draws the same
        self.slots = [i * n_proc + rank for i in range(cfg.data.batch_size)]
        self.gens = [torch.Generator().manual_seed(cfg.seed * 1000 + 17 + j) for j in self.slots]
        self.shared_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7)
        self._seed_everything(cfg.seed + rank)

    # ------------------------------------------------------------------ seeds / resume

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _generators(self) -> dict[str, torch.Generator]:
        gens = {"train": self.gens[0], **{f"train.{i}": g for i, g in enumerate(self.gens[1:], 1)}}
        gens["shared"] = self.shared_gen
        return gens

    def _resume(self, resume: str) -> None:
        path = ck.resolve_resume(resume, self.ckpt_root)
        if self.is_main:
            # damaged checkpoints newer than the one resumed from would otherwise count as "newest" for rotation
            resumed_step = int(ck.CKPT_RE.match(path.name).group(1)) if ck.CKPT_RE.match(path.name) else -1
            for step, other in ck.list_checkpoints(self.ckpt_root):
                if step > resumed_step and ck.verify_checkpoint(other) is not None:
                    broken = ck.set_aside_broken(self.ckpt_root, other)
                    log.warning("moved the damaged %s aside to %s", other.name, broken.name)
            # leftovers of the interrupted run: temp folders of unfinished writes, half-deleted old
            # checkpoints in .trash/, older .broken-* folders (only the newest one is kept)
            cleaned = ck.clean_for_resume(self.ckpt_root)
            if cleaned:
                log.info("removed leftovers of the interrupted run: %s", ", ".join(cleaned))
        self.accelerator.wait_for_everyone()
        state = ck.load_json(path / "trainer_state.json")
        saved = state.get("config", {})
        for key in ("stage",):
            if saved.get(key) != getattr(self.cfg, key):
                raise DCMCheckpointError(f"checkpoint {path} is from the {saved.get(key)} stage, this run is {getattr(self.cfg, key)}.")
        if saved.get("model", {}).get("family") not in (None, self.family):
            raise DCMCheckpointError(f"checkpoint {path} is for {saved['model']['family']}, this run is {self.family}.")
        diffs = _config_diff(saved, self.cfg.to_dict())
        diffs = [d for d in diffs if not d.startswith(("max_train_steps", "checkpoint.", "logging.", "validation.", "export."))]
        if diffs:
            log.warning("resuming with a changed config (%s); the continuation will not match an uninterrupted run.", "; ".join(diffs[:6]))
        # trainable weights, EMA, optimizer (the strategy knows how they are laid out), then the discriminator
        self.strategy.load_state(path, self.trainable, self.ema, self.optimizer)
        if self.disc_unwrapped is not None:
            self.disc_unwrapped.load_state_dict(ck.load_tensors(path / "discriminator.safetensors"))
            d_sd = ck.optimizer_from_flat(
                ck.load_tensors(path / "disc_optimizer.safetensors"), ck.load_json(path / "disc_optimizer.json")
            )
            self.d_optimizer.load_state_dict(d_sd)
        self.lr_scheduler.load_state_dict(ck.load_json(path / "scheduler.json"))
        self.global_step = int(state["global_step"])
        n_saved = int(state.get("num_processes", 1))
        rank = self.accelerator.process_index
        if n_saved == self.accelerator.num_processes:
            self.data.load_state(state["data"][rank])
            rng_t = ck.load_tensors(path / f"rng-rank{rank}.safetensors")
            ck.restore_rng(rng_t, ck.load_json(path / f"rng-rank{rank}.json"), self._generators())
        else:
            log.warning(
                "checkpoint was written by %d process(es), this run has %d: the data position and RNG streams restart "
                "at the saved epoch, so the continuation is not bit-identical.",
                n_saved,
                self.accelerator.num_processes,
            )
            self.data.load_state({"epoch": state["data"][0]["epoch"] + 1, "batch_in_epoch": 0})
        log.info("resumed from %s at step %d", path, self.global_step)

    # ------------------------------------------------------------------ forwards

    def _cond(self, batch: Batch) -> Conditioning:
        pooled_dim = int(getattr(self.student_unwrapped.config, "pooled_projection_dim", 768) or 768)
        cond = Conditioning.from_batch(
            self.family, batch.prompt_embeds, batch.prompt_masks, guidance=self.cfg.guidance.embedded_guidance, pooled_dim=pooled_dim
        )
        if self.image_mode == IMAGE_NONE:
            return cond
        image = self.latent_format.to_model_space(batch.image_latents.float())
        clip = batch.clip_features.float() if self.models.image_embedder else None
        return cond.with_image(self.image_mode, image, clip)

    def _x0(self, batch: Batch, cond: Conditioning) -> torch.Tensor:
        """The clean normalised latent (TI2V image conditioning: its frame 0 is the conditioning image's latent)."""
        return clean_first_frame(self.latent_format.to_model_space(batch.latents.float()), cond)

    def _uncond_batch(self, batch: Batch) -> Conditioning:
        """The CFG unconditional: the text of "" with the batch's image conditioning kept."""
        b, n, _ = batch.prompt_embeds.shape
        e, m = pad_uncond(self.uncond, n, batch.prompt_masks.shape[1])
        ub = batch.with_text(
            e.to(batch.prompt_embeds.device, batch.prompt_embeds.dtype).unsqueeze(0).expand(b, -1, -1),
            m.to(batch.prompt_masks.device).unsqueeze(0).expand(b, -1),
            [""] * b,
        )
        return self._cond(ub)

    def _teacher_call(self, teacher: nn.Module | None, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if teacher is None:  # semantic LoRA: the teacher is the student with adapters off
            with adapters_disabled(self.student_unwrapped):
                return call_velocity(self.student_unwrapped, self.student_unwrapped, x, sigma, cond)
        return call_velocity(teacher, teacher, x, sigma, cond)

    def _teacher_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The teacher's velocity; a two-transformer base is routed per sample (high noise above the boundary)."""
        m = self.models
        if m.boundary_timestep is None:
            return self._teacher_call(m.teacher, x, sigma, cond)
        high = m.side_of(sigma).to(x.device)
        if bool(high.all()) or not bool(high.any()):
            return self._teacher_call(m.teacher_for(bool(high[0])), x, sigma, cond)
        out = torch.empty_like(x, dtype=torch.float32)
        for side in (True, False):
            idx = torch.nonzero(high == side).flatten()
            out[idx] = self._teacher_call(m.teacher_for(side), x[idx], sigma[idx.to(sigma.device)], cond.select(idx))
        return out

    @torch.no_grad()
    def _teacher_guided(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, batch: Batch) -> torch.Tensor:
        """Teacher velocity with the official CFG ``v_c + w(v_c − v_u)`` (w = 0: plain ``v_c``)."""
        v_c = self._teacher_velocity(x, sigma, cond)
        w = float(self.cfg.guidance.cfg_scale)
        if w == 0:
            return v_c
        v_u = self._teacher_velocity(x, sigma, self._uncond_batch(batch))
        return cfg_velocity(v_c, v_u, w)

    @torch.no_grad()
    def _target_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        ctx = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        with ctx:
            return call_velocity(self.student_unwrapped, self.student_unwrapped, x, sigma, cond, self.models.student_expert)

    # ------------------------------------------------------------------ one step

    def _consistency_pair(
        self, call: nn.Module, batch: Batch, x0: torch.Tensor, noise: torch.Tensor, draw: Any, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ŷ (student jump, with grad when enabled) and the target y (no grad) — dcm-method.md §5.2 steps 2–5."""
        acc, solver = self.accelerator, self.solver
        # 1. noisy input and the student's jump to the phase boundary
        x_t = clean_first_frame(solver.noisy(x0, noise, draw.sigma), cond)  # TI2V: frame 0 stays the clean image
        with acc.autocast():
            v_s = call_velocity(call, self.student_unwrapped, x_t, draw.sigma, cond, self.models.student_expert)
        pred = solver.student_prediction(x_t, v_s, draw)
        # 2. one teacher Euler step (CFG), 3. the target network's jump from x'
        with torch.no_grad(), acc.autocast():
            v_t = self._teacher_guided(x_t, draw.sigma, cond, batch)
            x_prev = solver.teacher_step(x_t, v_t, draw)
            v_tgt = self._target_velocity(x_prev, draw.sigma_prev, cond)
            target = solver.target(x_prev, v_tgt, draw)
        return pred, target

    @torch.no_grad()
    def consistency_eval(self, num_draws: int = 8, seed: int = 1234, samples: int = 1) -> float:
        """Mean consistency loss over fixed (noise, k) draws of the first ``samples`` items (progress metric)."""
        g = torch.Generator().manual_seed(seed)
        batch = collate([self.dataset[i] for i in range(min(samples, len(self.dataset)))]).to(self.accelerator.device)
        cond = self._cond(batch)
        x0 = self._x0(batch, cond)
        total = 0.0
        for _ in range(num_draws):
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            draw = self.solver.draw(x0.shape[0], g)
            pred, target = self._consistency_pair(self.student_unwrapped, batch, x0, noise, draw, cond)
            total += float(pseudo_huber(noisy_frames(pred, cond), noisy_frames(target, cond), self.cfg.loss.huber_c))
        return total / num_draws

    def train_step(self) -> dict[str, float]:
        """One optimiser step of the generator (``gradient_accumulation_steps`` micro-batches), then of D.

        Per micro-batch (dcm-method.md §5.2, §6.2): 1. the draws, 2. the consistency pair ŷ / y, 3. the
        consistency loss (+ TC in stage semantic), 4. the adversarial G terms (stage detail), 5. backward;
        then 6. the generator update and 7. one discriminator update on this step's (detached) features.
        """
        accum = self.cfg.gradient_accumulation_steps
        logs: dict[str, float] = {}
        stash: list[tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, int, int], float]] = []
        self.optimizer.zero_grad(set_to_none=True)

        def add(key: str, value: torch.Tensor | float) -> None:
            v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            logs[key] = logs.get(key, 0.0) + v / accum

        for micro in range(accum):
            draws = self._draw()  # 1
            sync = contextlib.nullcontext() if micro == accum - 1 else self.strategy.no_sync(self.student)
            with sync:
                loss = self._generator_loss(draws, add, stash)  # 2-4
                add("loss", loss)
                add("sigma", draws.draw.sigma.mean())
                scale = self.sp.grad_scale if self.sp is not None else 1.0  # per-rank gradient shares (.seqpar)
                self.accelerator.backward(loss * scale / accum)  # 5
        logs.update(self._update_generator())  # 6
        if stash:
            self._update_discriminator(stash, add, logs)  # 7
        return logs

    def _draw(self) -> "_Draws":
        """1. The next batch and its randomness: every sample draws from its own generator, in the order caption
        dropout, noise, k, adversarial noise; the adversarial indices of the whole global batch come from the
        process-shared generator."""
        cfg, acc, solver, gens = self.cfg, self.accelerator, self.solver, self.gens
        lo, hi = solver.index_range
        batch = self.data.next()
        if batch.latents.shape[0] != len(gens):
            raise RuntimeError(f"internal: a batch of {batch.latents.shape[0]} samples for {len(gens)} sample generators")
        u = torch.cat([torch.rand(1, generator=g) for g in gens])
        batch, _ = apply_caption_dropout(batch, self.uncond, cfg.data.caption_dropout, None, u=u)
        shape = batch.latents.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
        draw = solver.index_draw(torch.cat([torch.randint(lo, hi, (1,), generator=g) for g in gens]))
        adv_all = adv_noise = None
        if self.use_adv:
            adv_all = solver.draw_adv_index(self._dp[0] * len(gens), self.shared_gen)  # the global batch
            adv_noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
        batch = batch.to(acc.device)
        cond = self._cond(batch)
        return _Draws(batch, self._x0(batch, cond), noise.to(acc.device), draw, cond, adv_all, adv_noise)

    def _generator_loss(self, d: "_Draws", add: Any, stash: list) -> torch.Tensor:
        """2.–4. The consistency pair, the CD (+ TC) loss and, in stage detail, the adversarial G terms."""
        cfg, solver = self.cfg, self.solver
        pred, target = self._consistency_pair(self.student, d.batch, d.x0, d.noise, d.draw, d.cond)
        # the losses compare the noisy part only (TI2V image conditioning: frames 1…, frame 0 is the given image)
        l_cd = pseudo_huber(noisy_frames(pred, d.cond), noisy_frames(target, d.cond), cfg.loss.huber_c)
        loss = l_cd
        add("loss_cd", l_cd)
        if cfg.stage == STAGE_SEMANTIC and cfg.loss.tc_weight > 0:
            l_tc = temporal_coherence(noisy_frames(pred, d.cond), noisy_frames(target, d.cond), cfg.loss.tc_stride)
            loss = loss + cfg.loss.tc_weight * l_tc
            add("loss_tc", l_tc)
        if self.use_adv:
            adv_index = self._share(d.adv_all)[torch.tensor(self.slots)]
            sigma_a = solver.adv_sigma(adv_index)
            fake, real = solver.adversarial_pair(pred, target, d.adv_noise.to(self.accelerator.device), sigma_a)
            l_g, l_fm, raw_f, raw_r, grid, share = self._generator_adversarial(fake, real, sigma_a, d.cond)
            adv = cfg.loss.gan_g_weight * l_g + cfg.loss.fm_weight * l_fm
            loss = loss + cfg.loss.adv_weight * adv
            add("loss_g", l_g)
            add("loss_fm", l_fm)
            add("sigma_adv", sigma_a.mean())
            stash.append((raw_f, raw_r, grid, share))
        return loss

    def _update_generator(self) -> dict[str, float]:
        """6. Clip, AdamW step, LR schedule, EMA."""
        grad_norm = self.accelerator.clip_grad_norm_([p for _, p in self.trainable], self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return {"grad_norm": fs.to_float(grad_norm), "lr": float(self.lr_scheduler.get_last_lr()[0])}

    def _update_discriminator(self, stash: list, add: Any, logs: dict[str, float]) -> None:
        """7. One hinge step of D on the features of this step's micro-batches."""
        acc = self.accelerator
        self.disc_unwrapped.requires_grad_(True)
        self.d_optimizer.zero_grad(set_to_none=True)
        scale = self.sp.grad_scale if self.sp is not None else 1.0  # per-rank gradient shares (.seqpar)
        for i, (raw_f, raw_r, grid, share) in enumerate(stash):
            sync = contextlib.nullcontext() if i == len(stash) - 1 else self.strategy.no_sync(self.disc)
            with sync:
                with acc.autocast():
                    logits_f = self.disc(raw_f, grid)
                    logits_r = self.disc(raw_r, grid)
                l_d = hinge_d_loss(logits_f, logits_r)
                if self.sp is not None:  # this process's frames → all frames
                    l_d = self.sp.mean_over_group(l_d, share)
                acc.backward(l_d * scale / len(stash))
            add("loss_d", l_d)
        d_norm = acc.clip_grad_norm_(self.disc.parameters(), self.cfg.optim.max_grad_norm)
        self.d_optimizer.step()
        self.d_optimizer.zero_grad(set_to_none=True)
        logs["d_grad_norm"] = fs.to_float(d_norm)

    def _share(self, t: torch.Tensor) -> torch.Tensor:
        """Make every process use process 0's values (the official code does not, §6.5)."""
        if self.accelerator.num_processes == 1:
            return t
        from accelerate.utils import broadcast

        return broadcast(t.to(self.accelerator.device), from_process=0).cpu()

    def _generator_adversarial(
        self, fake: torch.Tensor, real: torch.Tensor, sigma_a: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], tuple[int, int, int], float]:
        """Hinge-G and feature-matching terms; returns detached raw features for the D step (under sequence
        parallelism: this process's frames, their grid and share of all frames).

        The teacher runs on ``fake`` WITH gradient (it flows through the frozen teacher into ŷ) and
        on ``real`` without; the discriminator is frozen for this part.
        """
        acc = self.accelerator
        teacher = self.models.teacher

        def fwd(x: torch.Tensor) -> torch.Tensor:
            return call_velocity(teacher, teacher, x, sigma_a, cond)

        self.disc_unwrapped.requires_grad_(False)
        with acc.autocast():
            out_f = self.features.run(fwd, fake)
            with torch.no_grad():
                out_r = self.features.run(fwd, real)
            l_fm = feature_matching(out_f.decoded, out_r.decoded)
            logits = self.disc_unwrapped(out_f.raw, out_f.grid)
        l_g = hinge_g_loss(logits)
        if self.sp is not None:  # this process's frames → all frames
            l_g = self.sp.mean_over_group(l_g, out_f.share)
        raw_f = [r.detach() for r in out_f.raw]
        raw_r = [r.detach() for r in out_r.raw]
        return l_g, l_fm, raw_f, raw_r, out_f.grid, out_f.share

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint ``global_step`` atomically (every process writes its RNG file)."""
        acc = self.accelerator
        writer = ck.CheckpointWriter(self.ckpt_root, self.global_step)
        if self.is_main:
            writer.prepare()
        acc.wait_for_everyone()
        rank = acc.process_index
        rng_t, rng_m = ck.rng_state(self._generators())
        writer.tensors(f"rng-rank{rank}.safetensors", rng_t)
        writer.json(f"rng-rank{rank}.json", rng_m)
        data_states = self._gather_data_states()
        self.strategy.save_state(writer, self.trainable, self.ema, self.optimizer)
        if self.is_main:
            if self.disc_unwrapped is not None:
                writer.tensors("discriminator.safetensors", self.disc_unwrapped.state_dict())
                t, m = ck.optimizer_to_flat(self.d_optimizer.state_dict())
                writer.tensors("disc_optimizer.safetensors", t)
                writer.json("disc_optimizer.json", m)
            writer.json("scheduler.json", ck.scheduler_state(self.lr_scheduler))
            writer.json(
                "trainer_state.json",
                {
                    "global_step": self.global_step,
                    "num_processes": acc.num_processes,
                    "sharding": self.strategy.name,
                    "data": data_states,
                    "stage": self.stage,
                    "family": self.family,
                    "config": self.cfg.to_dict(),
                },
            )
        acc.wait_for_everyone()
        path = None
        if self.is_main:
            path = writer.commit()
            self.last_checkpoint = path
            removed = ck.rotate(self.ckpt_root, self.cfg.checkpoint.keep)
            log.info("saved %s%s", path, f" (removed {len(removed)} old)" if removed else "")
        acc.wait_for_everyone()
        return path

    def _gather_data_states(self) -> list[dict[str, int]]:
        acc = self.accelerator
        mine = torch.tensor([self.data.epoch, self.data.batch_in_epoch], dtype=torch.long, device=acc.device)
        if acc.num_processes == 1:
            allv = mine.unsqueeze(0)
        else:
            from accelerate.utils import gather

            allv = gather(mine.unsqueeze(0))
        return [{"epoch": int(e), "batch_in_epoch": int(b)} for e, b in allv.cpu().tolist()]

    # ------------------------------------------------------------------ logging / validation

    def _log(self, logs: dict[str, float], dt: float) -> None:
        acc = self.accelerator
        if acc.num_processes > 1:
            keys = sorted(logs)
            t = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=acc.device)
            t = acc.reduce(t, reduction="mean")
            logs = dict(zip(keys, t.cpu().tolist()))
        rec = {"step": self.global_step, **{k: float(v) for k, v in logs.items()}, "step_time_s": dt}
        if acc.device.type == "cuda":  # this process's peak, for comparison with `train --plan`
            rec["cuda_peak_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        for k in ("loss", "loss_cd"):
            if k in rec and not math.isfinite(rec[k]):
                raise FloatingPointError(f"{k} is {rec[k]} at step {self.global_step}; lower optim.lr or check the data.")
        if not self.is_main:
            return
        self.history.append(rec)
        if self.global_step % max(1, self.cfg.logging.log_every) == 0 or self.global_step == self.cfg.max_train_steps:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            if self._tb is not None:
                for k, v in rec.items():
                    if k != "step":
                        self._tb.add_scalar(f"train/{k}", v, self.global_step)

    def _open_tensorboard(self) -> None:
        if not (self.is_main and self.cfg.logging.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            log.warning("logging.tensorboard = true but the tensorboard package is not installed; metrics go to %s only.", METRICS_FILE)
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    @torch.no_grad()
    def validate(self) -> Path | None:
        """Sample validation latents with :func:`dcm_core.sampler.sample_dcm` (main process; under FSDP every
        process runs the same forwards, the sharded student needs them all)."""
        if not self.is_main and not self.strategy.validate_on_all_processes and self.sp is None:
            return None
        from ..sampler import sample_dcm

        cfg, v = self.cfg, self.cfg.validation
        n = min(v.num_samples, len(self.dataset))
        batch = collate([self.dataset[i] for i in range(n)]).to(self.accelerator.device)
        cond = self._cond(batch)
        model = self.student_unwrapped
        boundary = float(cfg.schedule.boundary_timestep)
        if v.sigmas:
            sigmas = _parse_sigma_option(v.sigmas, v.steps, boundary, cfg.schedule.shift)
        elif cfg.stage == STAGE_SEMANTIC:
            sigmas = pcm_default_sigmas(v.steps, cfg.schedule.shift)
        else:
            sigmas = build_sigmas(DEFAULT_PRESET[self.family])
        shape = batch.latents.shape
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(v.seed)).to(self.accelerator.device)

        pair_detail = self.stage == STAGE_DETAIL and self.models.boundary_timestep is not None

        def model_fn(x: torch.Tensor, sigma: float, expert: str) -> torch.Tensor:
            # semantic stage: the student is the only expert; detail stage: routed per step (a two-transformer base's
            # semantic steps: its stock high-noise transformer, the detail student being the low-noise one)
            e = expert if self.stage == STAGE_DETAIL else STAGE_SEMANTIC
            s = torch.full((x.shape[0],), float(sigma))
            with self.accelerator.autocast():
                if pair_detail and e == STAGE_SEMANTIC:
                    return self._teacher_call(self.models.teacher_for(True), x, s, cond)
                return call_velocity(model, model, x, s, cond, e)

        was_training = model.training
        model.eval()
        try:
            x = clean_first_frame(sample_dcm(model_fn, noise, sigmas, boundary), cond)
        finally:
            model.train(was_training)
        if not self.is_main:
            return None
        out_dir = self.run_dir / "validation"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step-{self.global_step:08d}.safetensors"
        raw = self.latent_format.from_model_space(x.float().cpu())
        ck.save_tensors(
            path,
            {"latents": raw},
            metadata={"sigmas": json.dumps(sigmas), "captions": json.dumps(batch.captions), "family": self.family},
        )
        if v.vae:
            try:
                from .video_io import decode_latents_to_mp4

                fps = v.fps or (16 if self.family == FAMILY_WAN else 24)
                decode_latents_to_mp4(v.vae, self.family, raw, path.with_suffix(""), fps=fps)
            except Exception as e:  # decoding is a convenience; never kill the run for it
                log.warning("validation decode failed (%s); the latents are saved in %s", e, path)
        log.info("validation sample: %s", path)
        return path

    # ------------------------------------------------------------------ main loop

    def train(self) -> TrainResult:
        """Run until ``max_train_steps``; checkpoint, validate and export on schedule."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self._open_tensorboard()
        total = cfg.max_train_steps
        bar = tqdm(
            total=total,
            initial=self.global_step,
            desc=f"DCM {cfg.stage}",
            disable=not (self.is_main and cfg.logging.progress_bar),
            dynamic_ncols=True,
        )
        t_start, s_start = time.perf_counter(), self.global_step
        last_saved = self.global_step if self.global_step else -1
        while self.global_step < total:
            t0 = time.perf_counter()
            logs = self.train_step()
            self.global_step += 1
            dt = time.perf_counter() - t0
            self._log(logs, dt)
            bar.update(1)
            bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "loss_cd", "loss_tc", "loss_g", "loss_d") if k in logs})
            if cfg.checkpoint.every_steps and self.global_step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
                last_saved = self.global_step
            if cfg.validation.every_steps and self.global_step % cfg.validation.every_steps == 0:
                self.validate()
                acc.wait_for_everyone()
        bar.close()
        elapsed = time.perf_counter() - t_start
        sps = (self.global_step - s_start) / elapsed if elapsed > 0 else 0.0
        if last_saved != self.global_step:
            self.save_checkpoint()
        elif self.is_main and s_start == self.global_step:
            # resumed at the last step (killed after publishing it, before rotating): nothing to save, but
            # the keep limit applies as after every save
            ck.rotate(self.ckpt_root, self.cfg.checkpoint.keep)
        exported: dict[str, str] = {}
        if cfg.export.at_end:
            acc.wait_for_everyone()
            if self.is_main:
                exported = self.strategy.export(self)
            acc.wait_for_everyone()
        if self._tb is not None:
            self._tb.close()
        if self.is_main:
            log.info("finished %d steps (%.3f steps/s); run folder %s", self.global_step, sps, self.run_dir)
        acc.end_training()
        return TrainResult(self.run_dir, self.global_step, self.history, exported, sps)


def _boundary_text(solver: PCMSolver) -> str:
    """The consistency boundary of the startup line: one σ_b, or the PCM phases and their σ_b."""
    if not solver.phased:
        return f"σ_b={solver.sigma_boundary:.6f}"
    e, g = solver.phase_edges, solver.grid.num_steps
    phases = ", ".join(f"[{lo},{hi})→{s:.6f}" for lo, hi, s in zip(e, (*e[1:], g), solver.phase_sigmas))
    return f"{len(e)} PCM phases (k range → σ_b: {phases})"


def _parse_sigma_option(text: str, steps: int, boundary: float, shift: float) -> list[float]:
    from ..schedule import PRESET_NAMES, parse_custom_sigmas

    name = text.strip()
    if name in PRESET_NAMES:
        return build_sigmas(name, steps=steps, boundary_timestep=boundary, shift=shift)
    return parse_custom_sigmas(name)


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "tiny_config":
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def train(cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    """Build a :class:`DCMTrainer` and run it."""
    return DCMTrainer(cfg, resume).train()
