"""Training faults (CPU, tiny Wan detail stage: student LoRA + *_lora modules, discriminator, EMA):

* SIGKILL: the trainer runs as a subprocess (``python -m dcm_core train`` through rel_train_child.py)
  and is killed — inside a checkpoint write (after the n-th file of the temp folder), between the
  manifest and the rename, right after a checkpoint is published, between steps, inside the deletion
  of an old checkpoint by rotation, or at a random wall time. Afterwards every published checkpoint verifies (atomic publication), ``--resume latest`` picks
  the newest complete one, and the continued run ends with tensors *identical* (torch.equal) to an
  uninterrupted run with the same seed: weights, EMA, discriminator, both optimizers, RNG states.
  A kill before the first checkpoint is complete leaves nothing to resume: ``--resume latest`` says so
  (DCMCheckpointError) and a fresh run reproduces the reference.
* A corrupted newest checkpoint (byte flips, truncation, deleted or garbled files / manifest; the
  newest one or two) is skipped with a warning naming it, in favour of the newest intact one, and the
  resumed run again ends bit-identical to the reference.
* Disk full during export (a tmpfs of random size when this process may mount one, else an injected
  ENOSPC at a random write): the export fails, nothing is left under the final name (a previous export
  stays byte-identical) and no temporary folder is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rel_registry as R
import torch
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import strategies as st
from safetensors.torch import load_file

from dcm_core.errors import DCMCheckpointError, DCMWriteError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CHILD = HERE / "rel_train_child.py"

CAT_KILL = "trainer SIGKILL + resume"
CAT_CORRUPT = "corrupted checkpoint"
CAT_DISK = "disk full on export"

STEPS = 4
FILES_PER_CKPT = 12  # 11 state files + MANIFEST.json (detail stage with EMA)
EXTRA = dict(max_train_steps=STEPS, checkpoint__every_steps=1, optim__use_ema="true", data__caption_dropout=0.5,
             export__at_end="false", optim__lr=1e-4)


def _train_helpers():
    """tests/unit/train/conftest.py's dataset + config helpers (importlib mode: loaded by path)."""
    spec = importlib.util.spec_from_file_location("dcm_rel_train_helpers", ROOT / "tests" / "unit" / "train" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TH = _train_helpers()


def _cfg(data: Path, out: Path, **extra):
    from dcm_core.train.config import load_config

    return load_config(None, TH.tiny_overrides("wan", data, out, **dict(EXTRA, **extra)), stage="detail")


def _final_tensors(run: Path, step: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    d = run / "checkpoints" / f"checkpoint-{step:08d}"
    return {f.name: load_file(str(f)) for f in sorted(d.glob("*.safetensors"))}


def _assert_identical(a, b, what: str) -> None:
    assert a.keys() == b.keys(), (what, a.keys(), b.keys())
    for fname in a:
        assert a[fname].keys() == b[fname].keys(), (what, fname)
        bad = [k for k in a[fname] if not torch.equal(a[fname][k], b[fname][k])]
        assert not bad, f"{what}: {fname} differs from the uninterrupted run at {bad[:3]}"


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_warnings():
    h = _Warnings()
    lg = logging.getLogger("DCM.train")
    lg.addHandler(h)
    try:
        yield h.messages
    finally:
        lg.removeHandler(h)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The tiny dataset and an uninterrupted reference run (all checkpoints kept) + its trainer."""
    from dcm_core.train.trainer import DCMTrainer

    root = tmp_path_factory.mktemp("train_ref")
    data = TH.make_dataset(root / "data", "wan", n=3)
    cfg = _cfg(data, root / "A", checkpoint__keep=0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test and the trainer subprocesses (OMP_NUM_THREADS=1): same float order
    try:
        tr = DCMTrainer(cfg)
        t0 = time.perf_counter()
        tr.train()
    finally:
        torch.set_num_threads(n)
    return dict(root=root, data=data, run=root / "A", final=_final_tensors(root / "A"), trainer=tr, cfg=cfg,
                seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- SIGKILL


kill_specs = st.one_of(
    st.integers(1, FILES_PER_CKPT * STEPS).map(lambda n: ("files", n)),
    st.integers(1, STEPS).map(lambda n: ("manifest", n)),
    st.integers(1, STEPS).map(lambda n: ("published", n)),
    st.integers(2, STEPS).map(lambda n: ("step", n)),
    st.floats(0.0, 1.0).map(lambda f: ("time", round(f, 3))),
)


def _spawn(spec: tuple, cfg_file: Path, run: Path, ref_seconds: float) -> int:
    kind, arg = spec
    env = TH.subprocess_env()
    cmd = [sys.executable, str(CHILD), "none" if kind == "time" else f"{kind}:{arg}", "--", "train", "--config", str(cfg_file)]
    if kind != "time":
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode in (-signal.SIGKILL, 0), r.stderr[-3000:]
        return r.returncode
    # external SIGKILL at a random moment after the first checkpoint is published
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = run / "checkpoints" / "checkpoint-00000001" / "MANIFEST.json"
    try:
        deadline = time.time() + 600
        while not first.is_file() and proc.poll() is None:
            assert time.time() < deadline, "no first checkpoint within 600 s"
            time.sleep(0.005)
        time.sleep(arg * ref_seconds * (STEPS - 1) / STEPS)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert proc.returncode in (-signal.SIGKILL, 0), err[-3000:]
    return proc.returncode


def _kill_examples(f):
    """make test: one kill inside checkpoint 2's write (resume from checkpoint 1); make reliability: one of
    every kind (incl. inside the first checkpoint: nothing to resume) plus the generated ones."""
    f = example(spec=("files", FILES_PER_CKPT + 5))(f)
    if R.FULL:
        for spec in [("files", 5), ("manifest", 2), ("published", 3), ("step", 3), ("time", 0.5), ("files", FILES_PER_CKPT * STEPS)]:
            f = example(spec=spec)(f)
    return f


@R.settings(short=1, full=14, phases=[Phase.explicit] if not R.FULL else [Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck))
@_kill_examples
@given(spec=kill_specs)
def test_sigkill_anywhere_then_resume_latest(ref, tmp_path_factory, spec):
    from dcm_core.train import checkpoint as ck
    from dcm_core.train.trainer import DCMTrainer

    root = tmp_path_factory.mktemp("kill")
    run = root / "B"
    cfg = _cfg(ref["data"], run, checkpoint__keep=2)
    cfg_file = root / "b.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    with R.case(CAT_KILL, f"SIGKILL ({spec[0]}), then --resume latest to the end"):
        rc = _spawn(spec, cfg_file, run, ref["seconds"])
        ckroot = run / "checkpoints"
        published = ck.list_checkpoints(ckroot)
        keep = cfg.checkpoint.keep
        for step, path in published:
            # atomic publication and deletion: a checkpoint folder is complete or absent
            assert ck.verify_checkpoint(path) is None, (path.name, ck.verify_checkpoint(path))
        assert len(published) <= keep + 1  # a kill between publishing and rotating leaves one more
        latest = ck.find_latest_valid(ckroot)
        if rc == 0:
            assert latest is not None and latest.name == f"checkpoint-{STEPS:08d}"
        if latest is None:
            with pytest.raises(DCMCheckpointError, match="no complete checkpoint"):
                DCMTrainer(cfg, resume="latest")
            tr = DCMTrainer(cfg)  # nothing to resume: a fresh start
        else:
            tr = DCMTrainer(cfg, resume="latest")
            assert latest == published[0][1] and tr.global_step == published[0][0], (tr.global_step, latest)
        tr.train()
        _assert_identical(ref["final"], _final_tensors(run), f"kill at {spec}")
        leftovers = sorted(p.name for p in ckroot.iterdir() if p.name.startswith((".tmp-", ".old-", ".trash", ".broken-")))
        assert not leftovers, f"temporary checkpoint folders left after the resumed run: {leftovers}"
        # rotation applies after a kill, also when the run resumed at its last step and saved nothing
        assert len(ck.list_checkpoints(ckroot)) <= cfg.checkpoint.keep


def test_kill_during_rotation_leaves_no_half_deleted_checkpoint(ref, tmp_path):
    """Rotation renames an old checkpoint into checkpoints/.trash/ before deleting it: a SIGKILL in the middle
    of the deletion leaves every published checkpoint complete, and the resumed run removes the leftover."""
    from dcm_core.train import checkpoint as ck
    from dcm_core.train.trainer import DCMTrainer

    run = tmp_path / "B"
    cfg = _cfg(ref["data"], run, checkpoint__keep=2)
    cfg_file = tmp_path / "b.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    ckroot = run / "checkpoints"
    with R.case(CAT_KILL, "SIGKILL inside checkpoint rotation, then --resume latest to the end"):
        rc = _spawn(("rotate", 1), cfg_file, run, ref["seconds"])
        assert rc == -signal.SIGKILL, "the child was not killed inside the rotation"
        published = ck.list_checkpoints(ckroot)
        assert [s for s, _ in published] == [3, 2], published
        broken = [p.name for _, p in published if ck.verify_checkpoint(p) is not None]
        assert not broken, f"half-deleted checkpoint(s) under a final name: {broken}"
        # the kill came inside the deletion: the half-deleted folder is in the trash, under no published name
        half = ckroot / ck.TRASH / "checkpoint-00000001"
        assert half.is_dir() and ck.verify_checkpoint(half) is not None
        warnings: list[str] = []
        assert ck.find_latest_valid(ckroot, warn=warnings.append) == ckroot / "checkpoint-00000003" and not warnings
        tr = DCMTrainer(cfg, resume="latest")
        assert tr.global_step == 3
        assert not (ckroot / ck.TRASH).exists(), "resume did not remove the half-deleted leftover"
        tr.train()
        _assert_identical(ref["final"], _final_tensors(run), "kill during rotation")
        assert sorted(p.name for p in ckroot.iterdir()) == ["checkpoint-00000003", "checkpoint-00000004"]


# --------------------------------------------------------------------------- corrupted checkpoints


def _link_copy(src: Path, dst: Path) -> None:
    """Copy a run's checkpoints with hard links (files we corrupt are rewritten, never edited in place)."""
    dst.mkdir(parents=True)
    for d in src.iterdir():
        (dst / d.name).mkdir()
        for f in d.iterdir():
            os.link(f, dst / d.name / f.name)


def _rewrite(p: Path, data: bytes) -> None:
    p.unlink()
    p.write_bytes(data)


def _corrupt(ckpt: Path, how: str, rnd: random.Random) -> str:
    files = sorted(p.name for p in ckpt.iterdir())
    name = rnd.choice(files)
    p = ckpt / name
    data = p.read_bytes()
    if how == "flip":
        i = rnd.randrange(len(data))
        b = bytearray(data)
        # any bit, also in MANIFEST.json (a flipped high bit there makes it non-UTF-8: skipped as unreadable)
        b[i] ^= 1 << rnd.randrange(8)
        _rewrite(p, bytes(b))
    elif how == "truncate":
        _rewrite(p, data[: rnd.randrange(len(data))])
    elif how == "append":
        _rewrite(p, data + b"\0" * rnd.randint(1, 64))
    elif how == "delete":
        p.unlink()
    elif how == "empty":
        _rewrite(p, b"")
    elif how == "manifest_garbled":
        name = "MANIFEST.json"
        _rewrite(ckpt / name, b'{"format_version": 1, "files": ' + bytes(rnd.randrange(32, 127) for _ in range(8)))
    elif how == "manifest_deleted":
        name = "MANIFEST.json"
        (ckpt / name).unlink()
    return f"{how} {name}"


@R.settings(short=6, full=80)
@given(how=st.sampled_from(["flip", "truncate", "append", "delete", "empty", "manifest_garbled", "manifest_deleted"]),
       n_bad=st.integers(1, 2), seed=st.integers(0, 2**32 - 1), resume=st.booleans())
def test_corrupted_newest_checkpoint_is_skipped(ref, tmp_path_factory, how, n_bad, seed, resume):
    from dcm_core.train import checkpoint as ck
    from dcm_core.train.trainer import DCMTrainer

    rnd = random.Random(seed)
    root = tmp_path_factory.mktemp("corrupt")
    run = root / "run"
    _link_copy(ref["run"] / "checkpoints", run / "checkpoints")
    newest = [p for _, p in ck.list_checkpoints(run / "checkpoints")][:n_bad]
    # the second-newest may get a different kind of damage
    damage = [_corrupt(p, how if i == 0 else rnd.choice(["flip", "delete", "truncate"]), rnd) for i, p in enumerate(newest)]
    want_step = STEPS - n_bad
    with R.case(CAT_CORRUPT, "newest checkpoint(s) damaged: fall back with a warning" + (", resume to the end" if resume else "")):
        warnings: list[str] = []
        found = ck.find_latest_valid(run / "checkpoints", warn=warnings.append)
        assert found is not None and found.name == f"checkpoint-{want_step:08d}", (found, damage)
        assert len(warnings) == n_bad, warnings
        for p, w in zip(newest, warnings):
            assert p.name in w and "skipping" in w, (w, damage)
        if resume and (R.FULL or n_bad == 1):
            cfg = _cfg(ref["data"], run, checkpoint__keep=0)
            with _captured_warnings() as logged:
                tr = DCMTrainer(cfg, resume="latest")
            assert tr.global_step == want_step
            assert any(newest[0].name in m and "skipping" in m for m in logged), logged
            tr.train()
            _assert_identical(ref["final"], _final_tensors(run), f"resume after {damage}")


def test_non_utf8_manifest_is_skipped(ref, tmp_path):
    """A MANIFEST.json with a non-UTF-8 byte is an unreadable manifest: skipped with a warning (it used to
    raise UnicodeDecodeError out of find_latest_valid, crashing --resume latest)."""
    from dcm_core.train import checkpoint as ck

    with R.case(CAT_CORRUPT, "newest MANIFEST.json with a non-UTF-8 byte"):
        _link_copy(ref["run"] / "checkpoints", tmp_path / "checkpoints")
        newest = ck.list_checkpoints(tmp_path / "checkpoints")[0][1]
        mf = newest / "MANIFEST.json"
        b = bytearray(mf.read_bytes())
        b[len(b) // 2] ^= 0x80
        _rewrite(mf, bytes(b))
        warnings: list[str] = []
        found = ck.find_latest_valid(tmp_path / "checkpoints", warn=warnings.append)
        assert found is not None and found.name == f"checkpoint-{STEPS - 1:08d}"
        assert len(warnings) == 1 and newest.name in warnings[0] and "MANIFEST.json is unreadable" in warnings[0], warnings


def test_every_checkpoint_damaged_is_a_clear_error(ref, tmp_path):
    from dcm_core.train import checkpoint as ck

    with R.case(CAT_CORRUPT, "every checkpoint damaged: clear error"):
        _link_copy(ref["run"] / "checkpoints", tmp_path / "checkpoints")
        for _, p in ck.list_checkpoints(tmp_path / "checkpoints"):
            (p / "MANIFEST.json").unlink()
        with pytest.raises(DCMCheckpointError, match=r"no complete checkpoint under .*checkpoints"):
            ck.resolve_resume("latest", tmp_path / "checkpoints")


# --------------------------------------------------------------------------- disk full on export


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    d = Path(f"/tmp/dcm_rel_mount_probe_{os.getpid()}")
    d.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(d)], capture_output=True)
        return ok
    finally:
        with contextlib.suppress(OSError):
            d.rmdir()


MOUNT = _can_mount()


@contextlib.contextmanager
def _tmpfs(path: Path, size: int):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(size, 4096)}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def _enospc_after(budget: int):
    """Injected disk-full (no mount available): every write path of an export shares a byte budget;
    the write that exceeds it writes what fits and raises ENOSPC, as a full disk does."""
    import safetensors.torch as st_torch

    from dcm_core.formats import safetensors_io as sio

    left = {"n": budget}

    def take(n: int) -> int:
        k = min(n, left["n"])
        left["n"] -= k
        return k

    def full():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    orig_save, orig_tb, orig_wt = st_torch.save_file, sio._tensor_bytes, Path.write_text

    def save_file(tensors, filename, metadata=None):
        blob = st_torch.save(tensors, metadata=metadata)
        k = take(len(blob))
        Path(filename).write_bytes(blob[:k])
        if k < len(blob):
            raise full()

    def tensor_bytes(t):
        mv = orig_tb(t)
        if take(mv.nbytes) < mv.nbytes:
            raise full()
        return mv

    def write_text(self, data, *a, **k):
        if take(len(data.encode())) < len(data.encode()):
            raise full()
        return orig_wt(self, data, *a, **k)

    st_torch.save_file, sio._tensor_bytes, Path.write_text = save_file, tensor_bytes, write_text
    try:
        yield
    finally:
        st_torch.save_file, sio._tensor_bytes, Path.write_text = orig_save, orig_tb, orig_wt


def _tree_digest(p: Path) -> dict[str, str]:
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def export_size(ref, tmp_path_factory):
    from dcm_core.train.export import export_model

    out = tmp_path_factory.mktemp("export_size") / "export"
    export_model(ref["trainer"].cfg, ref["trainer"].student_unwrapped, out)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


@R.settings(short=4, full=60)
@given(frac=st.floats(0.0, 0.999), previous=st.booleans())
def test_disk_full_during_export_leaves_nothing_half_written(ref, export_size, tmp_path_factory, frac, previous):
    from dcm_core.formats import load_experts
    from dcm_core.train.export import export_model

    base = tmp_path_factory.mktemp("diskfull")
    student, cfg = ref["trainer"].student_unwrapped, ref["trainer"].cfg  # the resolved config the trainer exports with
    mode = "tmpfs" if MOUNT else "injected ENOSPC"
    with R.case(CAT_DISK, f"export with the disk full part-way ({mode})" + (", previous export present" if previous else "")):
        vol = base / "vol"
        old_digest = None
        if MOUNT:
            # room for the previous export (if any) plus a fraction of the new one
            size = int((export_size if previous else 0) + frac * export_size) + (64 * 1024 if previous else 0)
            cm = _tmpfs(vol, size)
        else:
            vol.mkdir()
            cm = contextlib.nullcontext()
        with cm:
            out = vol / "export"
            if previous:
                export_model(cfg, student, out)
                old_digest = _tree_digest(out)
            fault = contextlib.nullcontext() if MOUNT else _enospc_after(int(frac * export_size))
            err = None
            with fault:
                try:
                    export_model(cfg, student, out)
                except Exception as e:  # noqa: BLE001 - whatever a full disk raises
                    err = e
            left = sorted(p.name for p in vol.iterdir() if p.name != "export")
            assert not left, f"temporary export folders left behind: {left}"
            if err is None:  # it fit after all: the export must be complete and loadable
                names = sorted(p.name for p in out.iterdir())
                assert "export_info.json" in names and any(n.endswith("_detail_expert.safetensors") for n in names), names
                sem = next(out.glob("*_semantic.safetensors"))
                load_experts(sem)
            else:
                # a DCMWriteError (also an OSError) naming the output folder and the reason
                assert isinstance(err, DCMWriteError) and isinstance(err, OSError), repr(err)
                assert err.errno == errno.ENOSPC and "No space left" in str(err) and str(out) in str(err), repr(err)
                if previous:
                    assert _tree_digest(out) == old_digest, "the previous export was damaged by the failed one"
                else:
                    assert not out.exists(), f"a half-written export exists under the final name: {sorted(out.rglob('*'))}"


def test_export_cli_on_a_full_disk_says_so(ref, tmp_path, capsys):
    """A full disk during ``python -m dcm_core export`` is a DCMWriteError (also an OSError) naming the output
    folder: an ``error:`` line and exit code 2, no traceback, nothing left on the volume."""
    from dcm_core import cli

    with R.case(CAT_DISK, "python -m dcm_core export on a full disk: error line, no traceback"):
        vol = tmp_path / "vol"
        cm = _tmpfs(vol, 64 * 1024) if MOUNT else contextlib.nullcontext(vol.mkdir())
        fault = contextlib.nullcontext() if MOUNT else _enospc_after(64 * 1024)
        with cm, fault:
            try:
                code = cli.main(["export", str(ref["run"]), "--out", str(vol / "export")])
            finally:
                left = sorted(os.listdir(vol))
        err = capsys.readouterr().err
        assert left == [], left
        assert code == 2 and err.startswith("error: ") and "No space left" in err, err
        assert "Traceback" not in err and str(vol / "export") in err, err
