"""Convert an official DCM checkpoint into the two pack-native ComfyUI files.

``python -m dcm_core convert OFFICIAL.safetensors --out-dir DIR [--dtype bf16] [--name NAME]`` writes

* ``DIR/NAME_semantic.safetensors``       → ComfyUI/models/diffusion_models/ (stock Load Diffusion Model)
* ``DIR/NAME_detail_expert.safetensors``  → ComfyUI/models/loras/ (stock LoraLoaderModelOnly, or the DCM loader)

Streaming: both headers are computed from the plan first, then each output tensor is produced
from the source (positioned reads, no mmap) and written before the next one is made, so peak memory is about
one tensor. Both files appear only when both are complete (no partial outputs on any error).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError

from . import families as fm
from .errors import DCMConfigError, DCMError, DCMUnsupportedFileError, DCMWriteError
from .formats import keymaps as km
from .formats.detect import KIND_OFFICIAL, ROLE_DETAIL, ROLE_SEMANTIC, FileInfo, info_from_header, unsupported_message
from .formats.experts import (
    default_name,
    detail_out_dtype,
    native_metadata,
    plan_official,
    produce_detail,
    produce_semantic,
    semantic_out_dtype,
)
from .formats.safetensors_io import (
    TORCH_TO_ST,
    Header,
    PlannedTensor,
    SafeReader,
    StreamingWriter,
    TensorEntry,
    check_finite,
    dtype_name,
    parse_dtype,
    read_header,
)

log = logging.getLogger("DCM.formats")

# DCMWriteError lives in dcm_core.errors; it is imported above, so ``dcm_core.convert.DCMWriteError`` still works.

SEMANTIC_SUFFIX = "_semantic.safetensors"
DETAIL_SUFFIX = "_detail_expert.safetensors"


@dataclass(frozen=True)
class ConvertResult:
    """Paths of the two written files and the source file's :class:`FileInfo`."""

    semantic_path: Path
    detail_path: Path
    info: FileInfo
    semantic_info: FileInfo | None = None
    detail_info: FileInfo | None = None


def family_metadata(info: FileInfo) -> dict[str, str]:
    """``dcm.task`` / ``dcm.base`` / ``dcm.expert_base`` of a source file (its metadata, else what its shapes
    tell), carried onto both converted files; keys whose value is unknown are left out."""
    out = {fm.META_TASK: info.task, fm.META_BASE: info.base, fm.META_EXPERT_BASE: info.expert_base}
    return {k: v for k, v in out.items() if v}


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name) or "\x00" in name:
        raise DCMConfigError(f"--name {name!r} must be a plain file-name stem (no folders), e.g. 'dcm_wan2.1_1.3b'.")
    return name


def convert_official(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "bf16",
    name: str | None = None,
    progress: bool = True,
) -> ConvertResult:
    """Split an official DCM checkpoint into ``NAME_semantic`` + ``NAME_detail_expert`` safetensors.

    ``dtype``: ``bf16`` (default), ``fp16``, ``fp32`` or ``fp8_e4m3fn`` (fp8 stores the semantic
    model's weight matrices in fp8 and everything else, including the detail expert, in bf16);
    ``None`` keeps the source dtype. Raises a :class:`~dcm_core.errors.DCMError` on bad input and
    leaves no partial output files.
    """
    header = read_header(src)
    info = info_from_header(header)
    if info.kind != KIND_OFFICIAL:
        if info.kind in ("dcm_semantic", "dcm_detail_expert"):
            raise DCMUnsupportedFileError(
                f"{header.path} is already a converted DCM file ({info.kind}); there is nothing to convert. Copy the "
                f"*_semantic file to models/diffusion_models and the *_detail_expert file to models/loras."
            )
        raise DCMUnsupportedFileError(unsupported_message(info, wanted="an official DCM checkpoint"))
    stem = _check_name(name) if name is not None else default_name(header.path)
    with SafeReader(header.path, header) as r:
        return _write_pair(header, r.get, info, out_dir, stem, dtype, progress, source=header.path)


def export_official_state_dict(
    sd: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    name: str,
    lora_alpha: float,
    dtype: str | torch.dtype | None = "bf16",
    progress: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> ConvertResult:
    """Write the two pack-native files from an in-memory official-layout state dict.

    ``sd`` is ``model.state_dict()`` of a diffusers transformer carrying the detail expert
    (:func:`dcm_core.modeling.add_detail_expert`: PEFT ``lora1`` + ``*_lora`` modules), i.e. the
    official combined layout. ``lora_alpha`` is the adapter's alpha (a state dict does not hold it).
    Used by the trainer's export; same plan, math and metadata as :func:`convert_official`.
    """
    meta = {"dcm.lora_alpha": f"{float(lora_alpha):g}", **(metadata or {})}
    entries = {}
    for k, v in sd.items():
        if v.dtype not in TORCH_TO_ST:
            raise DCMConfigError(f"state dict tensor {k!r} has dtype {v.dtype}, which safetensors cannot store.")
        entries[k] = TensorEntry(k, TORCH_TO_ST[v.dtype], tuple(v.shape), 0, 0)
    header = Header(path=f"<state dict {name}>", file_size=0, header_size=0, metadata=meta, entries=entries)
    info = info_from_header(header)
    if info.kind != KIND_OFFICIAL:
        raise DCMUnsupportedFileError(
            f"the state dict to export is a {info.kind}, not a model with a DCM detail expert; call "
            f"dcm_core.modeling.add_detail_expert() before training the detail expert."
        )

    def get(k: str) -> torch.Tensor:
        return check_finite(sd[k].detach().to("cpu"), f"state dict {name}", k)

    return _write_pair(header, get, info, out_dir, _check_name(name), dtype, progress, source=name)


def _write_pair(
    header: Header,
    get: Callable[[str], torch.Tensor],
    info: FileInfo,
    out_dir: str | os.PathLike,
    stem: str,
    dtype: str | torch.dtype | None,
    progress: bool,
    *,
    source: str,
) -> ConvertResult:
    tdtype = parse_dtype(dtype, what="--dtype")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DCMConfigError(f"--out-dir {out} exists and is not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    sem_path, det_path = out / f"{stem}{SEMANTIC_SUFFIX}", out / f"{stem}{DETAIL_SUFFIX}"
    if os.path.exists(header.path):
        src_real = os.path.realpath(header.path)
        for p in (sem_path, det_path):
            if os.path.realpath(p) == src_real:
                raise DCMConfigError(f"output {p} would overwrite the input file; choose another --out-dir or --name.")

    plan = plan_official(header, info.layout)
    lay = plan.layout
    ent = header.entries
    sem_plan = [
        PlannedTensor(op.out, op.shape, semantic_out_dtype(ent[op.sources[0]].torch_dtype, tdtype, op.out, len(op.shape)))
        for op in plan.semantic
    ]

    def det_src_dtype(op) -> torch.dtype:
        key = op.src or (op.parts[0][2] if op.kind == "down" else op.parts[0][3] if op.parts else None)
        return ent[key].torch_dtype if key else torch.float32

    det_plan = [
        PlannedTensor(op.out, op.shape, torch.float32 if op.kind == "alpha" else detail_out_dtype(det_src_dtype(op), tdtype))
        for op in plan.detail
    ]
    variant = km.variant_from_dims(lay.family, plan.dims)
    common = dict(
        dims=plan.dims,
        variant=variant,
        rank=lay.rank,
        alpha=lay.alpha,
        boundary_timestep=info.boundary_timestep,
        schedule=info.schedule,
        extra={
            "dcm.source": os.path.basename(source),
            "dcm.alpha_source": lay.alpha_source,
            "dcm.dtype": dtype_name(tdtype) if tdtype else "source",
            **family_metadata(info),
        },
    )
    sem_meta = native_metadata(ROLE_SEMANTIC, lay.family, partner=det_path.name, **common)
    det_meta = native_metadata(ROLE_DETAIL, lay.family, partner=sem_path.name, **common)

    total = sum(p.nbytes for p in sem_plan) + sum(p.nbytes for p in det_plan)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"convert {stem}", leave=True)
    tmp_sem = out / f".{sem_path.name}.partial"
    tmp_det = out / f".{det_path.name}.partial"
    ok = False
    log.info(
        "converting %s (%s, rank %d, alpha %g from %s) -> %s, %s [%s]",
        source,
        km.size_label(lay.family, plan.dims),
        lay.rank,
        lay.alpha,
        lay.alpha_source,
        sem_path,
        det_path,
        dtype_name(tdtype) if tdtype else "source dtype",
    )
    try:
        with StreamingWriter(tmp_sem, sem_plan, sem_meta) as w:
            for op, pt in zip(plan.semantic, sem_plan):
                w.write(pt.name, produce_semantic(op, get, tdtype))
                if bar is not None:
                    bar.update(pt.nbytes)
        with StreamingWriter(tmp_det, det_plan, det_meta) as w:
            for op, pt in zip(plan.detail, det_plan):
                w.write(pt.name, produce_detail(op, get, tdtype, tdtype))
                if bar is not None:
                    bar.update(pt.nbytes)
        os.replace(tmp_sem, sem_path)
        os.replace(tmp_det, det_path)
        ok = True
    except (OSError, SafetensorError) as e:
        if isinstance(e, DCMError):
            raise
        code, reason = DCMWriteError.describe(e)
        raise DCMWriteError(
            code,
            f"{out}: cannot write the converted files ({reason}); nothing was written. Free some space or "
            f"choose another --out-dir (both files together need about {total / 2**20:.0f} MiB).",
            reason=reason,
        ) from e
    finally:
        if bar is not None:
            bar.close()
        if not ok:
            for p in (tmp_sem, tmp_det):
                with contextlib.suppress(OSError):
                    os.unlink(p)
    sem_info = info_from_header(read_header(sem_path))
    det_info = info_from_header(read_header(det_path))
    return ConvertResult(sem_path, det_path, info, sem_info, det_info)


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="OFFICIAL.safetensors", help="official DCM transformer file (e.g. DCM_WAN/transformer/diffusion_pytorch_model.safetensors)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="folder for NAME_semantic.safetensors and NAME_detail_expert.safetensors")
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp16", "fp32", "fp8_e4m3fn"],
        help="storage dtype (default bf16). fp8_e4m3fn stores the semantic model's weight matrices in fp8, the rest "
        "and the detail expert in bf16",
    )
    p.add_argument("--name", default=None, help="output base name (default: the release folder name, e.g. DCM_WAN, or the file stem)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    res = convert_official(args.src, args.out_dir, dtype=args.dtype, name=args.name, progress=not args.no_progress)
    print(f"semantic expert: {res.semantic_path}")
    print("  -> copy to ComfyUI/models/diffusion_models/ (stock Load Diffusion Model node, or the DCM loader)")
    print(f"detail expert:   {res.detail_path}")
    print("  -> copy to ComfyUI/models/loras/ (stock LoraLoaderModelOnly on the semantic model, or the DCM loader)")
    info = res.info
    print(
        f"{km.size_label(info.family, info.dims)}; LoRA rank {info.lora_rank}, alpha {info.lora_alpha:g} "
        f"({info.alpha_source}); boundary {info.boundary_timestep:g}; preset {info.schedule}"
    )
    base = fm.describe_base(info.base) if info.base else ("one of " + ", ".join(info.bases) if info.bases else "unknown base")
    print(f"task {info.task or 'unknown'}; base {base}" + (f"; expert of the {info.expert_base} model" if info.expert_base else ""))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``convert`` subcommand."""
    p = subparsers.add_parser(
        "convert",
        help="split an official DCM checkpoint into ComfyUI semantic + detail-expert files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(_run=run)
    return p
