"""Hostile checkpoint files: seed files, raw safetensors surgery, resource bounds and the oracle.

Loaded as the plain module ``rel_hostile`` (tests/unit/reliability/conftest.py puts this folder on
``sys.path``). Nothing here imports ComfyUI.

The oracle (:func:`probe`) runs every public entry point a user reaches with a file —
``inspect_file``, ``load_experts``, ``load_detail_expert`` and ``convert_official`` — each inside
:func:`bounded` (CPU time, Python heap peak and an address-space cap, so an attempt to allocate
what a lying header claims fails loudly instead of swapping), and checks that each one either
succeeds with a *sound* result (:func:`check_bundle`: every semantic key present, finite float
tensors, patches fit) or raises a :class:`~dcm_core.errors.DCMError` whose message names the file
and says more than the file name. Any other exception fails the case.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcm_core import tiny
from dcm_core.errors import DCMError
from dcm_core.formats import (
    check_compatible,
    convert_official,
    inspect_file,
    load_detail_expert,
    load_experts,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

# --------------------------------------------------------------------------- resource bounds

#: Per entry point and case: CPU seconds, Python heap peak (tracemalloc) and address-space headroom.
CPU_LIMIT_S = 2.0
WALL_LIMIT_S = 30.0  # hang guard (SIGALRM interrupts the case); the CPU limit is the real bound (shared machine)
PY_HEAP_LIMIT = 48 * 2**20
AS_HEADROOM = 768 * 2**20


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class CaseTimeout(AssertionError):
    """A case ran past the hang guard (raised inside it by SIGALRM)."""


@dataclass
class Usage:
    label: str
    cpu_s: float = 0.0
    wall_s: float = 0.0
    py_peak: int = 0


@contextlib.contextmanager
def bounded(label: str, *, cpu_s: float = CPU_LIMIT_S, py_heap: int = PY_HEAP_LIMIT, headroom: int = AS_HEADROOM):
    """Run the body under an address-space cap (current size + ``headroom``), measure CPU time and the
    Python heap peak, and assert both stayed bounded. A body that tries to allocate gigabytes gets a
    MemoryError / RuntimeError from the allocator (which the oracle reports as a non-DCM failure)."""
    u = Usage(label)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))

    def _timeout(signum, frame):
        raise CaseTimeout(f"{label}: still running after {WALL_LIMIT_S} s (hang)")

    old_handler = signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, WALL_LIMIT_S)
    c0, w0 = time.process_time(), time.perf_counter()
    try:
        yield u
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        u.cpu_s, u.wall_s = time.process_time() - c0, time.perf_counter() - w0
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        u.py_peak = tracemalloc.get_traced_memory()[1]
        if started:
            tracemalloc.stop()
    assert u.cpu_s < cpu_s, f"{label}: {u.cpu_s:.2f} s CPU (limit {cpu_s} s)"
    assert u.wall_s < WALL_LIMIT_S, f"{label}: {u.wall_s:.1f} s wall (hang guard {WALL_LIMIT_S} s)"
    assert u.py_peak < py_heap, f"{label}: Python heap peak {u.py_peak / 2**20:.1f} MiB (limit {py_heap / 2**20:.0f})"


# --------------------------------------------------------------------------- no unpickling, ever


class Unpickled(AssertionError):
    pass


@contextlib.contextmanager
def no_unpickling():
    """Make every Python-level unpickling door raise while the body runs (belt and braces: the
    marker file of the malicious payload is the real proof)."""

    def boom(*a, **k):
        raise Unpickled("something tried to unpickle a file")

    saved = [(pickle, n, getattr(pickle, n)) for n in ("load", "loads", "Unpickler")]
    saved.append((torch, "load", torch.load))
    try:
        for mod, name, _ in saved:
            setattr(mod, name, boom)
        yield
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)


# --------------------------------------------------------------------------- raw safetensors surgery


@dataclass
class Raw:
    """A safetensors file split into its parts (header JSON object kept in file order)."""

    header: dict  # includes "__metadata__" if present
    data: bytes
    header_bytes: bytes

    @property
    def tensors(self) -> dict:
        return {k: v for k, v in self.header.items() if k != "__metadata__"}

    def tensor_bytes(self, key: str) -> bytes:
        b, e = self.header[key]["data_offsets"]
        return self.data[b:e]


def split(blob: bytes) -> Raw:
    (n,) = struct.unpack("<Q", blob[:8])
    hb = blob[8 : 8 + n]
    return Raw(json.loads(hb), blob[8 + n :], hb)


def pack_raw(header_bytes: bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    n = len(header_bytes) if length is None else length
    return struct.pack("<Q", n) + header_bytes + data


def pack(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return pack_raw(hb, data)


def rebuild(raw: Raw, keep: list[str] | None = None, replace: dict[str, tuple[str, list, bytes]] | None = None,
            metadata: dict | None | bool = True) -> bytes:
    """A consistent file with only ``keep`` tensors (in that order), ``replace`` = key -> (dtype, shape,
    bytes) overrides, and the original (True), no (None) or new metadata."""
    keep = list(raw.tensors) if keep is None else keep
    replace = replace or {}
    header: dict = {}
    if metadata is True:
        if "__metadata__" in raw.header:
            header["__metadata__"] = raw.header["__metadata__"]
    elif metadata:
        header["__metadata__"] = metadata
    chunks, pos = [], 0
    for k in keep:
        if k in replace:
            dt, shape, b = replace[k]
        else:
            dt, shape, b = raw.header[k]["dtype"], raw.header[k]["shape"], raw.tensor_bytes(k)
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + len(b)]}
        chunks.append(b)
        pos += len(b)
    return pack(header, b"".join(chunks))


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_DT = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def value_bytes(st_dtype: str, value: float) -> bytes:
    """``value`` encoded as one element of ``st_dtype`` (fp8 e4m3fn has no Inf: Inf becomes NaN)."""
    if st_dtype == "F8_E4M3" and not math.isfinite(value):
        return b"\xff" if value < 0 else b"\x7f"  # torch saturates Inf to ±448 in e4m3fn; write the NaN pattern
    return torch.tensor([value], dtype=torch.float32).to(TORCH_DT[st_dtype]).view(torch.uint8).numpy().tobytes()


def with_element(blob: bytes, key: str, index: int, value: float) -> bytes:
    """``blob`` with element ``index`` of tensor ``key`` set to ``value`` (bytes patched in place)."""
    raw = split(blob)
    e = raw.header[key]
    size = ITEMSIZE[e["dtype"]]
    at = 8 + len(raw.header_bytes) + e["data_offsets"][0] + index * size
    b = bytearray(blob)
    b[at : at + size] = value_bytes(e["dtype"], value)
    return bytes(b)


# --------------------------------------------------------------------------- the seed world


RANK, ALPHA = 4, 8.0


@dataclass
class Seed:
    """One valid file the generators start from."""

    name: str
    kind: str  # official_dcm | dcm_semantic | dcm_detail_expert
    family: str
    path: Path
    blob: bytes
    partner: Path | None = None  # the other half of a pack-native pair
    partner_of: str | None = None  # which role the partner has (for the file name it must carry)

    @property
    def raw(self) -> Raw:
        return split(self.blob)

    def __repr__(self) -> str:
        return f"Seed({self.name})"


@dataclass
class World:
    root: Path
    seeds: dict[str, Seed] = field(default_factory=dict)
    models: dict = field(default_factory=dict)

    def seed(self, name: str) -> Seed:
        return self.seeds[name]

    def __repr__(self) -> str:
        return f"World({', '.join(self.seeds)})"


def wan_cfg(**kw) -> dict:
    return tiny.wan_config(**dict(dict(dim=128, num_layers=2, ffn_dim=256, text_dim=64), **kw))


def hy_cfg(**kw) -> dict:
    cfg = tiny.hunyuan_config(**dict(dict(hidden=128, num_layers=1, num_single_layers=1, text_embed_dim=64), **kw))
    cfg["pooled_projection_dim"] = 64
    return cfg


#: official seed name -> (family, config builder, storage dtype, convert dtype)
OFFICIAL_SEEDS = {
    "wan": ("wan", lambda: wan_cfg(), torch.float32, "bf16"),
    "wan_i2v": ("wan", lambda: wan_cfg(num_layers=1, image_dim=64), torch.bfloat16, "fp8_e4m3fn"),
    "hy": ("hunyuan_video", lambda: hy_cfg(), torch.float16, "fp32"),
}
#: Every valid seed file of the world: official, semantic and detail for each official seed.
SEEDS = sorted(f"{k}_{n}" for k in ("official", "semantic", "detail") for n in OFFICIAL_SEEDS)


def build_world(root: Path) -> World:
    """Tiny official files of both families (and Wan I2V), and the pack-native pair of each."""
    w = World(root)
    for name, (family, cfg, dt, conv_dt) in OFFICIAL_SEEDS.items():
        m = tiny.make_official_model(family, cfg(), rank=RANK, alpha=ALPHA, seed=11)
        w.models[name] = m
        p = tiny.save_official_checkpoint(m, root / "official" / f"{name}.safetensors", dtype=dt,
                                          metadata={"format": "pt", "lora_alpha": str(ALPHA)})
        w.seeds[f"official_{name}"] = Seed(f"official_{name}", "official_dcm", family, p, p.read_bytes())
        res = convert_official(p, root / "native", dtype=conv_dt, name=name, progress=False)
        sem, det = res.semantic_path, res.detail_path
        w.seeds[f"semantic_{name}"] = Seed(f"semantic_{name}", "dcm_semantic", family, sem, sem.read_bytes(), det)
        w.seeds[f"detail_{name}"] = Seed(f"detail_{name}", "dcm_detail_expert", family, det, det.read_bytes(), sem)
    return w


# --------------------------------------------------------------------------- independent expectations


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_KEYMAP_TESTS = None


def expected_comfy_keys(family: str, dims: dict) -> set[str]:
    """The ComfyUI key set of a model with these dims, from the key lists dumped from ComfyUI's own
    classes (tests/unit/test_keymaps.py) — independent of dcm_core's own code."""
    global _KEYMAP_TESTS
    if _KEYMAP_TESTS is None:
        _KEYMAP_TESTS = _load_by_path("dcm_rel_keymap_lists", ROOT / "tests" / "unit" / "test_keymaps.py")
    km = _KEYMAP_TESTS
    if family == "wan":
        t = km.COMFY_WAN_T2V + (km.COMFY_WAN_I2V_EXTRA if dims.get("image_dim") else ())
        keys = km.expand(t, n=dims["num_layers"])
        if dims.get("flf_pos_tokens"):
            keys.add("img_emb.emb_pos")
        return keys
    keys = km.expand(km.COMFY_HY, n=dims["num_layers"], s=dims["num_single_layers"], r=dims["num_refiner_layers"])
    if not dims.get("guidance_embeds"):
        keys -= {k for k in keys if k.startswith("guidance_in.")}
    return keys


def expected_lora_stems(family: str, dims: dict) -> set[str]:
    """ComfyUI stems the detail expert's LoRA must patch: every attention projection PEFT wraps
    (to_q / to_k / to_v / to_out.0, fused the way ComfyUI fuses them)."""
    if family == "wan":
        return {f"blocks.{n}.{a}.{x}" for n in range(dims["num_layers"]) for a in ("self_attn", "cross_attn") for x in "qkvo"}
    out = {f"double_blocks.{n}.img_attn.{x}" for n in range(dims["num_layers"]) for x in ("qkv", "proj")}
    out |= {f"single_blocks.{s}.linear1" for s in range(dims["num_single_layers"])}
    out |= {f"txt_in.individual_token_refiner.blocks.{r}.self_attn.{x}" for r in range(dims["num_refiner_layers"])
            for x in ("qkv", "proj")}
    return out


def expected_diff_groups(family: str, dims: dict) -> dict[str, set[str]]:
    """Detail-expert replacement layers (the official ``*_lora`` modules) as ComfyUI patch keys, per
    module: each group is present completely or not at all."""
    def wb(*stems):
        return {f"{s}.diff" for s in stems} | {f"{s}.diff_b" for s in stems}

    if family == "wan":
        cond = wb("time_embedding.0", "time_embedding.2", "time_projection.1", "text_embedding.0", "text_embedding.2")
        if dims.get("image_dim"):
            cond |= wb("img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4")
        if dims.get("flf_pos_tokens"):
            cond.add("img_emb.emb_pos.diff")
        return {"condition_embedder": cond, "proj_out": wb("head.head")}
    tte = wb("time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer")
    if dims.get("guidance_embeds"):
        tte |= wb("guidance_in.in_layer", "guidance_in.out_layer")
    return {"time_text_embed": tte, "norm_out": wb("final_layer.adaLN_modulation.1"), "proj_out": wb("final_layer.linear")}


def check_detail_complete(family: str, dims: dict, patches, where: str) -> None:
    keys = {k[len("diffusion_model."):] for k in patches}
    lora = {k[: -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight")}
    want = expected_lora_stems(family, dims)
    assert lora == want, f"{where}: detail LoRA missing {sorted(want - lora)[:4]} / extra {sorted(lora - want)[:4]}"
    rest = {k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha"))}
    groups = expected_diff_groups(family, dims)
    for name, g in groups.items():
        assert not (g & rest) or g <= rest, f"{where}: detail copy of {name} is partial, missing {sorted(g - rest)[:4]}"
    assert rest <= set().union(*groups.values()), f"{where}: unexpected patches {sorted(rest - set().union(*groups.values()))[:4]}"


def _nonfinite(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    if t.element_size() == 1:
        t = t.to(torch.float16)
    return int((~torch.isfinite(t)).sum())


def check_bundle(bundle, where: str) -> None:
    """A successfully loaded bundle must be sound: complete semantic key set for its dims, float
    finite tensors, every patch fits the semantic model, the detail expert patches something."""
    from dcm_core.formats import keymaps as km

    sem = bundle.semantic_sd
    dims = km.dims_from_comfy_shapes(bundle.family, {k: tuple(v.shape) for k, v in sem.items()})
    want = expected_comfy_keys(bundle.family, dims)
    got = set(sem)
    assert got == want, f"{where}: loaded semantic expert has missing {sorted(want - got)[:5]} / extra {sorted(got - want)[:5]}"
    for k, v in sem.items():
        assert v.is_floating_point(), f"{where}: semantic {k} has dtype {v.dtype}"
        assert _nonfinite(v) == 0, f"{where}: semantic {k} holds NaN/Inf but loaded silently"
    for k, v in bundle.detail.patches.items():
        assert v.is_floating_point(), f"{where}: patch {k} has dtype {v.dtype}"
        assert _nonfinite(v) == 0, f"{where}: patch {k} holds NaN/Inf but loaded silently"
    assert bundle.detail.patches, f"{where}: empty detail expert"
    check_detail_complete(bundle.family, dims, bundle.detail.patches, where)
    check_compatible(bundle.detail, {"diffusion_model." + k: tuple(v.shape) for k, v in sem.items()}, name="its semantic model")


def check_detail(det, where: str) -> None:
    for k, v in det.patches.items():
        assert v.is_floating_point() and _nonfinite(v) == 0, f"{where}: patch {k} is {v.dtype} / non-finite"
    counts = ("num_layers",) if det.family == "wan" else ("num_layers", "num_single_layers", "num_refiner_layers")
    if all(isinstance(det.dims.get(k), int) for k in counts):  # (damaged dcm.dims metadata: nothing to compare with)
        check_detail_complete(det.family, det.dims, det.patches, where)


# --------------------------------------------------------------------------- the oracle

ENTRY_POINTS = ("inspect", "load_experts", "load_detail_expert", "convert")


@dataclass
class Outcome:
    entry: str
    ok: bool
    value: object = None
    error: BaseException | None = None
    usage: Usage | None = None

    @property
    def message(self) -> str:
        return str(self.error) if self.error is not None else ""


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def check_message(path: Path, e: BaseException, entry: str) -> None:
    msg = str(e)
    name = path.name
    assert name in msg, f"{entry}: error does not name the file {name!r}: {type(e).__name__}: {msg}"
    rest = msg.replace(str(path), "").replace(name, "")
    assert len(re.sub(r"\W+", "", rest)) >= 15, f"{entry}: error names the file but not the problem: {msg!r}"
    assert "Traceback" not in msg


def run_entry(entry: str, path: Path, out_dir: Path, search_dirs=()) -> Outcome:
    """One entry point under resource bounds; DCMError -> not ok; anything else raises AssertionError."""
    with bounded(f"{entry}({path.name})") as u:
        try:
            if entry == "inspect":
                v = inspect_file(path)
            elif entry == "load_experts":
                v = load_experts(path, search_dirs=search_dirs)
            elif entry == "load_detail_expert":
                v = load_detail_expert(path)
            elif entry == "convert":
                v = convert_official(path, out_dir, dtype="bf16", name="out", progress=False)
            else:  # pragma: no cover
                raise ValueError(entry)
            out = Outcome(entry, True, v, usage=u)
        except DCMError as e:
            out = Outcome(entry, False, error=e, usage=u)
        except (Unpickled, CaseTimeout):
            raise
        except BaseException as e:  # noqa: BLE001 - anything else is the bug we are hunting
            raise AssertionError(f"{entry}({path}) raised {type(e).__name__} (not a DCMError): {e}") from e
    return out


def probe(path: Path, *, entries=ENTRY_POINTS, search_dirs=()) -> dict[str, Outcome]:
    """Run the entry points on ``path`` and check the invariants every outcome must satisfy."""
    path = Path(path)
    case_dir = path.parent
    before = set(_listing(case_dir))
    out_dir = case_dir / "convert-out"
    outs: dict[str, Outcome] = {}
    with no_unpickling():
        for entry in entries:
            o = run_entry(entry, path, out_dir, search_dirs)
            outs[entry] = o
            if not o.ok:
                check_message(path, o.error, entry)
            if entry == "convert":
                listing = _listing(out_dir)
                if o.ok:
                    assert listing == ["out_detail_expert.safetensors", "out_semantic.safetensors"], listing
                    check_bundle(load_experts(o.value.semantic_path), f"convert({path.name}) output")
                    shutil.rmtree(out_dir)
                else:
                    assert listing == [], f"convert failed but left {listing} in the output folder"
                    if out_dir.exists():
                        out_dir.rmdir()
            elif entry == "load_experts" and o.ok:
                check_bundle(o.value, f"load_experts({path.name})")
            elif entry == "load_detail_expert" and o.ok:
                check_detail(o.value, f"load_detail_expert({path.name})")
    after = set(_listing(case_dir))
    assert after == before, f"entry points left files next to the input: {sorted(after - before)}"
    return outs


def all_refused(outs: dict[str, Outcome], *, entries=ENTRY_POINTS, match: str | None = None) -> None:
    """Every entry point raised a DCMError (optionally matching ``match``)."""
    for e in entries:
        o = outs[e]
        assert not o.ok, f"{e} accepted the hostile file (kind={getattr(o.value, 'kind', type(o.value).__name__)})"
        if match:
            assert re.search(match, o.message, re.I | re.S), f"{e}: {type(o.error).__name__}: {o.message!r} !~ {match!r}"


class CaseDir:
    """A fresh folder per generated case under a per-test root, removed afterwards."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def __repr__(self) -> str:
        return "CaseDir()"

    @contextlib.contextmanager
    def new(self):
        self.n += 1
        d = self.root / f"case{self.n:05d}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)


def place(seed: Seed, d: Path, blob: bytes, name: str | None = None) -> Path:
    """Write a hostile variant of ``seed`` into ``d`` (with a symlink to its intact partner, if any)."""
    suffix = {"official_dcm": "official", "dcm_semantic": "semantic", "dcm_detail_expert": "detail_expert"}[seed.kind]
    p = d / (name or f"hostile_{seed.name}_{suffix}.safetensors")
    p.write_bytes(blob)
    if seed.partner is not None:
        os.symlink(seed.partner, d / seed.partner.name)
    return p
