"""How a run is spread over processes: one strategy object, so the trainer body has no sharding branches.

* :class:`Replicated` — one process, or DDP through ``accelerator.prepare`` (gloo / NCCL): every process
  holds the whole student; checkpoints are written by process 0.
* :class:`FSDP2` — ``accelerate launch --use_fsdp``: the student sharded with torch's ``fully_shard``
  (:mod:`.fsdp`), the discriminator replicated (DDP, the official ``NO_SHARD``), the teacher replicated.
  Checkpoints are sharded (``torch.distributed.checkpoint``: every process writes its own rows of the
  trainable weights, EMA and optimizer moments, nothing is gathered; :mod:`.checkpoint`), and every
  process reads only its own rows on resume — from a sharded checkpoint of any process count or from an
  unsharded one.

Either strategy resumes from either format (a run may change its process count: 2 → 1 and 1 → 2 are
tested); a sharded checkpoint read without FSDP is read whole.

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

    def build_models(self, cfg: Any) -> Any:
        """The stage's models (:func:`.models.build_models`): every process loads them."""
        from .models import build_models

        return build_models(cfg)

    def shard(self, student: nn.Module, family: str, *, teacher: nn.Module | None = None) -> None:
        """Shard the student (and ``teacher``: ``parallel.shard_teacher``) in place before the optimisers are built
        (nothing to do here)."""
        if teacher is not None:
            log.warning("parallel.shard_teacher is set but the run is not sharded (launch with --use_fsdp): the teacher stays whole.")

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
        if ck.is_sharded(path):  # written under FSDP2: read whole (this process alone)
            files = ck.sharded_as_files(path)
            load = files.get
        else:
            files = {}

            def load(name: str) -> dict[str, torch.Tensor]:
                return ck.load_tensors(path / name)

        tensors = load("trainable.safetensors") or {}
        _check_names(path, set(tensors), trainable)
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(tensors[n].to(p.device, p.dtype))
        if ema is not None:
            shadow = load("ema.safetensors")
            if shadow is None:
                raise DCMCheckpointError(f"checkpoint {path} holds no EMA weights but optim.use_ema is on.")
            ema.shadow = {n: shadow[n].to(self.acc.device) for n in ema.shadow}
        opt_sd = ck.optimizer_from_flat(load("optimizer.safetensors") or {}, ck.load_json(path / "optimizer.json"))
        optimizer.load_state_dict(opt_sd)
        del files

    # ---------------------------------------------------------------- export

    def export(self, trainer: Any) -> dict[str, str]:
        """The export at the end of training (process 0): from the live student."""
        from .export import export_model, export_run

        if trainer.cfg.model.detail_base_dtype != "fp32" and trainer.cfg.stage == "detail":
            # the live student's frozen base is held in bf16: export the fp32 weights, rebuilt from the checkpoint
            return export_run(trainer.run_dir, checkpoint=_str(trainer.last_checkpoint))
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
        self.student: nn.Module | None = None

    def build_models(self, cfg: Any) -> Any:
        """Process 0 loads the models as one process would; the others build them on the ``meta`` device (no
        storage, no weight read) and receive the weights from process 0 once sharded (:meth:`shard`): no process
        but 0 ever holds a full fp32 copy. Process 0's torch RNG state after the build is given to every process,
        so what is drawn next (discriminator initialisation, …) is the same as if each had loaded the models."""
        from .models import build_models

        models = build_models(cfg, on_meta=not self.is_main)
        state = torch.get_rng_state()
        torch.distributed.broadcast(state, src=0)
        torch.set_rng_state(state)
        self._models = models
        # process 0: the full tensors (references, no copy) kept until every process has its share (shard())
        self._full = {}
        if self.is_main:
            self._full = {"student": dict(models.student.state_dict())}
            if models.teacher is not None:
                self._full["teacher"] = dict(models.teacher.state_dict())
        return models

    def shard(self, student: nn.Module, family: str, *, teacher: nn.Module | None = None) -> None:
        n, dev, raf = self.acc.num_processes, self.acc.device, self.settings.reshard_after_forward
        fs.shard_model(student, family, dev, n, raf, fs.mixed_precision_policy(self.acc.mixed_precision), what="student: ")
        self.student = student
        if teacher is not None:  # frozen: gathered in its storage dtype (no policy), resharded after every forward
            fs.shard_model(teacher, family, dev, n, True, None, root=False, what="teacher: ")
        # weights from process 0 (each process keeps its rows of the sharded tensors, the whole replicated ones)
        models = getattr(self, "_models", None)
        if models is not None:
            fs.load_from_main(student, self._full.get("student"), dev)
            if models.teacher is not None:
                fs.load_from_main(models.teacher, self._full.get("teacher"), dev)
            self._full = {}

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
        """Every process writes its own rows (DCP, ``sharded/``); nothing is gathered. Process 0 adds
        ``optimizer.json`` (param groups, scalars, the position → name table)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.student, optimizer, options=_OPTIONS())
        _check_names(writer.final, set(msd), trainable)
        names = [n for n, _ in trainable]
        position = {n: i for i, n in enumerate(names)}
        flat = {f"trainable.{n}": msd[n] for n in names}
        if ema is not None:
            flat.update({f"ema.{n}": t for n, t in ema.shadow.items()})
        by_position = {
            "state": {position[f]: st for f, st in osd["state"].items()},
            "param_groups": [dict(g, params=[position[f] for f in g["params"]]) for g in osd["param_groups"]],
        }
        opt_t, opt_m = ck.optimizer_to_flat(by_position)
        for key, t in opt_t.items():
            _, pid, state = key.split(".", 2)
            flat[f"optimizer.{names[int(pid)]}.{state}"] = t
        writer.sharded(flat)
        if self.is_main:
            writer.json("optimizer.json", {**opt_m, "param_names": names})

    def load_state(self, path: Path, trainable: Named, ema: Any, optimizer: torch.optim.Optimizer) -> None:
        if not ck.is_sharded(path):
            return self._load_unsharded(path, trainable, ema, optimizer)
        # a sharded checkpoint of any process count: DCP reads this process's rows into the sharded tensors
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = ck.load_json(path / "optimizer.json")
        names = [n for n, _ in trainable]
        _check_names(path, set(meta.get("param_names", [])), trainable)
        msd, osd = get_state_dict(self.student, optimizer, options=_OPTIONS())  # (initialises the moments)
        targets = {f"trainable.{n}": msd[n] for n in names}
        if ema is not None:
            targets.update({f"ema.{n}": t for n, t in ema.shadow.items()})
        for f, st in osd["state"].items():
            targets.update({f"optimizer.{f}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
        ck.load_sharded(path, targets, this_process_only=False)
        position = {n: i for i, n in enumerate(meta["param_names"])}
        opt_t = {
            f"state.{position[f]}.{k}": targets[f"optimizer.{f}.{k}"]
            for f, st in osd["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)
        }
        by_position = ck.optimizer_from_flat(opt_t, meta)
        order = meta["param_names"]
        optim_sd = {
            "state": {order[i]: st for i, st in by_position["state"].items()},
            "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in by_position["param_groups"]],
        }
        set_state_dict(
            self.student, optimizer, model_state_dict={n: targets[f"trainable.{n}"] for n in names},
            optim_state_dict=optim_sd, options=_OPTIONS(strict=False),
        )

    def _load_unsharded(self, path: Path, trainable: Named, ema: Any, optimizer: torch.optim.Optimizer) -> None:
        """An unsharded checkpoint (one process / DDP): every process reads only its own rows of each tensor."""
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

        # (a run resumed at its last step saved nothing: its newest checkpoint is the final one)
        return export_run(trainer.run_dir, checkpoint=_str(trainer.last_checkpoint))


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _OPTIONS(**kw: Any) -> Any:
    """``StateDictOptions`` of the trainable state: frozen parameters (teacher base, detail base) are never saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def _check_names(path: Path, saved: set[str], trainable: Named) -> None:
    names = {n for n, _ in trainable}
    if saved != names:
        raise DCMCheckpointError(
            f"checkpoint {path} holds {len(saved)} trainable tensors, the model has {len(names)} "
            f"(e.g. missing {sorted(names - saved)[:3]}); the config changed the trainable set."
        )
