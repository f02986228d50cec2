"""Validated safetensors reading and atomic, streaming safetensors writing.

Reading: the header is parsed and checked here, with bounds checks; nothing a header claims is
allocated before it has been checked against the real file size. Pickle / zip / GGUF files are
recognised by their magic bytes and refused (they are never unpickled). Tensors are then read
one at a time with positioned reads into tensors that own their memory (no ``mmap``: the source
file never sits in the process's RSS), with an optional per-tensor dtype conversion.

NaN / Inf: every float tensor read through :class:`SafeReader` is checked; a tensor holding NaN or
±Inf is refused with a :class:`DCMFormatError` naming the file and the tensor (an expert with
corrupted weights never loads, and the converter never writes one). ``inspect`` reads the header
only and does not look at the values.

Writing: :class:`StreamingWriter` computes the header from a *plan* (names, shapes, dtypes)
and then receives the tensors one by one, so peak memory is one tensor, not the model. Every
write goes to a temporary file in the destination folder, is fsync'ed and renamed into place;
on any error the temporary file is removed and no partial output is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

import torch

from ..errors import DCMFileNotFoundError, DCMFormatError, DCMUnsupportedFileError

log = logging.getLogger("DCM.formats")

#: Largest header accepted. Real headers are a few MB at most (a 14B model: ~100 kB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: safetensors dtype string -> (torch dtype, item size in bytes)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = (getattr(torch, _attr), 1)
for _name, _attr, _size in (("U16", "uint16", 2), ("U32", "uint32", 4), ("U64", "uint64", 8)):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = (getattr(torch, _attr), _size)

TORCH_TO_ST: dict[torch.dtype, str] = {v[0]: k for k, v in ST_DTYPES.items()}

#: Human names accepted by the converter / CLI.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPE_NAMES["fp8_e4m3fn"] = torch.float8_e4m3fn

_HAS_PREADV = hasattr(os, "preadv")
_BIG_ENDIAN = sys.byteorder != "little"

FLOAT_ST_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

_PICKLE_HINT = (
    "DCM reads safetensors files only (pickled .ckpt/.pt/.bin/.pth files can run code when loaded and "
    "are never opened). Get the .safetensors version of this model, or convert it yourself in a trusted "
    "environment."
)


def dtype_name(dtype: torch.dtype) -> str:
    """Short human name of a torch dtype (``bf16``, ``fp32``, ``fp8_e4m3fn``...)."""
    for k, v in DTYPE_NAMES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


def parse_dtype(value: str | torch.dtype | None, *, what: str = "dtype") -> torch.dtype | None:
    """``"bf16"`` / ``torch.bfloat16`` / ``None`` -> torch dtype (or None); raise a clear error otherwise."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).strip().lower().replace("float", "fp").replace("bfp16", "bf16")
    aliases = {"fp8": "fp8_e4m3fn", "fp8_e4m3": "fp8_e4m3fn", "half": "fp16", "bfloat16": "bf16"}
    key = aliases.get(key, key)
    if key not in DTYPE_NAMES:
        raise DCMFormatError(f"{what}={value!r} is not supported; use one of {', '.join(DTYPE_NAMES)}.")
    return DTYPE_NAMES[key]


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorEntry:
    """One header entry: safetensors dtype string, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data area
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    path: str
    file_size: int
    header_size: int
    metadata: dict[str, str]
    entries: dict[str, TensorEntry]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size


def _sniff_foreign(head: bytes) -> str | None:
    """Describe a non-safetensors file from its first bytes, or None."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (PyTorch .pt/.pth/.ckpt/.bin checkpoints are zip files holding pickles)"
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        return "a Python pickle (legacy PyTorch checkpoint)"
    if head[:4] == b"GGUF":
        return "a GGUF file (quantized model for llama.cpp / ComfyUI-GGUF)"
    if head[:2] == b"\x1f\x8b":
        return "a gzip archive"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON / text file (a config or a sharded-model index, not the weights)"
    return None


def _dup_check_hook(path: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise DCMFormatError(
                    f"{path}: the safetensors header lists the key {k!r} twice. The file is damaged or was "
                    f"crafted; re-download or re-export it."
                )
            out[k] = v
        return out

    return hook


def read_header(path: str | os.PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of a safetensors file without trusting it.

    Raises :class:`DCMFileNotFoundError` for a missing path, :class:`DCMUnsupportedFileError`
    for a pickle/zip/GGUF/JSON file, and :class:`DCMFormatError` for any damage (truncation,
    garbled or lying header, duplicate keys, bad dtype/shape/offsets, overlaps, holes).
    """
    p = str(path)
    if not os.path.exists(p):
        raise DCMFileNotFoundError(f"{p}: file not found. Check the path (and that the download finished).")
    if os.path.isdir(p):
        raise DCMFileNotFoundError(
            f"{p} is a folder, not a file. Point to the .safetensors file inside it (for the official DCM "
            f"release: <folder>/transformer/diffusion_pytorch_model.safetensors)."
        )
    if not os.path.isfile(p):
        raise DCMFormatError(f"{p} is not a regular file (a device, socket or pipe); point to a .safetensors file.")
    try:
        fh = open(p, "rb")
    except OSError as e:
        raise DCMFileNotFoundError(f"{p}: cannot open the file ({e.strerror or e}). Check its permissions.") from e
    with fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(9)
        plausible = len(head) == 9 and struct.unpack("<Q", head[:8])[0] <= size - 8 and head[8:9] == b"{"
        foreign = None if plausible else _sniff_foreign(head)
        if foreign is not None:
            raise DCMUnsupportedFileError(f"{p} is {foreign}, not safetensors. {_PICKLE_HINT}")
        head = head[:8]
        if len(head) < 8:
            raise DCMFormatError(
                f"{p}: file is {size} bytes, too short to be safetensors (needs an 8-byte header length). "
                f"It is empty or truncated; re-download it."
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise DCMFormatError(
                f"{p}: the header claims {n} bytes but the file has only {size - 8} after the length field. "
                f"The file is truncated or not safetensors; re-download it."
            )
        if n > max_header_bytes:
            raise DCMFormatError(
                f"{p}: the header claims {n} bytes (limit {max_header_bytes}); that is not a real model header. "
                f"The file is damaged or not safetensors."
            )
        if n < 2:
            raise DCMFormatError(f"{p}: the header length is {n}; the file is damaged or not safetensors.")
        fh.seek(8)
        raw = fh.read(n)
    if len(raw) != n:
        raise DCMFormatError(f"{p}: could read only {len(raw)} of {n} header bytes; the file is truncated.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DCMFormatError(
            f"{p}: the header is not valid UTF-8 (byte {e.start}); the file is garbled or not safetensors."
        ) from None
    try:
        obj = json.loads(text, object_pairs_hook=_dup_check_hook(p))
    except DCMFormatError:
        raise
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise DCMFormatError(
            f"{p}: the header is not valid JSON ({e}); the file is garbled or not safetensors."
        ) from None
    if not isinstance(obj, dict):
        raise DCMFormatError(f"{p}: the header is JSON but not an object; the file is not safetensors.")

    metadata: dict[str, str] = {}
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise DCMFormatError(f"{p}: header '__metadata__' must map strings to strings; the file is damaged.")
        metadata = dict(meta)

    data_len = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, spec in obj.items():
        where = f"{p}: tensor {name!r}"
        if not name:
            raise DCMFormatError(f"{p}: header has a tensor with an empty name; the file is damaged.")
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise DCMFormatError(f"{where}: header entry must have exactly dtype, shape, data_offsets; got {spec!r}.")
        dt, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(dt, str) or dt not in ST_DTYPES:
            raise DCMFormatError(
                f"{where}: unknown dtype {dt!r} (known: {', '.join(sorted(ST_DTYPES))}). The file is damaged or "
                f"uses a dtype this torch build cannot read."
            )
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise DCMFormatError(f"{where}: shape {shape!r} must be a list of non-negative integers.")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise DCMFormatError(f"{where}: data_offsets {offs!r} must be [begin, end] with 0 ≤ begin ≤ end.")
        if offs[1] > data_len:
            raise DCMFormatError(
                f"{where}: data ends at byte {offs[1]} of the data area, but the file holds only {data_len} data "
                f"bytes. The file is truncated; re-download it."
            )
        itemsize = ST_DTYPES[dt][1]
        expected = math.prod(shape) * itemsize
        if offs[1] - offs[0] != expected:
            raise DCMFormatError(
                f"{where}: shape {shape} × {dt} needs {expected} bytes but data_offsets {offs} span "
                f"{offs[1] - offs[0]}. The header is inconsistent; the file is damaged."
            )
        entries[name] = TensorEntry(name, dt, tuple(shape), offs[0], offs[1])

    # Overlaps and holes: the tensors must tile the data area exactly (what safetensors itself requires).
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < pos:
            raise DCMFormatError(
                f"{p}: tensor {e.name!r} (bytes {e.begin}-{e.end}) overlaps the previous tensor (ends at {pos}). "
                f"The header is inconsistent; the file is damaged or crafted."
            )
        if e.begin > pos:
            raise DCMFormatError(
                f"{p}: unused bytes {pos}-{e.begin} before tensor {e.name!r}; the header is inconsistent."
            )
        pos = e.end
    if pos != data_len:
        raise DCMFormatError(
            f"{p}: the tensors use {pos} data bytes but the file holds {data_len}; the file is damaged "
            f"(trailing garbage or a wrong header)."
        )
    return Header(path=p, file_size=size, header_size=n, metadata=metadata, entries=entries)


# --------------------------------------------------------------------------- reader


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN / ±Inf values of a float tensor (0 for other dtypes)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if t.element_size() == 1:  # fp8: isfinite is not implemented for every fp8 dtype
        t = t.to(torch.float16)
    # Fast screen (~20x cheaper than isfinite on CPU): NaN and ±Inf propagate through a sum, so a
    # finite sum proves every element finite. A sum that overflows falls through to the exact count.
    if bool(torch.isfinite(t.sum())):
        return 0
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return 0
    return int(finite.numel() - int(finite.sum()))


def check_finite(t: torch.Tensor, where: str, key: str) -> torch.Tensor:
    """Return ``t``; raise :class:`DCMFormatError` if it holds NaN / Inf."""
    bad = count_nonfinite(t)
    if bad:
        raise DCMFormatError(
            f"{where}: tensor {key!r} holds {bad} NaN/Inf value(s) of {t.numel()}. The weights are corrupted (a "
            f"diverged training run or a damaged file); DCM refuses to use them. Re-download or re-export the model."
        )
    return t


class SafeReader:
    """Stream tensors from a validated safetensors file (one tensor in memory at a time).

    Use as a context manager; :meth:`get` returns a fresh tensor that owns its memory, optionally
    converted to ``dtype``. A float tensor holding NaN / Inf is refused (:func:`check_finite`).

    Each tensor is read with positioned reads (``os.preadv``; ``seek`` + ``readinto`` where that does
    not exist) straight into the buffer of a preallocated tensor, at the byte range the validated
    header gives. The file is never memory-mapped, so reading a whole model does not leave the source
    file's pages mapped into (and counted in the RSS of) the process: peak memory while converting is
    what the caller keeps plus one source tensor (and its converted copy). The pages go to the OS page
    cache only, which the kernel reclaims when it needs to.
    """

    def __init__(self, path: str | os.PathLike, header: Header | None = None):
        self.path = str(path)
        self.header = header or read_header(self.path)
        self._fh: IO[bytes] | None = None
        self._buf: torch.Tensor | None = None  # scratch for reads that convert the dtype (see get)
        self._lock = threading.RLock()  # the seek fallback and the shared scratch buffer

    def __enter__(self) -> "SafeReader":
        try:
            fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in __exit__
        except OSError as e:
            raise DCMFileNotFoundError(f"{self.path}: cannot open the file ({e.strerror or e}). Check that it exists and its permissions.") from e
        size = os.fstat(fh.fileno()).st_size
        if size != self.header.file_size:
            fh.close()
            raise DCMFormatError(
                f"{self.path}: the file is {size} bytes now but was {self.header.file_size} bytes when its header was "
                f"read; it is being written or was replaced. Wait until the download / copy has finished, then retry."
            )
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        fh, self._fh = self._fh, None
        self._buf = None
        if fh is not None:
            fh.close()

    def keys(self) -> list[str]:
        return list(self.header.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.header.entries

    def _read_into(self, view: memoryview, offset: int, key: str) -> None:
        """Fill ``view`` from the file at ``offset``; a short read means the file was truncated."""
        fh = self._fh
        assert fh is not None
        fd = fh.fileno()
        total, pos = view.nbytes, 0
        try:
            if _HAS_PREADV:
                while pos < total:
                    n = os.preadv(fd, [view[pos:]], offset + pos)
                    if n <= 0:
                        break
                    pos += n
            else:
                with self._lock:
                    fh.seek(offset)
                    while pos < total:
                        n = fh.readinto(view[pos:])
                        if not n:
                            break
                        pos += n
        except OSError as e:
            raise DCMFormatError(
                f"{self.path}: cannot read tensor {key!r} ({e.strerror or e}); the file or the disk is damaged. "
                f"Re-download or copy the file again."
            ) from e
        if pos < total:
            raise DCMFormatError(
                f"{self.path}: tensor {key!r} needs bytes {offset}-{offset + total} of the file but it ended after "
                f"{offset + pos}; the file is truncated (was it cut short while being read?). Re-download it."
            )

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (CPU), converting to ``dtype`` if given."""
        e = self.header.entries.get(key)
        if e is None:
            raise DCMFormatError(f"{self.path}: tensor {key!r} is missing from the file.")
        if self._fh is None:
            raise RuntimeError("SafeReader.get() outside a 'with' block")
        with self._lock:
            return self._get(key, e, dtype)

    def _get(self, key: str, e: Any, dtype: torch.dtype | None) -> torch.Tensor:
        convert = dtype is not None and dtype != e.torch_dtype
        if convert and e.nbytes:
            # Read into one reused scratch buffer and convert into a fresh tensor: the only allocation that
            # outlives this call is the converted tensor. Reading into a fresh source-dtype tensor and
            # converting it would interleave short-lived fp32 buffers with long-lived bf16 ones, and the
            # allocator's heap fragments (measured: peak RSS 1.31x the bf16 model when loading a 1.3B fp32
            # checkpoint as bf16, instead of ~1.0x).
            src = self._scratch(e.nbytes).view(e.torch_dtype).view(e.shape)
        else:
            src = torch.empty(e.shape, dtype=e.torch_dtype)
        if e.nbytes:
            # a writable byte view of the contiguous tensor's memory (through ctypes, not .numpy(), which
            # would mark the storage as shared with numpy: not resizable, i.e. "not owned")
            with memoryview((ctypes.c_ubyte * e.nbytes).from_address(src.data_ptr())).cast("B") as view:
                self._read_into(view, self.header.data_offset + e.begin, key)
            itemsize = ST_DTYPES[e.dtype][1]
            if _BIG_ENDIAN and itemsize > 1:  # safetensors stores little-endian
                b = src.reshape(-1).view(torch.uint8).view(-1, itemsize)
                b.copy_(b.flip(-1))
        check_finite(src, self.path, key)
        if not convert:
            return src
        out = torch.empty(e.shape, dtype=dtype)
        out.copy_(src)  # the same rounding as src.to(dtype)
        return out

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """A byte buffer of at least ``nbytes``, reused across :meth:`get` calls (grown to the largest tensor)."""
        buf = self._buf
        if buf is None or buf.numel() < nbytes:
            self._buf = None
            del buf
            self._buf = buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a whole validated safetensors file (small files: LoRAs, tests)."""
    with SafeReader(path) as r:
        return {k: r.get(k, dtype) for k in r.keys()}


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync + rename onto ``path``, else delete it."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=str(dest.parent))
    ok = False
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        ok = True
        with contextlib.suppress(OSError):
            dfd = os.open(str(dest.parent), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class PlannedTensor:
    """Name, shape and dtype of one output tensor, known before the tensor is produced."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[TORCH_TO_ST[self.dtype]][1]


class StreamingWriter:
    """Write a safetensors file whose header is computed up front from a plan.

    ``with StreamingWriter(path, plan, metadata) as w: w.write(name, tensor) ...`` — tensors must
    arrive in plan order with exactly the planned shape and dtype. The file appears at ``path``
    only if every tensor was written; otherwise nothing is left behind.
    """

    def __init__(self, path: str | os.PathLike, plan: Sequence[PlannedTensor], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.plan = list(plan)
        names = [p.name for p in self.plan]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: duplicate tensor names in the write plan")
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        pos = 0
        for p in self.plan:
            if p.dtype not in TORCH_TO_ST:
                raise ValueError(f"{self.path}: dtype {p.dtype} cannot be stored in safetensors")
            header[p.name] = {"dtype": TORCH_TO_ST[p.dtype], "shape": list(p.shape), "data_offsets": [pos, pos + p.nbytes]}
            pos += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - len(raw) % 8) % 8)  # align the data area like safetensors does
        self._header = struct.pack("<Q", len(raw)) + raw
        self._index = 0
        self._cm = None
        self._fh = None

    def __enter__(self) -> "StreamingWriter":
        self._cm = atomic_output(self.path)
        self._fh = self._cm.__enter__()
        self._fh.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._index >= len(self.plan):
            raise ValueError(f"{self.path}: more tensors than planned (got {name!r})")
        p = self.plan[self._index]
        if name != p.name or tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
            raise ValueError(
                f"{self.path}: tensor #{self._index} is {name!r} {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {p.name!r} {p.shape} {p.dtype}"
            )
        self._fh.write(_tensor_bytes(tensor))
        self._index += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._index != len(self.plan):
            missing = self.plan[self._index].name
            exc = ValueError(f"{self.path}: only {self._index} of {len(self.plan)} tensors written (next: {missing})")
            self._cm.__exit__(ValueError, exc, None)
            raise exc
        self._cm.__exit__(exc_type, exc, tb)


def save_state_dict(
    sd: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Atomically write a small in-memory state dict (validated header, same writer as the converter)."""
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with StreamingWriter(path, plan, metadata) as w:
        for k, v in sd.items():
            w.write(k, v)
    return Path(path)
