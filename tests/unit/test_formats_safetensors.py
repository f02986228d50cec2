"""Validated safetensors reading, pickle refusal, streaming + atomic writing."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcm_core.errors import DCMFileNotFoundError, DCMFormatError, DCMUnsupportedFileError
from dcm_core.formats import inspect_file, load_experts, read_header
from dcm_core.formats.safetensors_io import (
    PlannedTensor,
    SafeReader,
    StreamingWriter,
    atomic_output,
    load_state_dict,
    parse_dtype,
    save_state_dict,
)


def _raw(path, header, data: bytes = b"", *, length: int | None = None):
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def _bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def _good(tmp_path):
    p = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(p))
    return p


def test_valid_file_reads_and_streams(tmp_path):
    p = _good(tmp_path)
    h = read_header(p)
    assert h.shapes == {"a": (2, 3), "b": (4,)}
    with SafeReader(p) as r:
        assert torch.equal(r.get("a"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert r.get("b", torch.float32).dtype == torch.float32



READER_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
                 torch.int8, torch.uint8, torch.bool] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def _mapped(path) -> bool:
    """Whether ``path`` is memory-mapped into this process (Linux /proc; False elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            return any(line.rstrip().endswith(str(path)) for line in fh)
    except OSError:
        return False


def test_reader_round_trips_every_dtype_into_owned_memory_without_mmap(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for dt in READER_DTYPES:
        name = str(dt).replace("torch.", "")
        if dt.is_floating_point:
            sd[name] = torch.randn(3, 5, generator=g).to(dt)
        elif dt == torch.bool:
            sd[name] = torch.rand(7, generator=g) > 0.5
        else:
            sd[name] = torch.randint(0, 100, (4, 2), generator=g).to(dt)
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["big"] = torch.randn(300_000, generator=g)  # > one page, read in one positioned read
    p = tmp_path / "all.safetensors"
    save_file(sd, str(p))
    ref = load_file(str(p))
    ref = {k: v.clone() for k, v in ref.items()}  # load_file's tensors keep the file mapped: drop them
    assert not _mapped(p)
    with SafeReader(p) as r:
        for k, want in ref.items():
            got = r.get(k)
            assert got.dtype == want.dtype and got.shape == want.shape, k
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), k
            # owns its memory: not a view of a file mapping or of a numpy array (ComfyUI keeps it as a weight)
            assert got.untyped_storage().resizable() and got.is_contiguous(), k
            assert not _mapped(p), "the reader memory-mapped the file"
        conv = r.get("float32", torch.bfloat16)
        assert conv.dtype == torch.bfloat16 and torch.equal(conv, ref["float32"].to(torch.bfloat16))


def test_reader_without_preadv_reads_the_same(tmp_path, monkeypatch):
    import dcm_core.formats.safetensors_io as sio

    p = _good(tmp_path)
    monkeypatch.setattr(sio, "_HAS_PREADV", False)
    with SafeReader(p) as r:
        assert torch.equal(r.get("a"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert torch.equal(r.get("b"), torch.ones(4, dtype=torch.bfloat16))


def test_reader_file_truncated_or_replaced_after_the_header_was_read(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(p))
    h = read_header(p)
    # cut short while a reader has it open: the tensor past the end is a truncated-file error naming both
    with SafeReader(p, h) as r:
        assert torch.equal(r.get("a"), torch.ones(64))
        os.truncate(p, h.file_size - 4)
        with pytest.raises(DCMFormatError, match=r"t\.safetensors: tensor 'b' .*truncated"):
            r.get("b")
    # a header read before the file changed: refused on open, before any tensor is read
    with pytest.raises(DCMFormatError, match=r"t\.safetensors: the file is .* bytes now but was"):
        with SafeReader(p, h):
            pass
    os.unlink(p)
    with pytest.raises(DCMFileNotFoundError, match=r"t\.safetensors: cannot open"):
        with SafeReader(p, h):
            pass


def test_reader_refuses_nan_after_a_positioned_read(tmp_path):
    p = tmp_path / "nan.safetensors"
    t = torch.ones(1000)
    t[777] = float("nan")
    save_file({"ok": torch.ones(3), "w": t}, str(p))
    with SafeReader(p) as r:
        assert torch.equal(r.get("ok"), torch.ones(3))
        with pytest.raises(DCMFormatError, match=r"nan\.safetensors: tensor 'w' holds 1 NaN/Inf"):
            r.get("w")


BAD_HEADERS = [
    ("garbled", lambda t: _raw(t / "x.safetensors", b"\xff\xfe\x00garbage!")),
    ("non_json", lambda t: _raw(t / "x.safetensors", b"this is not json")),
    ("json_array", lambda t: _raw(t / "x.safetensors", b"[1, 2, 3]")),
    ("header_len_gt_file", lambda t: _raw(t / "x.safetensors", b"{}", length=10_000)),
    ("huge_header_len", lambda t: _raw(t / "x.safetensors", b"{}", length=2**62)),
    (
        "duplicate_keys",
        lambda t: _raw(
            t / "x.safetensors",
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            b"\0" * 4,
        ),
    ),
    ("unknown_dtype", lambda t: _raw(t / "x.safetensors", {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16)),
    ("shape_vs_offsets", lambda t: _raw(t / "x.safetensors", {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8)),
    ("float_shape", lambda t: _raw(t / "x.safetensors", {"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("negative_shape", lambda t: _raw(t / "x.safetensors", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("offsets_past_end", lambda t: _raw(t / "x.safetensors", {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 8)),
    (
        "overlap",
        lambda t: _raw(
            t / "x.safetensors",
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
    ),
    ("hole", lambda t: _raw(t / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)),
    ("trailing_bytes", lambda t: _raw(t / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9)),
    ("bad_metadata", lambda t: _raw(t / "x.safetensors", {"__metadata__": {"k": 1}})),
    ("extra_entry_field", lambda t: _raw(t / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4)),
    ("empty_file", lambda t: _bytes(t / "x.safetensors", b"")),
    ("short_file", lambda t: _bytes(t / "x.safetensors", b"\x01\x02\x03")),
]


@pytest.mark.parametrize("name,make", BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS])
def test_bad_headers_rejected_with_file_name(tmp_path, name, make):
    p = make(tmp_path)
    with pytest.raises(DCMFormatError) as ei:
        read_header(p)
    assert str(p) in str(ei.value)
    with pytest.raises(DCMFormatError):
        inspect_file(p)


def test_duplicate_key_is_named(tmp_path):
    """JSON keeps the last of two equal keys; the reader refuses the file instead, naming the key."""
    p = dict(BAD_HEADERS)["duplicate_keys"](tmp_path)
    with pytest.raises(DCMFormatError, match=r"the safetensors header lists the key 'a' twice"):
        read_header(p)


def test_header_size_cap(tmp_path):
    """A header longer than the cap is refused from its 8-byte length alone, before any of it is read."""
    import tracemalloc

    from dcm_core.formats.safetensors_io import MAX_HEADER_BYTES

    good = _good(tmp_path)
    n = struct.unpack("<Q", good.read_bytes()[:8])[0]
    assert read_header(good, max_header_bytes=n).header_size == n  # at the cap: read
    with pytest.raises(DCMFormatError, match=rf"the header claims {n} bytes \(limit {n - 1}\); that is not a real model header"):
        read_header(good, max_header_bytes=n - 1)
    # the default cap, on the user's paths (read_header, inspect): a sparse file whose header length is one byte
    # over 100 MiB; reading that header would allocate > 100 MB
    big = tmp_path / "huge_header.safetensors"
    with open(big, "wb") as fh:
        fh.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        fh.truncate(8 + MAX_HEADER_BYTES + 1 + 16)
    for fn in (read_header, inspect_file):
        tracemalloc.start()
        try:
            with pytest.raises(DCMFormatError, match=rf"claims {MAX_HEADER_BYTES + 1} bytes \(limit {MAX_HEADER_BYTES}\)"):
                fn(big)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{fn.__name__} allocated {peak} bytes before refusing"


def test_truncated_real_file(tmp_path):
    p = _good(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with pytest.raises(DCMFormatError, match="truncated|damaged"):
        read_header(p)


def test_lying_header_is_not_allocated(tmp_path):
    """A header claiming a 1e12-element tensor is refused from the header alone."""
    p = _raw(tmp_path / "lie.safetensors", {"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 8)
    with pytest.raises(DCMFormatError, match="truncated"):
        read_header(p)


@pytest.mark.parametrize("kind", ["pickle", "zip_pt", "gguf", "json"])
def test_foreign_files_refused_without_unpickling(tmp_path, kind):
    p = tmp_path / f"model.{ 'pt' if kind != 'json' else 'safetensors'}"
    marker = tmp_path / "pwned"
    if kind == "pickle":

        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        p.write_bytes(pickle.dumps(Evil(), protocol=2))
    elif kind == "zip_pt":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    elif kind == "gguf":
        p.write_bytes(b"GGUF" + b"\0" * 64)
    else:
        p.write_text('{"weight_map": {}}')
    with pytest.raises(DCMUnsupportedFileError) as ei:
        inspect_file(p)
    assert str(p) in str(ei.value)
    if kind != "json":
        assert "safetensors" in str(ei.value)
    with pytest.raises(DCMUnsupportedFileError):
        load_experts(p)
    assert not marker.exists()


def test_missing_and_directory(tmp_path):
    with pytest.raises(DCMFileNotFoundError, match="not found"):
        inspect_file(tmp_path / "nope.safetensors")
    with pytest.raises(DCMFileNotFoundError, match="folder"):
        inspect_file(tmp_path)


def test_streaming_writer_roundtrip_matches_safetensors(tmp_path):
    sd = {
        "w": torch.randn(5, 3),
        "b": torch.randn(7).to(torch.bfloat16),
        "h": torch.randn(2, 2).to(torch.float16),
        "s": torch.tensor(3.5),
        "e": torch.zeros(0, 4),
        "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
    }
    p = save_state_dict(sd, tmp_path / "o.safetensors", {"dcm.role": "semantic"})
    back = load_file(str(p))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k].float(), sd[k].float()), k
    assert read_header(p).metadata["dcm.role"] == "semantic"
    assert load_state_dict(p, torch.float32)["b"].dtype == torch.float32
    assert os.listdir(tmp_path) == ["o.safetensors"]


def test_streaming_writer_cleans_up_on_error(tmp_path):
    plan = [PlannedTensor("a", (2,), torch.float32), PlannedTensor("b", (3,), torch.float32)]
    dest = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"tensor #1 is 'b' \(4,\) torch.float32, planned 'b' \(3,\) torch.float32"):
        with StreamingWriter(dest, plan) as w:
            w.write("a", torch.zeros(2))
            w.write("b", torch.zeros(4))  # wrong shape
    with pytest.raises(ValueError, match="only 1 of 2"):
        with StreamingWriter(dest, plan) as w:
            w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="^boom$"):  # the caller's error, not one of the writer's
        with StreamingWriter(dest, plan) as w:
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_output_keeps_old_file_on_error(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="^x$"):
        with atomic_output(dest) as fh:
            fh.write(b"new partial")
            raise RuntimeError("x")
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_parse_dtype():
    assert parse_dtype("bf16") == torch.bfloat16
    assert parse_dtype("fp8_e4m3fn") == torch.float8_e4m3fn
    assert parse_dtype(None) is None
    with pytest.raises(DCMFormatError, match="int4"):
        parse_dtype("int4")


def test_header_length_that_looks_like_pickle_magic(tmp_path):
    """A valid file whose 8-byte length starts with 0x80 0x01 (n = 384) is not mistaken for a pickle."""
    body = json.dumps({"__metadata__": {"pad": ""}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    body = body.replace('"pad": ""', '"pad": "' + "x" * (384 - len(body)) + '"').encode()
    assert len(body) == 384
    p = _raw(tmp_path / "x.safetensors", body, b"\0" * 4)
    assert p.read_bytes()[:2] == b"\x80\x01"
    assert read_header(p).shapes == {"a": (1,)}


def test_converting_reads_equal_to_and_share_no_memory(tmp_path):
    """Reads that convert go through one reused scratch buffer; every returned tensor is still its own."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(*shape, generator=g) * 100
               for i, shape in enumerate([(7, 5), (64, 33), (3,), (2, 2, 9), (64, 33)])}  # fmt: skip
    tensors["empty"] = torch.zeros(0, 4)
    path = tmp_path / "f.safetensors"
    save_file(tensors, str(path))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        with SafeReader(path) as r:
            got = {k: r.get(k, dtype) for k in r.keys()}
        for k, t in tensors.items():
            assert got[k].dtype == dtype and got[k].shape == t.shape
            assert torch.equal(got[k], t.to(dtype)), (k, dtype)  # same rounding as .to()
            assert got[k].untyped_storage().resizable()  # owns its memory
        ptrs = [t.untyped_storage().data_ptr() for t in got.values() if t.numel()]
        assert len(set(ptrs)) == len(ptrs)
