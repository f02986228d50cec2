"""Export a training run: the official combined layout + the pack-native expert files.

``python -m dcm_core export RUN_DIR [--checkpoint PATH] [--name NAME] [--dtype fp32|bf16|fp16] [--out DIR]``

Output folder (default ``RUN_DIR/export``)::

    transformer/config.json
    transformer/diffusion_pytorch_model.safetensors
        semantic stage: the semantic expert, plain diffusers keys (a semantic LoRA is merged);
                        this folder is what ``model.semantic_expert`` of the detail stage takes.
        detail stage:   the official DCM combined layout = ``model.state_dict()`` of the student:
                        diffusers keys with ``base_layer`` / ``lora_A.lora1`` / ``lora_B.lora1`` and the
                        ``*_lora`` modules (dcm-method.md §4.4) — loads with strict=True after
                        ``add_detail_expert``, exactly like the released checkpoint.
    NAME_semantic.safetensors, NAME_detail_expert.safetensors
        detail stage: the pack-native ComfyUI files, made by dcm_core.formats.convert_official.
    export_info.json
        stage, dtype, files, ...; a phased semantic run (``schedule.phase_edges``, the PCM baseline) adds
        ``phase_edges`` and ``phase_sigmas`` (σ_prev of each edge: where the model's jumps land). The weights
        are the plain semantic-stage model either way.

Bases other than a one-transformer text-to-video one (dcm_core.families: Wan I2V, Wan2.2 TI2V-5B, Wan2.2 A14B) get
``dcm.task`` / ``dcm.base`` (and ``dcm.expert_base``) on every file. A two-transformer base (Wan2.2 A14B) exports one
ComfyUI file per stage: the semantic stage ``NAME_semantic.safetensors`` (the full high-noise student, ComfyUI keys,
``dcm.expert_base = high_noise``), the detail stage ``NAME_detail_expert.safetensors`` only (a ComfyUI LoRA + diffs
relative to the stock low-noise transformer, ``dcm.expert_base = low_noise``); both carry the model's own
``dcm.boundary_timestep`` (875 T2V, 900 I2V).

Everything is written into a temporary folder beside the destination and renamed into place
at the end: a failure leaves no half-written export (and a previous export stays as it was).
A write that fails (disk full, no permission) ends in a :class:`~dcm_core.errors.DCMWriteError`
naming the output folder and the reason; the CLI prints it as an ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import DCMCheckpointError, DCMConfigError, DCMError, DCMWriteError
from ..modeling import DETAIL_ADAPTER, LORA_TARGET_MODULES, family_of_model
from . import checkpoint as ck
from .config import STAGE_DETAIL, STAGE_SEMANTIC, TrainConfig, from_dict
from .models import (
    DTYPES,
    TRANSFORMER_WEIGHTS,
    base_of,
    build_student,
    merged_semantic_state_dict,
    model_root,
    two_transformer_boundary,
)

log = logging.getLogger("DCM.train")


def family_metadata(cfg: TrainConfig, student: nn.Module) -> tuple[dict[str, str], Any, float | None]:
    """``(dcm.task / dcm.base / dcm.expert_base metadata, Base, two-transformer boundary)`` of a run's student."""
    from ..families import HIGH_NOISE, LOW_NOISE, META_BASE, META_EXPERT_BASE, META_TASK

    root = model_root(cfg.model.pretrained)
    ratio = two_transformer_boundary(root) if root is not None else None
    base = base_of(student, two_transformers=ratio is not None)
    meta: dict[str, str] = {}
    if base is not None:
        meta[META_TASK] = base.task
        meta[META_BASE] = base.id
    if ratio is not None:
        meta[META_EXPERT_BASE] = HIGH_NOISE if cfg.stage == STAGE_SEMANTIC else LOW_NOISE
    return meta, base, None if ratio is None else 1000.0 * ratio


def write_native_files(
    sd: dict[str, torch.Tensor],
    out_dir: Path,
    name: str,
    *,
    family: str,
    roles: tuple[str, ...],
    dtype: str,
    lora_alpha: float | None,
    boundary_timestep: float,
    extra: dict[str, str],
) -> dict[str, str]:
    """Write pack-native files with the family metadata, through dcm_core.formats' plans and writer.

    ``sd``: a plain diffusers state dict (``roles = ('semantic',)``: the full model in ComfyUI keys) or the official
    combined layout of a detail student (``'semantic'`` and / or ``'detail_expert'``). The detail expert is relative
    to the combined file's base weights (for a two-transformer base: the stock low-noise transformer).
    """
    from ..convert import DETAIL_SUFFIX, SEMANTIC_SUFFIX
    from ..formats import keymaps as km
    from ..formats.detect import KIND_OFFICIAL, ROLE_DETAIL, ROLE_SEMANTIC, info_from_header
    from ..formats.experts import (
        detail_out_dtype,
        native_metadata,
        plan_official,
        produce_detail,
        produce_semantic,
        semantic_out_dtype,
    )
    from ..formats.safetensors_io import TORCH_TO_ST, Header, PlannedTensor, StreamingWriter, TensorEntry, parse_dtype

    tdtype = parse_dtype(dtype, what="export dtype")
    get = lambda k: sd[k].detach().to("cpu")  # noqa: E731
    entries = {k: TensorEntry(k, TORCH_TO_ST[v.dtype], tuple(v.shape), 0, 0) for k, v in sd.items()}
    paths = {ROLE_SEMANTIC: out_dir / f"{name}{SEMANTIC_SUFFIX}", ROLE_DETAIL: out_dir / f"{name}{DETAIL_SUFFIX}"}
    meta_a = {} if lora_alpha is None else {"dcm.lora_alpha": f"{float(lora_alpha):g}"}
    header = Header(path=f"<state dict {name}>", file_size=0, header_size=0, metadata=meta_a, entries=entries)
    info = info_from_header(header)
    if info.kind == KIND_OFFICIAL:
        plan = plan_official(header, info.layout)
        sem_ops, det_ops, dims, rank, alpha = plan.semantic, plan.detail, plan.dims, info.layout.rank, info.layout.alpha
    else:
        sem_ops = km.diffusers_to_comfy_plan(family, {k: tuple(v.shape) for k, v in sd.items()}, where=name)
        det_ops, rank, alpha = [], None, None
        dims = km.dims_from_comfy_shapes(family, {op.out: op.shape for op in sem_ops}, where=name)
    if ROLE_DETAIL in roles and not det_ops:
        raise DCMConfigError("internal: a detail-expert file needs the official combined layout")
    common = dict(
        dims=dims, variant=km.variant_from_dims(family, dims), rank=rank, alpha=alpha, boundary_timestep=boundary_timestep,
        extra={"dcm.source": "dcm_core train export", "dcm.dtype": dtype, **extra},
    )  # fmt: skip
    both = ROLE_SEMANTIC in roles and ROLE_DETAIL in roles
    written: dict[str, str] = {}
    for role in roles:
        partner = paths[ROLE_DETAIL if role == ROLE_SEMANTIC else ROLE_SEMANTIC].name if both else None
        meta = native_metadata(role, family, partner=partner, **common)
        if role == ROLE_SEMANTIC:
            plan_t = [PlannedTensor(op.out, op.shape, semantic_out_dtype(get(op.sources[0]).dtype, tdtype, op.out, len(op.shape)))
                      for op in sem_ops]  # fmt: skip
            with StreamingWriter(paths[role], plan_t, meta) as w:
                for op, pt in zip(sem_ops, plan_t):
                    w.write(pt.name, produce_semantic(op, get, tdtype))
        else:
            plan_t = [PlannedTensor(op.out, op.shape, torch.float32 if op.kind == "alpha" else detail_out_dtype(torch.float32, tdtype))
                      for op in det_ops]  # fmt: skip
            with StreamingWriter(paths[role], plan_t, meta) as w:
                for op, pt in zip(det_ops, plan_t):
                    w.write(pt.name, produce_detail(op, get, tdtype, tdtype))
        written["semantic" if role == ROLE_SEMANTIC else "detail_expert"] = str(paths[role])
    return written


def _phase_info(cfg: TrainConfig) -> dict[str, Any]:
    """``phase_edges`` / ``phase_sigmas`` of a phased semantic run for export_info.json; nothing otherwise."""
    edges = [int(e) for e in cfg.schedule.phase_edges]
    if cfg.stage != STAGE_SEMANTIC or not edges:
        return {}
    from ..schedule import pcm_grid

    grid = pcm_grid(cfg.schedule.shift, cfg.schedule.grid_steps)
    return {"phase_edges": edges, "phase_sigmas": [float(grid.sigmas_prev[e]) for e in edges]}


def export_model(
    cfg: TrainConfig,
    student: nn.Module,
    out_dir: str | Path,
    *,
    name: str | None = None,
    dtype: str | None = None,
    native: bool | None = None,
    step: int | None = None,
    disposable: bool = False,
) -> dict[str, str]:
    """Write the export of ``student`` (see the module docstring); returns ``{what: path}``. ``disposable``: the
    student was rebuilt for this export only — a semantic LoRA is merged into it in place (no second copy)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    name = name or cfg.export.name
    dtype_s = dtype or cfg.export.dtype
    if dtype_s not in DTYPES:
        raise DCMConfigError(f"export dtype {dtype_s!r}: choose fp32, bf16 or fp16.")
    tdtype = DTYPES[dtype_s]
    native = cfg.export.native if native is None else native
    family = family_of_model(student)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    result: dict[str, str] = {}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tdir = tmp / "transformer"
        tdir.mkdir(parents=True)
        student.save_config(str(tdir))
        if cfg.stage == STAGE_SEMANTIC:
            sd = merged_semantic_state_dict(student, in_place=disposable)
            layout = "diffusers (semantic expert)"
        else:
            sd = {k: v.detach() for k, v in student.state_dict().items()}
            layout = "official DCM combined (base_layer / lora_A.lora1 / lora_B.lora1 / *_lora)"
        sd = {k: v.to("cpu", tdtype).contiguous() for k, v in sd.items()}
        fam_meta, base, pair_boundary = family_metadata(cfg, student)
        meta = {"format": "pt", "dcm.trainer.stage": cfg.stage, "dcm.family": family, **fam_meta}
        if cfg.stage == STAGE_DETAIL:
            meta.update(
                {
                    "dcm.lora_rank": str(int(cfg.model.lora_rank)),
                    "dcm.lora_alpha": f"{float(cfg.model.lora_alpha):g}",
                    "dcm.boundary_timestep": f"{float(cfg.schedule.boundary_timestep):g}",
                }
            )
            (tdir / "adapter_config.json").write_text(
                json.dumps(
                    {
                        "peft_type": "LORA",
                        "r": int(cfg.model.lora_rank),
                        "lora_alpha": float(cfg.model.lora_alpha),
                        "target_modules": list(LORA_TARGET_MODULES),
                        "adapter_name": DETAIL_ADAPTER,
                    },
                    indent=1,
                )
            )
        save_file(sd, str(tdir / TRANSFORMER_WEIGHTS), metadata=meta)
        result["transformer"] = str(out / "transformer" / TRANSFORMER_WEIGHTS)
        boundary = pair_boundary if pair_boundary is not None else float(cfg.schedule.boundary_timestep)
        if pair_boundary is not None and native:
            # two-transformer base: one ComfyUI file per stage (module docstring)
            roles = ("semantic",) if cfg.stage == STAGE_SEMANTIC else ("detail_expert",)
            files = write_native_files(
                sd, tmp, name, family=family, roles=roles, dtype=dtype_s,
                lora_alpha=cfg.model.lora_alpha if cfg.stage == STAGE_DETAIL else None, boundary_timestep=boundary,
                extra={**fam_meta, "dcm.trainer.stage": cfg.stage},
            )  # fmt: skip
            result.update({k: str(out / Path(v).name) for k, v in files.items()})
        elif cfg.stage == STAGE_DETAIL and native and fam_meta and fam_meta.get("dcm.task") != "t2v":
            files = write_native_files(
                sd, tmp, name, family=family, roles=("semantic", "detail_expert"), dtype=dtype_s,
                lora_alpha=cfg.model.lora_alpha, boundary_timestep=boundary, extra=dict(fam_meta),
            )  # fmt: skip
            result.update({k: str(out / Path(v).name) for k, v in files.items()})
        elif cfg.stage == STAGE_DETAIL and native:
            from ..formats import convert_official

            conv = convert_official(tdir / TRANSFORMER_WEIGHTS, tmp, dtype=dtype_s, name=name, progress=False)
            result["semantic"] = str(out / Path(conv.semantic_path).name)
            result["detail_expert"] = str(out / Path(conv.detail_path).name)
        info: dict[str, Any] = {
            "stage": cfg.stage,
            "family": family,
            "layout": layout,
            "dtype": dtype_s,
            "step": step,
            "tensors": len(sd),
            "files": {k: Path(v).relative_to(out).as_posix() for k, v in result.items()},
            "lora_rank": cfg.model.lora_rank if cfg.stage == STAGE_DETAIL else None,
            "lora_alpha": cfg.model.lora_alpha if cfg.stage == STAGE_DETAIL else None,
            "boundary_timestep": boundary,
            **_phase_info(cfg),
            **{k.replace("dcm.", ""): v for k, v in fam_meta.items()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "export_info.json").write_text(json.dumps(info, indent=1))
        # publish: replace an older export only once the new one is complete
        if out.exists():
            old = out.parent / f".old-{out.name}-{os.getpid()}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DCMError) and not isinstance(e, DCMWriteError):
            raise
        code, reason = DCMWriteError.describe(e)
        kept = "a previous export there is unchanged" if out.exists() else "nothing was written"
        raise DCMWriteError(
            code,
            f"{out}: cannot write the export ({reason}); {kept}. Free some space in {out.parent} or choose another "
            f"folder with --out (the export needs about {_export_bytes(student, tdtype, cfg, native) / 2**20:.0f} MiB).",
            reason=reason,
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s stage to %s: %s", cfg.stage, out, ", ".join(f"{k}={Path(v).name}" for k, v in result.items()))
    return result


def _export_bytes(student: nn.Module, dtype: torch.dtype, cfg: TrainConfig, native: bool) -> int:
    """Rough size of an export: the transformer file, plus about as much again for the pack-native pair."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = sum(t.numel() for t in student.state_dict().values()) * itemsize
    return n * 2 if cfg.stage == STAGE_DETAIL and native else n


def load_run_config(run_dir: str | Path) -> TrainConfig:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise DCMConfigError(f"{run_dir} is not a DCM run folder (no config.json written by `python -m dcm_core train`).")
    return from_dict(json.loads(p.read_text()))


def export_run(
    run_dir: str | Path,
    *,
    checkpoint: str | None = None,
    out_dir: str | Path | None = None,
    name: str | None = None,
    dtype: str | None = None,
    native: bool | None = None,
) -> dict[str, str]:
    """Rebuild the student from the run's config + a checkpoint and export it (``python -m dcm_core export``)."""
    run = Path(run_dir)
    cfg = load_run_config(run)
    path = ck.resolve_resume(checkpoint or "latest", run / "checkpoints")
    torch.manual_seed(cfg.seed)
    student = build_student(cfg)
    named = dict(student.named_parameters())
    if ck.is_sharded(path):
        # written under FSDP2: the shards are read straight into the rebuilt model's parameters (one fp32 copy of
        # the model in memory, nothing gathered)
        saved = {k[len("trainable."):] for k in ck.sharded_shapes(path) if k.startswith("trainable.")}
        tensors = None
    else:
        tensors = ck.load_tensors(path / "trainable.safetensors")
        saved = set(tensors)
    missing = [n for n, p in named.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in named]
    if missing or unknown:
        raise DCMCheckpointError(
            f"{path} does not match the model rebuilt from {run / 'config.json'}: {len(missing)} trainable tensors "
            f"missing (e.g. {missing[:3]}), {len(unknown)} unknown (e.g. {unknown[:3]})."
        )
    with torch.no_grad():
        if tensors is None:
            targets = {f"trainable.{n}": named[n].detach() for n in sorted(saved)}
            if any(t.dtype != torch.float32 for t in targets.values()):
                raise DCMCheckpointError(f"internal: {path}: the rebuilt student's trainable parameters are not fp32.")
            ck.load_sharded(path, targets, this_process_only=True)
        else:
            for n, t in tensors.items():
                named[n].copy_(t.to(named[n].dtype))
    step = int(ck.load_json(path / "trainer_state.json")["global_step"])
    return export_model(cfg, student, out_dir or run / "export", name=name, dtype=dtype, native=native, step=step,
                        disposable=True)


# ---------------------------------------------------------------------------- CLI


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a training run (official combined layout + pack-native expert files)",
        description=(
            "Rebuild the trained student of RUN_DIR from its config.json and newest valid checkpoint and write "
            "RUN_DIR/export/: transformer/ (diffusers; official DCM combined layout for the detail stage) and, for the "
            "detail stage, NAME_semantic.safetensors + NAME_detail_expert.safetensors for ComfyUI. A Wan2.2 A14B pair: "
            "stage 1 writes NAME_semantic (the high-noise student), stage 2 NAME_detail_expert only (onto the stock "
            "low-noise model)."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the training run folder (train's output_dir)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest valid one)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")
    p.add_argument("--name", default=None, help="base name of the pack-native files (default: the run's export.name)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="dtype of the exported weights")
    p.add_argument("--no-native", action="store_true", help="skip the pack-native files")
    p.set_defaults(_run=run)
    return p


def run(args: argparse.Namespace) -> int:
    result = export_run(
        args.run_dir,
        checkpoint=args.checkpoint,
        out_dir=args.out,
        name=args.name,
        dtype=args.dtype,
        native=False if args.no_native else None,
    )
    for what, path in result.items():
        print(f"{what}: {path}")  # noqa: T201 (CLI output)
    return 0
