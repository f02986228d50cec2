"""How a run is spread over processes: one strategy object, so the trainer body has no sharding branches.

* :class:`Replicated` — one process, or DDP through ``accelerator.prepare`` (gloo / NCCL): every process
  holds the whole student; checkpoints are written by process 0.
* :class:`FSDP2` — ``accelerate launch --use_fsdp``: the student sharded with torch's ``fully_shard``
  (:mod:`.fsdp`), the discriminator replicated (DDP, the official ``NO_SHARD``), the teacher replicated.
  Sharded tensors are gathered one at a time for a checkpoint (written by process 0, the same files as a
  replicated run) and every process reads only its own rows on resume.

Both implement the same operations, in the order the trainer uses them: :meth:`shard` (before the
optimisers exist), :meth:`prepare`, :meth:`no_sync`, :meth:`save_state` / :meth:`load_state` (trainable
weights, EMA, optimizer) and :meth:`export`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DCMCheckpointError, DCMConfigError
from . import checkpoint as ck
from . import fsdp as fs

log = logging.getLogger("DCM.train")

Named = list[tuple[str, nn.Parameter]]


@dataclass
class Prepared:
    """What :meth:`Replicated.prepare` returns: the modules to call (wrapped) and to inspect (unwrapped)."""

    student: nn.Module
    optimizer: torch.optim.Optimizer
    disc: nn.Module | None
    disc_unwrapped: nn.Module | None
    d_optimizer: torch.optim.Optimizer | None


def make_strategy(accelerator: Any) -> "Replicated":
    """The strategy of this launch (refuses what the trainer does not support)."""
    dt = accelerator.distributed_type.name
    if dt in ("DEEPSPEED", "MEGATRON_LM"):
        raise DCMConfigError(
            f"accelerate is configured for {dt}; the DCM trainer supports single-process, DDP (multi-GPU / multi-CPU) "
            f"and FSDP runs. Re-run `accelerate config` choosing multi-GPU (optionally with FSDP); use "
            f"model.semantic_lora=true, model.teacher_dtype=bf16 and model.gradient_checkpointing=true to save memory."
        )
    settings = fs.fsdp_settings(accelerator)
    if settings is not None and accelerator.num_processes == 1:
        log.warning("FSDP was requested with a single process: nothing to shard, the run is not sharded.")
        settings = None
    return Replicated(accelerator) if settings is None else FSDP2(accelerator, settings)


class Replicated:
    """One process or DDP (accelerate's ``prepare``); process 0 writes the checkpoints."""

    #: ``trainer_state.json`` "sharding" value
    name = "none"
    #: suffix of the start-up log line
    label = ""
    #: activation checkpointing asked by the launcher (FSDP's flag)
    activation_checkpointing = False
    #: EMA weights must be copied into the live parameters, not pointer-swapped
    ema_inplace = False
    #: validation sampling runs on every process (a sharded student needs them all)
    validate_on_all_processes = False

    def __init__(self, accelerator: Any) -> None:
        self.acc = accelerator

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def shard(self, student: nn.Module, family: str) -> None:
        """Shard the student in place before the optimisers are built (nothing to do here)."""

    def prepare(
        self, student: nn.Module, optimizer: torch.optim.Optimizer, disc: nn.Module | None, d_optimizer: torch.optim.Optimizer | None
    ) -> Prepared:
        if disc is not None:
            student, optimizer, disc_w, d_optimizer = self.acc.prepare(student, optimizer, disc, d_optimizer)
            return Prepared(student, optimizer, disc_w, self.acc.unwrap_model(disc_w), d_optimizer)
        student, optimizer = self.acc.prepare(student, optimizer)
        return Prepared(student, optimizer, None, None, None)

    def no_sync(self, module: nn.Module) -> Any:
        """Skip the gradient reduction of this micro-batch."""
        return self.acc.no_sync(module)

    # ---------------------------------------------------------------- checkpoints (trainable state)

    def save_state(self, writer: ck.CheckpointWriter, trainable: Named, ema: Any, optimizer: torch.optim.Optimizer) -> None:
        """``trainable.safetensors``, ``ema.safetensors``, ``optimizer.*`` (called on every process)."""
        if not self.is_main:
            return
        writer.tensors("trainable.safetensors", {n: p.detach().float() for n, p in trainable})
        if ema is not None:
            writer.tensors("ema.safetensors", ema.shadow)
        t, m = ck.optimizer_to_flat(optimizer.state_dict())
        writer.tensors("optimizer.safetensors", t)
        writer.json("optimizer.json", m)

    def load_state(self, path: Path, trainable: Named, ema: Any, optimizer: torch.optim.Optimizer) -> None:
        tensors = ck.load_tensors(path / "trainable.safetensors")
        _check_names(path, set(tensors), trainable)
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(tensors[n].to(p.device, p.dtype))
        if ema is not None:
            shadow = ck.load_tensors(path / "ema.safetensors")
            ema.shadow = {n: shadow[n].to(self.acc.device) for n in ema.shadow}
        opt_sd = ck.optimizer_from_flat(ck.load_tensors(path / "optimizer.safetensors"), ck.load_json(path / "optimizer.json"))
        optimizer.load_state_dict(opt_sd)

    # ---------------------------------------------------------------- export

    def export(self, trainer: Any) -> dict[str, str]:
        """The export at the end of training (process 0): from the live student."""
        from .export import export_model

        return export_model(trainer.cfg, trainer.student_unwrapped, trainer.run_dir / "export", step=trainer.global_step)


class FSDP2(Replicated):
    """Student sharded with torch's ``fully_shard``; discriminator DDP; teacher replicated (see :mod:`.fsdp`)."""

    name = "fsdp2"
    label = " (FSDP2)"
    ema_inplace = True
    validate_on_all_processes = True

    def __init__(self, accelerator: Any, settings: fs.FSDPSettings) -> None:
        super().__init__(accelerator)
        self.settings = settings
        self.activation_checkpointing = settings.activation_checkpointing

    def shard(self, student: nn.Module, family: str) -> None:
        fs.shard_model(student, family, self.acc.device, self.acc.num_processes, self.settings.reshard_after_forward)

    def prepare(
        self, student: nn.Module, optimizer: torch.optim.Optimizer, disc: nn.Module | None, d_optimizer: torch.optim.Optimizer | None
    ) -> Prepared:
        # the student is already sharded (fully_shard works in place); the discriminator is replicated (DDP, the
        # official NO_SHARD)
        disc_w = None
        if disc is not None:
            from torch.nn.parallel import DistributedDataParallel

            disc.to(self.acc.device)
            dev = self.acc.device
            ids = [dev.index] if dev.type == "cuda" and dev.index is not None else None
            disc_w = DistributedDataParallel(disc, device_ids=ids)
        return Prepared(student, optimizer, disc_w, disc, d_optimizer)

    def no_sync(self, module: nn.Module) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        if fs.is_fsdp_module(module):
            return fs.no_grad_sync(module)
        if isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def save_state(self, writer: ck.CheckpointWriter, trainable: Named, ema: Any, optimizer: torch.optim.Optimizer) -> None:
        # sharded tensors are gathered one at a time by every process (a collective), kept on process 0 only: the
        # files are the same as a replicated run's
        main = self.is_main

        def gathered(named: Any) -> dict[str, torch.Tensor]:
            out = {}
            for n, t in named:
                full = fs.full_tensor(t.detach())
                if main:
                    out[n] = full.float().cpu()
            return out

        weights = gathered(trainable)
        if main:
            writer.tensors("trainable.safetensors", weights)
        del weights
        if ema is not None:
            shadow = gathered(ema.shadow.items())
            if main:
                writer.tensors("ema.safetensors", shadow)
            del shadow
        opt_sd = fs.full_optimizer_state(optimizer, [p for _, p in trainable], main)
        if main:
            t, m = ck.optimizer_to_flat(opt_sd)
            writer.tensors("optimizer.safetensors", t)
            writer.json("optimizer.json", m)

    def load_state(self, path: Path, trainable: Named, ema: Any, optimizer: torch.optim.Optimizer) -> None:
        # every process reads only its own rows of each tensor
        reader = fs.ShardedReader(path / "trainable.safetensors")
        _check_names(path, set(reader.keys()), trainable)
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(reader.get(n, p))
        if ema is not None:
            er = fs.ShardedReader(path / "ema.safetensors")
            ema.shadow = {n: er.get(n, ema.params[n]) for n in ema.shadow}
        fs.load_optimizer_state(
            optimizer, [p for _, p in trainable], fs.ShardedReader(path / "optimizer.safetensors"),
            ck.load_json(path / "optimizer.json"),
        )

    def export(self, trainer: Any) -> dict[str, str]:
        """The student's weights are sharded over the processes: rebuild it from the final checkpoint, exactly as
        ``python -m dcm_core export RUN_DIR`` does — the same files as a replicated run writes."""
        from .export import export_run

        if trainer.last_checkpoint is None:
            raise DCMCheckpointError("internal: no final checkpoint to export from under FSDP.")
        return export_run(trainer.run_dir, checkpoint=str(trainer.last_checkpoint))


def _check_names(path: Path, saved: set[str], trainable: Named) -> None:
    names = {n for n, _ in trainable}
    if saved != names:
        raise DCMCheckpointError(
            f"checkpoint {path} holds {len(saved)} trainable tensors, the model has {len(names)} "
            f"(e.g. missing {sorted(names - saved)[:3]}); the config changed the trainable set."
        )
