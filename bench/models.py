"""Benchmark models: a tiny Wan and a Wan2.1-1.3B-shaped official DCM checkpoint (random weights).

The 1.3B-shaped file (~6.2 GB fp32, LoRA r 128 / α 256 on every ``to_q/to_k/to_v/to_out.0``,
``condition_embedder_lora`` / ``norm_out_lora`` / ``proj_out_lora`` copies) is written **one tensor at a
time** with the pack's :class:`~dcm_core.formats.safetensors_io.StreamingWriter`: names and shapes come
from a diffusers model built on the ``meta`` device, every value from a generator seeded by the tensor
name, so peak RAM is one tensor (~60 MB) and the file is identical on every machine. It is cached in
``$DCM_BENCH_CACHE`` (default ``~/.cache/dcm-bench``) next to a manifest; a changed recipe rebuilds it.

Distributions follow :func:`dcm_core.tiny.make_official_model`: base weights and biases N(0, 0.02),
norm scales 1 + N(0, 0.02), LoRA A/B N(0, 1/fan_in), each ``*_lora`` tensor = its base tensor +
N(0, 0.02).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import torch

#: Bump when the recipe changes: cached files with another version are rebuilt.
RECIPE_VERSION = 1

WAN_1_3B_NAME = "dcm_bench_wan1.3b_official_fp32.safetensors"
LORA_RANK, LORA_ALPHA = 128, 256.0
STD = 0.02


def cache_dir() -> Path:
    d = Path(os.environ.get("DCM_BENCH_CACHE", Path.home() / ".cache" / "dcm-bench")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _official_shapes(family: str, config: dict, rank: int, alpha: float) -> dict[str, tuple[int, ...]]:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    from dcm_core.modeling import add_detail_expert

    cls = WanTransformer3DModel if family == "wan" else HunyuanVideoTransformer3DModel
    with torch.device("meta"):
        model = cls(**config)
        add_detail_expert(model, rank=rank, alpha=alpha)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _gen(key: str, shape: tuple[int, ...], seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((zlib.crc32(key.encode()) * 1_000_003 + seed) % (2**63))
    return g


def _base_value(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    t = torch.randn(shape, generator=_gen(key, shape, seed), dtype=torch.float32) * STD
    if "norm" in key and len(shape) == 1 and key.endswith("weight"):
        t += 1.0
    return t


def _value(key: str, shape: tuple[int, ...], seed: int, extra_prefixes: dict[str, str]) -> torch.Tensor:
    if ".lora_A." in key or ".lora_B." in key:
        return torch.randn(shape, generator=_gen(key, shape, seed), dtype=torch.float32) / max(1, shape[-1]) ** 0.5
    for extra, base in extra_prefixes.items():
        if key.startswith(extra + "."):
            t = _base_value(base + key[len(extra):], shape, seed)
            t += torch.randn(shape, generator=_gen(key, shape, seed + 1), dtype=torch.float32) * STD
            return t
    # PEFT stores the wrapped layer's own weight as '<module>.base_layer.weight'; value keyed by the plain name
    return _base_value(key.replace(".base_layer.", "."), shape, seed)


def write_official_checkpoint(path: Path, family: str, config: dict, *, rank: int, alpha: float, seed: int = 0,
                              dtype: torch.dtype = torch.float32, log=print) -> dict:
    """Stream an official-layout DCM checkpoint to ``path``; returns build facts (time, bytes, peak RSS)."""
    import psutil

    from dcm_core.formats.safetensors_io import PlannedTensor, StreamingWriter
    from dcm_core.modeling import EXPERT_MODULES

    t0 = time.perf_counter()
    shapes = _official_shapes(family, config, rank, alpha)
    extras = {extra: base for base, extra in EXPERT_MODULES[family].items()}
    plan = [PlannedTensor(k, s, dtype) for k, s in shapes.items()]
    proc = psutil.Process()
    peak = proc.memory_info().rss
    meta = {"format": "pt", "lora_alpha": f"{alpha:g}", "dcm_bench.recipe": str(RECIPE_VERSION)}
    with StreamingWriter(path, plan, meta) as w:
        for i, p in enumerate(plan):
            w.write(p.name, _value(p.name, p.shape, seed, extras).to(dtype))
            if i % 64 == 0:
                peak = max(peak, proc.memory_info().rss)
                log(f"  [{i + 1}/{len(plan)}] {p.name}")
    return {
        "seconds": time.perf_counter() - t0,
        "bytes": path.stat().st_size,
        "tensors": len(plan),
        "params": sum(int(torch.Size(s).numel()) for s in shapes.values()),
        "builder_peak_rss": max(peak, proc.memory_info().rss),
    }


def ensure_wan_1_3b(log=print) -> tuple[Path, dict]:
    """The cached Wan2.1-1.3B-shaped official DCM file (built on first use); (path, manifest)."""
    from dcm_core import tiny

    d = cache_dir()
    path = d / WAN_1_3B_NAME
    man_path = path.with_suffix(".json")
    config = tiny.wan_config(**tiny.WAN_1_3B)
    want = {"recipe": RECIPE_VERSION, "family": "wan", "config": {k: v for k, v in config.items() if k != "patch_size"},
            "rank": LORA_RANK, "alpha": LORA_ALPHA, "dtype": "fp32"}
    if path.exists() and man_path.exists():
        try:
            man = json.loads(man_path.read_text())
        except ValueError:
            man = {}
        if man.get("spec") == want and man.get("bytes") == path.stat().st_size:
            man["cached"] = True
            return path, man
    free = _free_bytes(d)
    need = 7 * 1024**3
    if free < need:
        raise RuntimeError(f"{d}: {free / 1e9:.1f} GB free, the 1.3B-shaped checkpoint needs ~6.2 GB (+ margin). "
                           f"Set DCM_BENCH_CACHE to a roomier folder.")
    log(f"building the Wan2.1-1.3B-shaped official DCM checkpoint in {path} (one-off, streamed) ...")
    facts = write_official_checkpoint(path, "wan", config, rank=LORA_RANK, alpha=LORA_ALPHA, log=lambda m: None)
    man = {"spec": want, **facts}
    man_path.write_text(json.dumps(man, indent=1))
    log(f"built in {facts['seconds']:.0f} s ({facts['bytes'] / 1e9:.2f} GB, builder peak RSS "
        f"{facts['builder_peak_rss'] / 1e9:.2f} GB)")
    man["cached"] = False
    return path, man


def _free_bytes(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def write_tiny(dir_: Path) -> dict[str, str]:
    """Tiny Wan (dcm_core.tiny defaults): official file + converted semantic / detail files. Returns names."""
    from dcm_core import tiny
    from dcm_core.formats import convert_official

    dir_ = Path(dir_)
    diff_dir, lora_dir = dir_ / "diffusion_models", dir_ / "loras"
    diff_dir.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    model = tiny.make_official_model("wan", tiny.wan_config(), seed=3)
    official = diff_dir / "dcm_bench_tiny_wan.safetensors"
    tiny.save_official_checkpoint(model, official, metadata={"lora_alpha": "8"})
    res = convert_official(official, dir_ / "conv", dtype="fp32", name="dcm_bench_tiny_wan", progress=False)
    sem = diff_dir / res.semantic_path.name
    det = lora_dir / res.detail_path.name
    os.replace(res.semantic_path, sem)
    os.replace(res.detail_path, det)
    return {"official": official.name, "semantic": sem.name, "detail": det.name}


def ensure_converted(official: Path, dtype: str = "bf16", log=print) -> tuple[Path, Path]:
    """``dcm convert`` of the cached official file (for the stock UNETLoader + LoraLoaderModelOnly path), cached."""
    from dcm_core.formats import convert_official

    st = official.stat()
    d = cache_dir() / f"converted_{dtype}"
    man_path = d / "manifest.json"
    want = {"source": official.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": dtype}
    if man_path.exists():
        try:
            man = json.loads(man_path.read_text())
        except ValueError:
            man = {}
        sem, det = d / man.get("semantic", "-"), d / man.get("detail", "-")
        if man.get("spec") == want and sem.exists() and det.exists():
            return sem, det
    log(f"converting {official.name} to pack-native {dtype} files (one-off) ...")
    t0 = time.perf_counter()
    res = convert_official(official, d, dtype=dtype, name=f"dcm_bench_wan1.3b_{dtype}", progress=False)
    man_path.write_text(json.dumps({"spec": want, "semantic": res.semantic_path.name, "detail": res.detail_path.name,
                                    "seconds": time.perf_counter() - t0}))
    return res.semantic_path, res.detail_path
