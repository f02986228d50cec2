"""Damaged safetensors files, property-based: truncation, lying length fields, garbled and non-JSON
headers, inconsistent entries, duplicate keys.

Every generated file goes through every entry point (inspect, load_experts, load_detail_expert,
convert) under CPU / memory bounds (rel_hostile.probe). Where the damage always breaks the file the
property demands a DCMError from each; where it may leave a valid file (a garbled byte inside a
metadata value, say) it accepts success only if the loaded result is sound.
"""

from __future__ import annotations

import json
import math
import struct

import rel_hostile as H
import rel_registry as R
from hypothesis import given
from hypothesis import strategies as st

CAT_TRUNC = "truncated files"
CAT_LEN = "header length lies"
CAT_GARBLE = "garbled headers"
CAT_JSON = "non-JSON headers"
CAT_ENTRY = "inconsistent header entries"
CAT_DUP = "duplicate keys"

seeds = st.sampled_from(H.SEEDS)


# --------------------------------------------------------------------------- truncation


@R.settings(short=20, full=1500)
@given(seed=seeds, data=st.data())
def test_truncated_anywhere_is_refused(world, cases, seed, data):
    s = world.seed(seed)
    n = struct.unpack("<Q", s.blob[:8])[0]
    # half the cases cut inside the length field / header, half anywhere
    cut = data.draw(st.one_of(st.integers(0, 8 + n), st.integers(0, len(s.blob) - 1)), label="cut")
    with R.case(CAT_TRUNC, "truncate official / semantic / detail at a random offset"), cases.new() as d:
        p = H.place(s, d, s.blob[:cut])
        outs = H.probe(p)
        H.all_refused(outs, match=r"truncat|too short|damaged|claims|not safetensors|not valid JSON|garbled")


# --------------------------------------------------------------------------- length field


@R.settings(short=15, full=800)
@given(seed=seeds, data=st.data())
def test_lying_header_length_is_refused_without_allocating(world, cases, seed, data):
    s = world.seed(seed)
    n = struct.unpack("<Q", s.blob[:8])[0]
    size = len(s.blob)
    lie = data.draw(
        st.one_of(
            st.integers(size - 7, 2**64 - 1),  # larger than the file (up to absurd)
            st.integers(2**30, 2**64 - 1),  # enormous
            st.integers(0, n - 1),  # too small: the JSON is cut
            st.integers(n + 1, size - 8),  # too large but inside the file: data bytes read as header
        ),
        label="length",
    )
    with R.case(CAT_LEN, "header length field != real header length"), cases.new() as d:
        p = H.place(s, d, struct.pack("<Q", lie) + s.blob[8:])
        outs = H.probe(p)
        H.all_refused(outs)


# --------------------------------------------------------------------------- garbled bytes in the header


@R.settings(short=25, full=1500)
@given(seed=seeds, data=st.data())
def test_garbled_header_bytes(world, cases, seed, data):
    s = world.seed(seed)
    n = struct.unpack("<Q", s.blob[:8])[0]
    k = data.draw(st.integers(1, 8), label="bytes")
    pos = data.draw(st.lists(st.integers(8, 8 + n - 1), min_size=k, max_size=k, unique=True), label="positions")
    vals = data.draw(st.lists(st.integers(0, 255), min_size=k, max_size=k), label="values")
    b = bytearray(s.blob)
    for at, v in zip(pos, vals):
        b[at] = v
    with R.case(CAT_GARBLE, "1-8 random bytes of the header replaced"), cases.new() as d:
        p = H.place(s, d, bytes(b))
        H.probe(p)  # refused, or accepted only with a sound result


@R.settings(short=15, full=800)
@given(seed=seeds, data=st.data())
def test_garbled_json_tokens(world, cases, seed, data):
    """Structure-aware garbling: replace one JSON token (a key char, a digit, a dtype, a bracket)."""
    s = world.seed(seed)
    n = struct.unpack("<Q", s.blob[:8])[0]
    text = s.blob[8 : 8 + n].decode()
    spots = [i for i, c in enumerate(text) if c in '{}[]":,0123456789FBIU']
    i = data.draw(st.sampled_from(spots), label="at")
    repl = data.draw(st.sampled_from(['"', "{", "}", "[", "]", ",", ":", "0", "9", "-", "x", " ", "\\", "\x00", "é"]))
    new = (text[:i] + repl + text[i + 1 :]).encode()
    with R.case(CAT_GARBLE, "one JSON token of the header replaced"), cases.new() as d:
        p = H.place(s, d, H.pack_raw(new, s.blob[8 + n :]))
        H.probe(p)


# --------------------------------------------------------------------------- non-JSON


def _nested(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


non_json = st.one_of(
    st.binary(min_size=0, max_size=400),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1, 200_000).map(_nested),
    st.sampled_from([b"null", b"[]", b"1e999", b'"x"', b"{", b'{"a":1}', b'{"a":{"dtype":"F32"}}', b"\xef\xbb\xbf{}",
                     b'{"__metadata__":{"a":"b"}, "x":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',
                     b'{"x":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}', b'{"x":NaN}', b"{}" + b"\x00" * 30]),
)


@R.settings(short=30, full=2000)
@given(header=non_json, tail=st.binary(max_size=64), ext=st.sampled_from([".safetensors", ".sft", ".bin", ""]))
def test_non_json_headers(world, cases, header, tail, ext):
    with R.case(CAT_JSON, "random bytes / text / deep nesting as the header"), cases.new() as d:
        p = d / f"random_header{ext}"
        p.write_bytes(H.pack_raw(header, tail))
        outs = H.probe(p)
        # a random header can at best be an empty / unknown file: no entry point may load it
        H.all_refused(outs, entries=("load_experts", "load_detail_expert", "convert"))
        if outs["inspect"].ok:
            assert outs["inspect"].value.kind == "unknown", outs["inspect"].value


# --------------------------------------------------------------------------- inconsistent entries


def _mutations(entry: dict, neighbours: list[dict], data_len: int):
    """Strategies for one entry's (dtype, shape, data_offsets) that contradict the file."""
    b, e = entry["data_offsets"]
    shape = entry["shape"]
    numel = 1
    for x in shape:
        numel *= x
    size = H.ITEMSIZE[entry["dtype"]]
    other_size = st.sampled_from([d for d, s in H.ITEMSIZE.items() if s != size])
    bad_dtype = st.one_of(other_size, st.sampled_from(["F128", "f32", "float32", "", "Q4_0", "F8_E4M3FNUZ"]),
                          st.sampled_from([None, 4, 1.5, ["F32"], {"F32": 1}]))
    bad_shape = st.one_of(
        st.lists(st.integers(0, 4096), max_size=4).filter(lambda s: math.prod(s) != numel),
        st.lists(st.integers(-(2**40), -1), min_size=1, max_size=3),
        st.just([2**62, 2**62]),
        st.lists(st.floats(allow_nan=True), min_size=1, max_size=2),
        st.sampled_from([None, "128", {"0": 1}, [[numel]], [True] * 1]),
    )
    bad_offs = st.one_of(
        st.just([e, b]).filter(lambda o: o[0] != o[1]),  # reversed
        st.tuples(st.integers(0, data_len), st.integers(data_len + 1, 2**64)).map(list),  # past the end
        st.integers(1, 64).map(lambda k: [b + k, e + k]),  # shifted: overlap / hole / past the end
        st.integers(1, 64).map(lambda k: [max(0, b - k), max(0, e - k)]),
        st.just([b, e + 1]),
        st.just([b, max(b, e - 1)]).filter(lambda o: o[1] != e),
        st.sampled_from([None, [0], [0, 1, 2], ["0", "4"], [0.0, 4.0], [-4, 0]]),
    )
    if neighbours:
        nb = neighbours[0]["data_offsets"]
        bad_offs = st.one_of(bad_offs, st.just(list(nb)))  # exactly another tensor's bytes: overlap + hole
    return st.one_of(
        bad_dtype.map(lambda v: ("dtype", v)),
        bad_shape.map(lambda v: ("shape", v)),
        bad_offs.map(lambda v: ("data_offsets", v)),
        st.sampled_from([("drop", "dtype"), ("drop", "shape"), ("drop", "data_offsets"), ("extra", "crc32")]),
    )


@R.settings(short=25, full=1500)
@given(seed=seeds, data=st.data())
def test_inconsistent_entries_are_refused(world, cases, seed, data):
    s = world.seed(seed)
    raw = s.raw
    keys = list(raw.tensors)
    key = data.draw(st.sampled_from(keys), label="tensor")
    entry = raw.header[key]
    others = [raw.header[k] for k in keys if k != key and raw.header[k]["data_offsets"] != entry["data_offsets"]]
    field, value = data.draw(_mutations(entry, others, len(raw.data)), label="mutation")
    header = json.loads(raw.header_bytes)
    if field == "drop":
        del header[key][value]
    elif field == "extra":
        header[key][value] = 0
    else:
        header[key][field] = value
    hb = json.dumps(header).encode()
    with R.case(CAT_ENTRY, "one entry's dtype / shape / offsets contradict the data"), cases.new() as d:
        p = H.place(s, d, H.pack_raw(hb, raw.data))
        outs = H.probe(p)
        H.all_refused(outs, match=key.replace(".", r"\.") + "|overlap|unused bytes|data bytes|truncated")


@R.settings(short=8, full=400)
@given(seed=seeds, data=st.data())
def test_same_size_reinterpretation(world, cases, seed, data):
    """A dtype swapped for another of the same width (F32<->I32, BF16<->F16...) or a shape permuted at
    equal numel keeps the header consistent: the file is refused (non-float / shape checks / NaN) or
    loads only with a sound result."""
    s = world.seed(seed)
    raw = s.raw
    key = data.draw(st.sampled_from([k for k, e in raw.tensors.items() if e["shape"]]), label="tensor")
    e = raw.header[key]
    header = json.loads(raw.header_bytes)
    if data.draw(st.booleans(), label="dtype?"):
        same = [d for d, sz in H.ITEMSIZE.items() if sz == H.ITEMSIZE[e["dtype"]] and d != e["dtype"]]
        header[key]["dtype"] = data.draw(st.sampled_from(same), label="dtype")
    else:
        numel = math.prod(e["shape"])
        header[key]["shape"] = data.draw(st.sampled_from([[numel], [1, numel], [numel, 1], list(reversed(e["shape"]))]))
    with R.case(CAT_ENTRY, "same-width dtype / equal-numel shape swapped"), cases.new() as d:
        p = H.place(s, d, H.pack_raw(json.dumps(header).encode(), raw.data))
        H.probe(p)


# --------------------------------------------------------------------------- duplicate keys


@R.settings(short=15, full=1000)
@given(seed=seeds, data=st.data())
def test_duplicate_keys_are_refused(world, cases, seed, data):
    s = world.seed(seed)
    raw = s.raw
    text = raw.header_bytes.decode().rstrip()
    where = data.draw(st.sampled_from(["tensor", "metadata", "prefixed"]), label="where")
    if where == "metadata" and "__metadata__" in raw.header:
        mk = data.draw(st.sampled_from(sorted(raw.header["__metadata__"])), label="meta key")
        dup = json.dumps(mk) + ":" + json.dumps("x")
        text = text.replace('"__metadata__":{', '"__metadata__":{' + dup + ",", 1)
        match = "twice"
    elif where == "prefixed" and s.kind == "official_dcm":
        # the same tensor under a second spelling ('transformer.' prefix): two copies of one weight
        key = data.draw(st.sampled_from(list(raw.tensors)), label="tensor")
        out = rebuild(raw, extra_alias=key)
        with R.case(CAT_DUP, "one weight under two spellings"), cases.new() as d:
            p = H.place(s, d, out)
            H.all_refused(H.probe(p))
        return
    else:
        key = data.draw(st.sampled_from(list(raw.tensors)), label="tensor")
        dup = json.dumps(key) + ":" + json.dumps(raw.header[key], separators=(",", ":"))
        at = data.draw(st.sampled_from(["start", "end"]), label="at")
        text = "{" + dup + "," + text[1:] if at == "start" else text[:-1] + "," + dup + "}"
        match = "twice"
    with R.case(CAT_DUP, "a key listed twice in the header JSON"), cases.new() as d:
        p = H.place(s, d, H.pack_raw(text.encode(), raw.data))
        H.all_refused(H.probe(p), match=match)


def rebuild(raw: H.Raw, *, extra_alias: str) -> bytes:
    """A consistent file holding ``extra_alias`` twice: as is and with a 'transformer.' prefix."""
    header, chunks, pos = {}, [], 0
    if "__metadata__" in raw.header:
        header["__metadata__"] = raw.header["__metadata__"]
    for name, k in [(k, k) for k in raw.tensors] + [("transformer." + extra_alias, extra_alias)]:
        b = raw.tensor_bytes(k)
        header[name] = {"dtype": raw.header[k]["dtype"], "shape": raw.header[k]["shape"], "data_offsets": [pos, pos + len(b)]}
        chunks.append(b)
        pos += len(b)
    return H.pack(header, b"".join(chunks))


# --------------------------------------------------------------------------- absurd block numbers


@R.settings(short=10, full=400)
@given(seed=seeds, data=st.data())
def test_absurd_block_numbers_are_bounded(world, cases, seed, data):
    """A key renamed to block 10^k (or dcm.dims metadata claiming 10^k blocks) must be refused quickly,
    without building the key list of a model that size."""
    import re

    s = world.seed(seed)
    raw = s.raw
    n = data.draw(st.sampled_from([10**k for k in range(3, 13)] + [2**31, 2**63]), label="index")
    header = json.loads(raw.header_bytes)
    where = data.draw(st.sampled_from(["key", "dims"]) if "dcm.dims" in raw.header.get("__metadata__", {}) else st.just("key"))
    if where == "key":
        blocky = [k for k in raw.tensors if re.search(r"blocks\.\d+\.", k)]
        key = data.draw(st.sampled_from(blocky), label="key")
        new = re.sub(r"blocks\.\d+\.", f"blocks.{n}.", key, count=1)
        header = {(new if k == key else k): v for k, v in header.items()}
    else:
        dims = json.loads(header["__metadata__"]["dcm.dims"])
        field = data.draw(st.sampled_from([k for k in ("num_layers", "num_single_layers", "num_refiner_layers") if k in dims]))
        dims[field] = n
        header["__metadata__"]["dcm.dims"] = json.dumps(dims)
    with R.case(CAT_GARBLE, "block number 10^k in a key or in dcm.dims"), cases.new() as d:
        p = H.place(s, d, H.pack_raw(json.dumps(header).encode(), raw.data))
        H.all_refused(H.probe(p), entries=("load_experts",))
