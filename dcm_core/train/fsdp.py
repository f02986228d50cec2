"""FSDP for the DCM trainer: torch's ``fully_shard`` (FSDP2), driven by accelerate's FSDP settings.

How a run is sharded (``accelerate launch --use_fsdp ...``, see the trainer README):

* **student** — every transformer block is one FSDP unit (Wan ``WanTransformerBlock``;
  HunyuanVideo ``HunyuanVideoTransformerBlock`` / ``HunyuanVideoSingleTransformerBlock``), the rest
  of the model (patch / text / time embedders, the output head, the detail expert's ``*_lora``
  embedder and head copies, the token refiner) is the root unit. Frozen and trainable parameters
  share units (FSDP2 shards each parameter on its own, ``requires_grad`` may differ inside a
  unit): the detail expert's LoRA sits in the block units beside the frozen base weights.
  :func:`dcm_core.modeling.expert_mode` swaps ``condition_embedder`` ↔ ``condition_embedder_lora``
  (and the head modules) on the model instance: both live in the root unit, which FSDP2
  all-gathers as a whole at the start of every forward, and FSDP2 binds parameters to the module
  *objects*, not to their attribute names — so the swap is seen by the sharded model exactly as by
  an unsharded one (checked numerically by the tests).
* **parameters stay fp32 masters** (sharded; AdamW updates them in fp32). Without mixed precision
  they are also all-gathered and reduce-scattered in fp32 (the official ``MixedPrecision(fp32, fp32,
  fp32)``). Under ``mixed_precision = "bf16"`` FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32, cast_forward_inputs=False)`` all-gathers them in bf16 (half the traffic and half
  the gathered units' memory; the inputs are left alone and the forwards run under bf16 autocast, as in
  the official scripts) and reduce-scatters the gradients in fp32. Gradients are averaged over processes (reduce-scatter).
* **teacher** — frozen, **replicated** by default: every process holds the whole teacher in
  ``model.teacher_dtype`` (bf16 under mixed precision; one bf16 copy of the base model per GPU: Wan
  1.3B 2.6 GB, Wan 14B 28 GB, HunyuanVideo 13B 26 GB). ``parallel.shard_teacher = true`` shards its
  transformer blocks too (each block one FSDP2 unit, gathered in its storage dtype — no policy, so
  the numbers are the replicated teacher's); its embedders and output head stay whole on every
  process, because the discriminator decodes the captured features with the teacher's head
  *outside* the teacher's forward, which a sharded root could not serve. In semantic-LoRA mode the
  teacher is the sharded student with its adapter switched off (no extra copy at all).
* **discriminator** — replicated, plain DDP (the official ``NO_SHARD``).
* **activation checkpointing** (``--fsdp_activation_checkpointing``) turns on the diffusers
  per-block gradient checkpointing of the student and the frozen teacher (same as
  ``model.gradient_checkpointing``).

Checkpoints are sharded (:mod:`.checkpoint`, ``torch.distributed.checkpoint``): every process writes
its own rows, nothing is gathered. On resume every process reads only its own rows — of a sharded
checkpoint (any process count) through DCP, of an unsharded one (one process / DDP) from its
safetensors files (:class:`ShardedReader`). So a checkpoint written under FSDP resumes under DDP or in
one process and vice versa.

accelerate (1.15) only switches to ``DistributedType.FSDP`` on accelerators; with
``ACCELERATE_USE_CPU=true`` it silently falls back to DDP (``MULTI_CPU``) although the launcher
exported ``ACCELERATE_USE_FSDP=true`` and the ``FSDP_*`` settings. :func:`fsdp_settings` therefore
reads those environment variables itself, so two CPU processes (gloo) really run FSDP — that is
how the tests verify it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import DCMConfigError
from ..schedule import FAMILY_HUNYUAN, FAMILY_WAN

log = logging.getLogger("DCM.train")

#: Classes that become FSDP units, per family (the diffusers block classes).
BLOCK_CLASSES = {
    FAMILY_WAN: ("WanTransformerBlock",),
    FAMILY_HUNYUAN: ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"),
}

_TRUE = ("1", "true", "yes", "on")


@dataclass
class FSDPSettings:
    """What the launcher asked for (accelerate's FSDP flags / config keys)."""

    version: int = 2
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    offload_params: bool = False
    sharding_strategy: str = "FULL_SHARD"


def _env_flag(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() in _TRUE


def fsdp_settings(accelerator: Any) -> FSDPSettings | None:
    """The FSDP request of this launch, or None (no FSDP). Refuses what the trainer does not support."""
    dt = accelerator.distributed_type.name
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if dt != "FSDP" and not _env_flag("ACCELERATE_USE_FSDP"):
        return None
    s = FSDPSettings()
    if plugin is not None:  # accelerate built it from the same env / config file
        s.version = int(getattr(plugin, "fsdp_version", 1) or 1)
        strat = getattr(plugin, "sharding_strategy", None)
        s.sharding_strategy = str(getattr(strat, "name", strat or "FULL_SHARD")).upper()
        raf = getattr(plugin, "reshard_after_forward", None)  # FSDP2: a bool; FSDP1 configs: the strategy says it
        if isinstance(raf, bool):
            s.reshard_after_forward = raf
        elif raf is not None:
            s.reshard_after_forward = str(getattr(raf, "name", raf)).upper() != "SHARD_GRAD_OP"
        else:
            s.reshard_after_forward = s.sharding_strategy != "SHARD_GRAD_OP"
        s.activation_checkpointing = bool(getattr(plugin, "activation_checkpointing", False))
        off = getattr(plugin, "cpu_offload", None)
        s.offload_params = bool(getattr(off, "offload_params", False)) or type(off).__name__ == "CPUOffloadPolicy"
    else:  # accelerate dropped FSDP (CPU) or was not asked through it: read the launcher's variables
        s.version = int(os.environ.get("FSDP_VERSION", "1") or 1)
        strat = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
        if strat.isdigit():  # accelerate's old numeric form
            strat = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD", "5": "HYBRID_SHARD_ZERO2"}.get(strat, strat)
        s.sharding_strategy = strat
        raf = os.environ.get("FSDP_RESHARD_AFTER_FORWARD")
        if raf is not None:
            s.reshard_after_forward = raf.strip().upper() in ("TRUE", "1", "YES", "FULL_SHARD")
        else:
            s.reshard_after_forward = strat != "SHARD_GRAD_OP"
        s.activation_checkpointing = _env_flag("FSDP_ACTIVATION_CHECKPOINTING")
        s.offload_params = _env_flag("FSDP_OFFLOAD_PARAMS")
    if s.sharding_strategy in ("NO_SHARD",):
        raise DCMConfigError(
            "FSDP sharding strategy NO_SHARD is plain data parallelism: launch without --use_fsdp (DDP) instead."
        )
    if s.sharding_strategy.startswith("HYBRID"):
        raise DCMConfigError(
            f"FSDP sharding strategy {s.sharding_strategy} is not supported by the DCM trainer; use FULL_SHARD "
            f"(or SHARD_GRAD_OP, i.e. --fsdp_reshard_after_forward false)."
        )
    if s.offload_params:
        raise DCMConfigError(
            "FSDP parameter offloading (fsdp_offload_params) is not supported by the DCM trainer. Save memory with "
            "mixed_precision=bf16, model.teacher_dtype=bf16, model.gradient_checkpointing=true, model.semantic_lora=true "
            "or more processes."
        )
    if s.version != 2:
        log.warning(
            "FSDP version %d was requested; the DCM trainer always shards with FSDP2 (torch fully_shard, per-parameter "
            "sharding: frozen and trainable weights share units, the expert swap works). Set fsdp_version: 2 to silence this.",
            s.version,
        )
        s.version = 2
    return s


# ---------------------------------------------------------------------------- sharding


def _base_class_name(module: nn.Module) -> str:
    """The class name without FSDP2's dynamic ``FSDP`` prefix."""
    for cls in type(module).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls.__name__
    return type(module).__name__


def block_units(model: nn.Module, family: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every transformer block of ``model`` (the FSDP units below the root)."""
    names = BLOCK_CLASSES.get(family, ())
    return [(n, m) for n, m in model.named_modules() if n and _base_class_name(m) in names]


def mixed_precision_policy(mixed_precision: str) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` of a run: under ``mixed_precision = "bf16"`` the fp32 masters are
    all-gathered (and computed with) in bf16 and the gradients reduce-scattered in fp32; otherwise None (fp32
    throughout).

    The forward's inputs are NOT cast (``cast_forward_inputs=False``): FSDP2 would otherwise round the timestep
    ``1000·σ`` to bf16 (steps of 4 above 512) and every block's ``temb`` before diffusers' own ``.float()``; the
    forwards run under bf16 autocast anyway (accelerate), which picks the matmul dtype as in a one-process run."""
    if mixed_precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(
    model: nn.Module,
    family: str,
    device: torch.device,
    world_size: int,
    reshard_after_forward: bool,
    mp_policy: Any = None,
    *,
    root: bool = True,
    what: str = "",
) -> nn.Module:
    """``fully_shard`` every block, then the root (in place; returns the same object).

    ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy`` (:func:`mixed_precision_policy`) or None. ``root = False``
    shards the blocks only (the frozen teacher: its embedders and head stay whole, see the module doc)."""
    # diffusers' transformers return their unpatchified output as a view; FSDP2 warns that an IN-PLACE op on it
    # would skip its pre-backward hook. The trainer only uses model outputs out of place (call_velocity →
    # solver / losses), and the gradients equal an unsharded run's (tests/unit/train/test_fsdp.py).
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    units = block_units(model, family)
    if not units:
        raise DCMConfigError(f"no {family} transformer blocks found to shard ({', '.join(BLOCK_CLASSES.get(family, ()))}).")
    if not is_on_meta(model):  # (a meta model gets its storage from load_from_main after sharding)
        model.to(device)
    mesh = init_device_mesh(device.type, (world_size,))
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for _, block in units:
        fully_shard(block, **kw)
    if root:
        fully_shard(model, **kw)
    gathered = "fp32" if mp_policy is None else f"param_dtype={_dtype_name(mp_policy.param_dtype)}, reduce_dtype={_dtype_name(mp_policy.reduce_dtype)}"
    log.info(
        "FSDP2: %s%d block units (%s)%s over %d processes, reshard_after_forward=%s, all-gather %s",
        what,
        len(units),
        ", ".join(sorted({_base_class_name(m) for _, m in units})),
        " + the root unit" if root else " (embedders and head whole)",
        world_size,
        reshard_after_forward,
        gathered if mp_policy is not None or root else "in the storage dtype",
    )
    return model


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", None: "as stored"}.get(dtype, str(dtype))


def is_on_meta(model: nn.Module) -> bool:
    """Whether ``model``'s tensors are on the ``meta`` device (built without storage)."""
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def load_from_main(model: nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Give every process ``model``'s weights from process 0 (collective: every process calls it).

    Process 0 holds the loaded model (``full`` = its ``state_dict()``, taken before sharding); the others built
    it on ``meta``: they get storage (``to_empty``) and receive the weights tensor by tensor through
    ``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`` — each keeps its rows of a
    sharded parameter, all of a replicated one; no process but 0 holds the whole model at any time. Buffers
    (non-persistent ones such as the rotary tables are not in the state dict) are broadcast too."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    main = dist.get_rank() == 0
    if not main:
        model.to_empty(device=device)
    set_model_state_dict(
        model, full if main else {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    with torch.no_grad():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(module: nn.Module) -> Iterator[None]:
    """FSDP2's ``no_sync``: accumulate unsharded gradients, reduce-scatter on the last micro-batch."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for sharded tensors: every process must call it, in the same order)."""
    if is_sharded(t):
        return t.full_tensor()
    return t


def to_float(t: Any) -> float:
    if t is None:
        return 0.0
    return float(full_tensor(t)) if isinstance(t, torch.Tensor) else float(t)


def _local_rows(like: torch.Tensor) -> tuple[int, int] | None:
    """Rows ``[start, stop)`` of dim 0 this process holds of a ``Shard(0)`` tensor (``torch.chunk`` split), or None."""
    from torch.distributed.tensor import Shard

    placements = like.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise DCMConfigError(f"unexpected FSDP placement {placements} (expected Shard(0)).")
    mesh = like.device_mesh
    n, world, rank = like.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-n // world) if n else 0
    start, stop = min(rank * chunk, n), min((rank + 1) * chunk, n)
    local = like.to_local()
    if local.shape[0] != stop - start:
        raise DCMConfigError(f"FSDP local shard has {local.shape[0]} rows, expected {stop - start} of {n}.")
    return start, stop


class ShardedReader:
    """Read safetensors entries as plain tensors or, given a sharded ``like``, only this process's rows."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._f = safe_open(str(path), framework="pt")

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str, like: torch.Tensor | None = None) -> torch.Tensor:
        if like is None or not is_sharded(like):
            t = self._f.get_tensor(key)
            return t if like is None else t.to(like.device, like.dtype)
        shape = self.shape(key)
        if shape != tuple(like.shape):
            raise DCMConfigError(f"{self.path.name}: {key} has shape {shape}, the sharded parameter {tuple(like.shape)}.")
        start, stop = _local_rows(like)
        rows = self._f.get_slice(key)[start:stop] if stop > start else torch.empty((0, *shape[1:]))
        out = torch.zeros_like(like)
        out.to_local().copy_(rows.to(out.dtype))
        return out


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], reader: ShardedReader, meta: dict[str, Any]
) -> None:
    """Load an optimizer state written by :func:`dcm_core.train.checkpoint.optimizer_to_flat`, sharding every
    state tensor that has its parameter's shape like the parameter."""
    from .checkpoint import optimizer_from_flat

    tensors = {}
    for key in reader.keys():
        _, pid, _name = key.split(".", 2)
        p = params[int(pid)]
        like = p if reader.shape(key) == tuple(p.shape) and p.dim() > 0 else None
        tensors[key] = reader.get(key, like)
    optimizer.load_state_dict(optimizer_from_flat(tensors, meta))
