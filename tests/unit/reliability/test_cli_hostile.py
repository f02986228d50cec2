"""``python -m dcm_core inspect`` / ``convert`` on hostile files: exit code 2, ``error: <message naming
the file>`` on stderr, no traceback, and nothing written (no output, no hidden temporary file).

Subprocesses cost ~3 s each (torch import), so ``make test`` runs one real subprocess (convert failing mid-write) and every
other case through ``cli.main`` in-process (the same code path minus the interpreter start);
``--reliability-full`` runs every case in a subprocess.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys

import pytest
import rel_hostile as H
import rel_registry as R
import torch

from dcm_core import cli

CAT = "CLI inspect / convert"


class _Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(marker) -> bytes:
    e = _Evil()
    e.marker = str(marker)
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": e}, buf)
    return buf.getvalue()


def _style_lora() -> bytes:
    from safetensors.torch import save

    sd = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 128),
          "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(128, 4)}
    return save(sd)


def _builders(world, marker):
    off = world.seed("official_wan")
    raw = off.raw
    nan_key = sorted(k for k in raw.tensors if k.startswith("proj_out_lora."))[0]  # late in the plan: fails mid-write
    lora_a = sorted(k for k in raw.tensors if ".lora_A." in k)[0]
    return {
        "truncated": (off, lambda: off.blob[: len(off.blob) // 2], r"truncated"),
        "lying_length": (off, lambda: struct.pack("<Q", 2**61) + off.blob[8:], r"claims"),
        "malicious_pickle": (None, lambda: _evil_pickle(marker), r"zip archive|pickle"),
        "nan_weight": (off, lambda: H.with_element(off.blob, nan_key, 3, float("nan")), r"NaN"),
        "missing_tensor": (off, lambda: H.rebuild(raw, [k for k in raw.tensors if k != "blocks.1.norm2.weight"]), r"missing"),
        "rank_mismatch": (off, lambda: H.rebuild(raw, replace={lora_a: (raw.header[lora_a]["dtype"], [7, 128], b"\0" * (7 * 128 * 4))}), r"rank"),
        "style_lora": (None, _style_lora, r"LoraLoaderModelOnly"),
        "already_converted": (world.seed("semantic_wan"), lambda: world.seed("semantic_wan").blob, r"already a converted"),
    }


CASES = ["truncated", "lying_length", "malicious_pickle", "nan_weight", "missing_tensor", "rank_mismatch", "style_lora",
         "already_converted"]
#: in make test, this one goes through a real subprocess; the rest in-process
SUBPROCESS_SHORT = {("convert", "nan_weight")}


def _run_subprocess(args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(H.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("DCM_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "dcm_core", *map(str, args)], capture_output=True, text=True,
                       cwd=H.ROOT, env=env, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def _run_inprocess(args, capsys):
    capsys.readouterr()
    with H.no_unpickling():
        code = cli.main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    m = tmp_path_factory.mktemp("cli_pwn") / "UNPICKLED"
    yield m
    assert not m.exists()


@pytest.mark.parametrize("command", ["inspect", "convert"])
@pytest.mark.parametrize("name", CASES)
def test_cli_refuses_hostile_file(world, marker, tmp_path, capsys, command, name):
    _, make, want = _builders(world, marker)[name]
    described = command == "inspect" and name in ("nan_weight", "style_lora", "already_converted")
    ext = ".ckpt" if name == "malicious_pickle" else ".safetensors"
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / f"hostile_{name}{ext}"
    src.write_bytes(make())
    out = tmp_path / "out"
    args = [command, src] + (["--out-dir", out, "--no-progress"] if command == "convert" else [])
    sub = R.FULL or (command, name) in SUBPROCESS_SHORT
    with R.case(CAT, f"{command} via {'subprocess' if sub else 'cli.main'}"):
        code, stdout, stderr = _run_subprocess(args) if sub else _run_inprocess(args, capsys)
        if described:  # inspect reads the header only: a readable file of the wrong kind is described
            assert code == 0 and f"file:       {src}" in stdout and "kind:" in stdout, (code, stdout, stderr)
            assert sorted(os.listdir(src_dir)) == [src.name]
            return
        assert code == 2, (code, stdout, stderr)
        assert stderr.startswith("error: ") and src.name in stderr, stderr
        assert "Traceback" not in stderr
        import re

        assert re.search(want, stderr, re.I), stderr
        assert sorted(os.listdir(src_dir)) == [src.name], "files appeared next to the input"
        assert not out.exists() or os.listdir(out) == [], f"convert left {os.listdir(out)} (partial / temporary files)"
        assert not marker.exists()


# --------------------------------------------------------------------------- disk full while converting


def _mountable() -> bool:
    if os.geteuid() != 0:
        return False
    probe = H.ROOT / "tests" / "_output" / f".mount_probe_{os.getpid()}"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if r.returncode == 0:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return r.returncode == 0
    except OSError:
        return False
    finally:
        probe.rmdir()


@pytest.mark.parametrize("fraction", [0.3] + ([0.0, 0.05, 0.5, 0.7, 0.95] if R.FULL else []))
def test_convert_on_a_full_disk(world, tmp_path, capsys, monkeypatch, fraction):
    """convert onto a disk that fills up part-way: exit 2 with a message (no traceback), nothing left."""
    src = world.seed("official_wan").path
    need = 2 * len(world.seed("official_wan").blob) // 4  # bf16 output ~ half the fp32 source, both files
    out = tmp_path / "vol"
    out.mkdir()
    mounted = _mountable()
    with R.case(CAT, "convert onto a full disk" + (" (tmpfs)" if mounted else " (injected ENOSPC)")):
        if mounted:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(4096, int(fraction * need))}", "tmpfs", str(out)], check=True)
        else:
            import errno

            from dcm_core.formats import safetensors_io as sio

            budget = {"left": int(fraction * need)}
            real = sio._tensor_bytes

            def tensor_bytes(t):
                mv = real(t)
                budget["left"] -= mv.nbytes
                if budget["left"] < 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return mv

            monkeypatch.setattr(sio, "_tensor_bytes", tensor_bytes)
        try:
            code, stdout, stderr = _run_inprocess(["convert", src, "--out-dir", out, "--no-progress"], capsys)
            listing = sorted(os.listdir(out))
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(out)], check=False)
        assert code == 2, (code, stdout, stderr)
        assert stderr.startswith("error: ") and "No space left on device" in stderr and "Traceback" not in stderr, stderr
        assert listing == [], f"a full disk left {listing}"
