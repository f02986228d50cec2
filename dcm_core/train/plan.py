"""``python -m dcm_core train ... --plan``: the per-process memory of a config, without loading any weight.

Nothing is read from the model's weight files; everything is counted:

* **parameters** — the stage's student (detail: + LoRA ``lora1`` and the ``*_lora`` copies) and teacher
  are built from the transformer's ``config.json`` on PyTorch's ``meta`` device (no storage); their
  exact element counts and storage dtypes give the weights, gradients (fp32, trainable only), AdamW
  moments (2 × fp32), EMA, teacher (``model.detail_base_dtype = "bf16"``: the detail student's frozen
  base in bf16). Under FSDP (``--num-gpus`` > 1, ``--sharding fsdp``) the student's share is divided by
  the process count and the largest block unit is gathered twice (current + prefetched) plus the root
  unit — in bf16 under ``mixed_precision = "bf16"`` (FSDP2 ``MixedPrecisionPolicy``), else fp32. With
  ``parallel.shard_teacher`` the teacher's blocks are divided by the process count too (embedders and
  head whole) plus two gathered teacher blocks in their storage dtype. DDP adds one fp32 gradient-bucket
  copy of the trainable parameters. Checkpoints under FSDP are sharded (every process writes its own
  rows): they add nothing on any process.
* **activations** — the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``,
  each storage once) in one forward of the family's transformer with 1 and 2 blocks of the REAL width
  (HunyuanVideo: double and single blocks separately) on the CPU, with uninitialised weights
  (``to_empty``: only sizes are read) and 1, 2, 3 latent frames of 32 tokens, fitted exactly by
  ``a + b·n + c·n²`` in the token count n; the rest is extrapolated to the clip's tokens and the
  model's blocks (``c`` — an attention matrix — is 0 with the fused attention kernels and dropped).
  With ``model.gradient_checkpointing`` a block keeps only its inputs (measured the same way with
  checkpointing on) plus, transiently, one block's activations in the backward's recomputation.
  With ``parallel.sequence_parallel = S`` the blocks count ``tokens / S`` (each process's share; outside the
  blocks the whole clip), the discriminator's features and heads ``ceil(T' / S)`` latent frames (each process
  runs the heads on whole frames).
  Stage semantic: one student forward with grad (teacher and target run under ``no_grad``); stage
  detail: the student and the teacher on the fake sample with grad, the discriminator's feature maps of
  fake and real kept for the D step, the discriminator heads (measured the same way under autocast).
* **overhead** — ``cuda``: 2 GiB (CUDA context, cuBLAS / NCCL workspaces, allocator slack: an estimate);
  ``cpu``: the resident size of this process after importing torch / diffusers / peft / accelerate
  (measured).

Validated against the peak RSS of real CPU runs (``bench/train_plan_check.py``; see the trainer README
for the numbers and the tolerance). Not validated on a GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DCMConfigError
from ..schedule import FAMILY_HUNYUAN, FAMILY_WAN
from .config import STAGE_DETAIL, TrainConfig

GiB = 2**30
#: Text tokens of the official encoders (Wan: umT5 512; HunyuanVideo: LLaVA-Llama 256)
TEXT_TOKENS = {FAMILY_WAN: 512, FAMILY_HUNYUAN: 256}
GPU_OVERHEAD = 2 * GiB


def transformer_config(cfg: TrainConfig) -> tuple[str, dict]:
    """``(family, config dict)`` of ``model.pretrained`` without reading any weight."""
    from .models import TINY_PREFIX, check_model_folder, check_transformer_config, resolve_transformer_dir

    m = cfg.model
    src = m.pretrained
    if src.startswith(TINY_PREFIX):
        from ..tiny import hunyuan_config, wan_config

        fam = src[len(TINY_PREFIX):]
        return fam, (wan_config if fam == FAMILY_WAN else hunyuan_config)(**(m.tiny_config or {}))
    p = Path(src).expanduser()
    if p.is_dir():
        d = resolve_transformer_dir(p)
        if d is None:
            raise DCMConfigError(f"{p} holds no transformer config.json (looked in ., transformer/, export/transformer/).")
        for root in sorted({p, d.parent}):
            check_model_folder(root)
        path = d / "config.json"
    else:
        path = Path(m.transformer_config) if m.transformer_config else p.with_name("config.json")
    if not path.is_file():
        raise DCMConfigError(f"{path}: no transformer config.json for the plan (set model.transformer_config).")
    config = json.loads(path.read_text())
    check_transformer_config(config, path)
    name = str(config.get("_class_name", ""))
    fam = FAMILY_WAN if name.startswith("Wan") else FAMILY_HUNYUAN if name.startswith("HunyuanVideo") else None
    if fam is None:
        raise DCMConfigError(f"{path}: _class_name={name!r} is neither a Wan nor a HunyuanVideo transformer.")
    return fam, {k: v for k, v in config.items() if not k.startswith("_")}


def _meta_model(family: str, config: dict, dtype: torch.dtype, **layers: int) -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    from .models import cast_frozen

    cls = WanTransformer3DModel if family == FAMILY_WAN else HunyuanVideoTransformer3DModel
    with torch.device("meta"):
        model = cls.from_config({**config, **layers})
    return cast_frozen(model, dtype)  # the _keep_in_fp32_modules stay fp32, as in the trainer


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------- activations


def _probe_model(family: str, config: dict, dtype: torch.dtype, **layers: int) -> nn.Module:
    """A 1- or 2-block model of the real width on the CPU with UNINITIALISED storage (``to_empty``): only the
    sizes of what autograd saves are read from it, never its values."""
    model = _meta_model(family, config, dtype, **layers).to_empty(device="cpu")
    return model.requires_grad_(False)


class _SavedBytes:
    """``with _SavedBytes(exclude) as c: ...`` → ``c.total``: bytes of the storages autograd saves inside the block,
    each storage once (a tensor saved by two ops costs memory once), those of ``exclude`` (parameters) left out."""

    def __init__(self, exclude):
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.seen:
            self.seen.add(st.data_ptr())
            self.total += st.nbytes()
        return t

    def __enter__(self) -> "_SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _saved_bytes(model: nn.Module, family: str, latent: tuple[int, ...], text: int, dtype: torch.dtype) -> int:
    """Bytes autograd saves (parameters and their views excluded) in one forward with grad on a [1, *latent] input."""
    x = torch.zeros((1, *latent), dtype=dtype, requires_grad=True)
    kw: dict[str, Any] = {"encoder_hidden_states": torch.zeros((1, text, 4096), dtype=dtype)}
    if family == FAMILY_HUNYUAN:
        kw["encoder_attention_mask"] = torch.ones((1, text), dtype=torch.bool)
        kw["pooled_projections"] = torch.zeros((1, 768), dtype=dtype)
        kw["guidance"] = torch.full((1,), 6016.0)
    with _SavedBytes(list(model.parameters()) + list(model.buffers())) as saved:
        model(hidden_states=x, timestep=torch.full((1,), 500.0), return_dict=False, **kw)
    return saved.total


def _linear_in_tokens(fn: Any, tokens_per_frame: int) -> tuple[float, float]:
    """``(a, b)`` of ``fn(frames) = a + b·n + c·n²`` (n = tokens), the exact fit through 1, 2, 3 frames (c dropped)."""
    y1, y2, y3 = (fn(k) for k in (1, 2, 3))
    # second difference = 2·c·n1² ; first difference = b·n1 + c·3·n1²
    n1 = tokens_per_frame
    c = (y3 - 2 * y2 + y1) / (2 * n1 * n1)
    b = (y2 - y1 - 3 * c * n1 * n1) / n1
    a = y1 - b * n1 - c * n1 * n1
    return a, b


@dataclass
class Activations:
    """Saved-for-backward bytes of one forward with grad: ``fixed + per_token·n`` outside the blocks plus per block."""

    fixed: float
    per_token: float
    #: per block kind: (count, (bytes, bytes per token), the same with checkpointing)
    blocks: list[tuple[int, tuple[float, float], tuple[float, float]]]

    def at(self, n: int, checkpointing: bool, outer: int | None = None) -> float:
        """Bytes at ``n`` tokens through the blocks and ``outer`` (default ``n``) outside them (sequence parallelism:
        the blocks see the process's share, the patch embedding and the gathered output the whole clip)."""
        body = sum(cnt * (f[0] + f[1] * n if not checkpointing else c[0] + c[1] * n) for cnt, f, c in self.blocks)
        total = self.fixed + self.per_token * (n if outer is None else outer) + body
        if checkpointing:  # the backward recomputes one block at a time: the largest one's activations, transiently
            total += max(f[0] + f[1] * n for _, f, _ in self.blocks)
        return total


_PROFILES: dict[str, Activations] = {}


def activations(family: str, config: dict, latent: tuple[int, ...], text: int, dtype: torch.dtype) -> Activations:
    """Measure the model's saved bytes in small real-width probes (see the module docstring); the profile does not
    depend on the clip size, so it is measured once per model / text length / dtype in a process."""
    key = json.dumps([family, config, latent[0], text, str(dtype)], sort_keys=True, default=str)
    if key not in _PROFILES:
        _PROFILES[key] = _measure_activations(family, config, latent, text, dtype)
    return _PROFILES[key]


def _measure_activations(family: str, config: dict, latent: tuple[int, ...], text: int, dtype: torch.dtype) -> Activations:
    c, _, _, _ = latent
    patch = config["patch_size"]
    ph, pw = (patch[1], patch[2]) if family == FAMILY_WAN else (patch, patch)
    h, w = 4 * ph, 8 * pw  # a small frame (32 tokens): the counts are exactly linear (+ quadratic) in the tokens
    per_frame = (h // ph) * (w // pw)
    kinds = {"num_layers": config.get("num_layers", 1)}
    if family == FAMILY_HUNYUAN:
        kinds["num_single_layers"] = config.get("num_single_layers", 1)
    base = {k: 1 for k in kinds}

    def measure(layers: dict[str, int], ckpt: bool) -> tuple[float, float]:
        model = _probe_model(family, config, dtype, **layers)
        if ckpt:
            model.enable_gradient_checkpointing()
        return _linear_in_tokens(lambda f: _saved_bytes(model, family, (c, f, h, w), text, dtype), per_frame)

    a0, b0 = measure(base, False)
    a0c, b0c = measure(base, True)
    blocks = []
    fixed, per_token = a0, b0
    for k, count in kinds.items():
        a1, b1 = measure({**base, k: 2}, False)
        a1c, b1c = measure({**base, k: 2}, True)
        blocks.append((count, (a1 - a0, b1 - b0), (a1c - a0c, b1c - b0c)))
        fixed, per_token = fixed - (a1 - a0), per_token - (b1 - b0)  # the base model holds one block of each kind
    return Activations(fixed, per_token, blocks)


def discriminator_bytes(
    n_feat: int, dim: int, inner: int, grid: tuple[int, int, int], batch: int, dtype: torch.dtype
) -> tuple[int, int]:
    """``(parameters, saved bytes of D on fake + real)`` of the discriminator heads: fp32 heads under autocast to
    ``dtype`` on a small CPU probe (1 x 4 x 8 tokens, uninitialised), scaled to the clip's tokens (every op of a head
    is per token: 1x1 convolutions, GroupNorm, LeakyReLU)."""
    from .discriminator import Discriminator

    with torch.device("meta"):
        disc = Discriminator(1, dim, inner)
    disc = disc.to_empty(device="cpu")
    n_params = sum(p.numel() for p in disc.parameters()) * n_feat

    def saved(frames: int) -> int:
        probe = (frames, 4, 8)
        feats = [torch.zeros((1, math.prod(probe), dim), dtype=dtype)]
        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
        with autocast, _SavedBytes(disc.parameters()) as counter:
            disc(feats, probe)
        return counter.total

    one, two = saved(1), saved(2)
    per_token = (two - one) / 32  # the per-call part (autocast's weight copies) cancels
    fixed = one - 32 * per_token
    return n_params, int(2 * n_feat * (fixed + batch * per_token * math.prod(grid)))  # fake and real


# ---------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Per-process memory of a run, item by item (bytes)."""

    title: str
    items: list[tuple[str, float, str]] = field(default_factory=list)
    budget: float | None = None
    trainable: int = 0
    tokens: int = 0

    def add(self, name: str, nbytes: float, note: str = "") -> None:
        self.items.append((name, float(nbytes), note))

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.items)

    def render(self) -> str:
        width = max(len(n) for n, _, _ in self.items) + 2
        lines = [self.title]
        for name, b, note in self.items:
            lines.append(f"  {name:<{width}}{b / GiB:9.2f} GiB  {note}")
        lines.append(f"  {'total':<{width}}{self.total / GiB:9.2f} GiB")
        if self.budget is not None:
            verdict = "fits" if self.total <= self.budget else "does NOT fit"
            lines.append(f"  {verdict} in {self.budget / GiB:.0f} GiB per GPU ({self.total / self.budget:.0%})")
        return "\n".join(lines)


def _latent_shape(cfg: TrainConfig, video: tuple[int, int, int] | None) -> tuple[tuple[int, int, int, int], int | None]:
    """``(C, T, H, W)`` of one sample and the dataset's text length (None: not known)."""
    if video is not None:
        f, h, w = video
        if (f - 1) % 4 or h % 16 or w % 16:
            raise DCMConfigError(f"--video {f},{h},{w}: frames must be 4k+1 and height / width multiples of 16.")
        return (16, (f - 1) // 4 + 1, h // 8, w // 8), None
    if cfg.data.path and Path(cfg.data.path).is_dir():
        from .data import LatentDataset

        s = LatentDataset(cfg.data.path, cfg.data.num_latent_t)[0]
        return tuple(s.latent.shape), int(s.prompt_mask.shape[0])
    raise DCMConfigError("--plan needs the clip size: --video FRAMES,HEIGHT,WIDTH (e.g. 81,480,832) or an existing data.path.")


def make_plan(
    cfg: TrainConfig,
    *,
    num_gpus: int = 1,
    gpu_memory_gb: float | None = None,
    fsdp: bool | None = None,
    video: tuple[int, int, int] | None = None,
    device: str = "cuda",
) -> Plan:
    """The plan of ``cfg`` (unresolved is fine) on ``num_gpus`` processes."""
    from ..modeling import add_detail_expert
    from .discriminator import DEFAULT_INNER_CHANNELS
    from .models import DTYPES, SEMANTIC_ADAPTER, _dtype_of, cast_frozen_params

    runtime = _runtime_rss() if device == "cpu" else GPU_OVERHEAD  # before anything below allocates
    family, config = transformer_config(cfg)
    cfg = cfg.resolved(family)
    m = cfg.model
    fsdp = num_gpus > 1 if fsdp is None else fsdp
    shards = num_gpus if fsdp else 1
    latent, text = _latent_shape(cfg, video)
    text = text or TEXT_TOKENS[family]
    bf16 = cfg.mixed_precision == "bf16"
    act_dtype = torch.bfloat16 if bf16 else DTYPES["fp16"] if cfg.mixed_precision == "fp16" else torch.float32
    tdtype = _dtype_of(m.teacher_dtype, cfg.mixed_precision)
    detail = cfg.stage == STAGE_DETAIL

    # parameters (meta): student with its trainable set, teacher in its storage dtype
    student = _meta_model(family, config, torch.float32)
    if detail:
        student.requires_grad_(False)
        add_detail_expert(student, rank=m.lora_rank, alpha=m.lora_alpha)
        cast_frozen_params(student, DTYPES[m.detail_base_dtype])
    elif m.semantic_lora:
        from ..modeling import lora_config

        student.add_adapter(lora_config(m.semantic_lora_rank, m.semantic_lora_alpha), adapter_name=SEMANTIC_ADAPTER)
    else:
        student.requires_grad_(True)
    trainable = [p for p in student.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    student_bytes = _nbytes(student.parameters())
    teacher_bytes = 0 if (not detail and m.semantic_lora) else _nbytes(_meta_model(family, config, tdtype).parameters())

    c, t, h, w = latent
    patch = config["patch_size"]
    grid = (t, h // patch[1], w // patch[2]) if family == FAMILY_WAN else (t // config.get("patch_size_t", 1), h // patch, w // patch)
    tokens = math.prod(grid)
    sp = cfg.parallel.sequence_parallel
    if num_gpus % sp:
        raise DCMConfigError(f"parallel.sequence_parallel={sp} must divide --num-gpus {num_gpus}.")
    if sp > 1 and family != FAMILY_WAN:
        raise DCMConfigError(f"parallel.sequence_parallel={sp}: the trainer supports sequence parallelism for Wan only.")
    local = -(-tokens // sp)  # the tokens each process's blocks see (sequence parallelism)
    b = cfg.data.batch_size
    title = (
        f"DCM {cfg.stage} stage, {family} ({sum(p.numel() for p in _meta_model(family, config, torch.float32).parameters()) / 1e6:,.1f}M "
        f"parameters, {n_train / 1e6:,.1f}M trainable), latent {c}x{t}x{h}x{w} = {tokens:,} tokens x batch {b}, "
        f"mixed_precision={cfg.mixed_precision}, gradient_checkpointing={str(m.gradient_checkpointing).lower()}, "
        f"{num_gpus} process(es){' FSDP2' if fsdp and num_gpus > 1 else ' DDP' if num_gpus > 1 else ''}"
        f"{f', sequence parallel {sp} ({local:,} tokens per process)' if sp > 1 else ''}:"
    )
    plan = Plan(title, budget=gpu_memory_gb * GiB if gpu_memory_gb else None, trainable=n_train, tokens=tokens)
    plan.add("student weights (fp32)" if not detail or m.detail_base_dtype == "fp32" else "student weights (frozen base bf16)",
             student_bytes / shards, "sharded" if shards > 1 else "")
    plan.add("gradients (fp32, trainable)", n_train * 4 / shards * (2 if num_gpus > 1 and not fsdp else 1),
             "+ DDP bucket copy" if num_gpus > 1 and not fsdp else "")
    plan.add("AdamW moments (2 x fp32)", n_train * 8 / shards)
    if cfg.optim.use_ema:
        plan.add("EMA (fp32)", n_train * 4 / shards)
    sharded_run = fsdp and num_gpus > 1
    tname = str(tdtype).replace("torch.", "")
    if teacher_bytes and sharded_run and cfg.parallel.shard_teacher:
        from .fsdp import block_units

        t_units = [_nbytes(u.parameters()) for _, u in block_units(_meta_model(family, config, tdtype), family)]
        plan.add(f"teacher ({tname}, blocks sharded)", sum(t_units) / shards + (teacher_bytes - sum(t_units)),
                 "parallel.shard_teacher; embedders and head whole")
        plan.add("teacher all-gather buffers", 2 * max(t_units), f"2 blocks, {tname}")
    elif teacher_bytes:
        plan.add(f"teacher ({tname}, replicated)", teacher_bytes)
    if sharded_run:
        from .fsdp import block_units

        gathered = 2 if bf16 else 4  # MixedPrecisionPolicy(param_dtype=bf16) under mixed_precision = bf16
        units = [sum(p.numel() for p in u.parameters()) for _, u in block_units(student, family)]
        root = sum(p.numel() for p in student.parameters()) - sum(units)
        plan.add("FSDP all-gather buffers", (2 * max(units) + root) * gathered,
                 f"2 blocks + root unit, {'bf16' if bf16 else 'fp32'}")
    # activations of one optimiser micro-step
    act = activations(family, config, latent, text, act_dtype)
    ck = m.gradient_checkpointing
    student_act = b * act.at(local, ck, tokens)
    plan.add("student activations", student_act, "checkpointed blocks" if ck else "all blocks kept")
    if detail:
        t_prof = act if tdtype == act_dtype else activations(family, config, latent, text, tdtype)
        t_act = b * t_prof.at(local, ck, tokens)
        plan.add("teacher activations (G step on fake)", t_act, "checkpointed blocks" if ck else "all blocks kept")
        from .discriminator import feature_layer_indices

        dim = int(config["num_attention_heads"] * config["attention_head_dim"])
        n_feat = len(feature_layer_indices(student, family, cfg.disc.stride))
        # under sequence parallelism each process's heads see whole frames: at most ceil(T' / sp) of them
        d_grid = (-(-grid[0] // sp), grid[1], grid[2])
        feat = 2 * b * n_feat * math.prod(d_grid) * dim * torch.empty((), dtype=tdtype).element_size()
        plan.add("discriminator features (fake + real)", feat,
                 f"{n_feat} maps, kept for the D step" + (f", {d_grid[0]} of {grid[0]} frames" if sp > 1 else ""))
        d_params, d_act = discriminator_bytes(n_feat, dim, cfg.disc.inner_channels or DEFAULT_INNER_CHANNELS, d_grid, b, act_dtype)
        plan.add("discriminator weights, grads, AdamW", d_params * 16, "fp32, replicated")
        plan.add("discriminator activations (fake + real)", d_act)
    if device == "cpu":
        plan.add("runtime (this process after imports)", runtime, "measured")
    else:
        plan.add("CUDA context / workspaces / allocator slack", runtime, "estimate")
    return plan


def _runtime_rss() -> int:
    """Resident bytes of this process once the trainer's libraries are imported (the CPU runtime's own cost)."""
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: F401

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
