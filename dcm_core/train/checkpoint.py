"""Training checkpoints without pickle: safetensors tensors + JSON, atomic, verified.

A checkpoint is a folder ``checkpoints/checkpoint-00000100/``::

    trainable.safetensors        trainable student parameters (fp32 masters), by parameter name
    ema.safetensors              EMA shadow weights (optim.use_ema)
    discriminator.safetensors    discriminator parameters (detail stage)
    optimizer.safetensors/.json  AdamW state tensors / param groups + scalars (also disc_optimizer.*)
    scheduler.json               LR scheduler state
    rng-rank{r}.safetensors/.json   torch / CUDA / numpy / python / trainer-generator states of process r
    trainer_state.json           step, data position, world size, config
    MANIFEST.json                sha256 of every file above — written LAST

Under FSDP2 the trainable weights, EMA and optimizer moments are not gathered: every process writes
its own rows through ``torch.distributed.checkpoint`` (DCP) with its safetensors storage
(``HuggingFaceStorageWriter(save_distributed=True)``: one ``sharded/shard-0000{r+1}-….safetensors``
per process, the row offsets of each tensor in the file's header — no pickle, no ``.metadata`` file)::

    sharded/shard-*.safetensors  ``trainable.<name>``, ``ema.<name>``, ``optimizer.<name>.<state>``
    optimizer.json               param groups + scalars, and ``param_names`` (position → name)

instead of ``trainable`` / ``ema`` / ``optimizer.safetensors``. The shards are read back by any
number of processes (DCP reshards: 2 → 1, 1 → 2, …) and by ``export`` (straight into the rebuilt
model's parameters). The manifest covers the shard files too; each process hashes its share of them.

Writes go to ``.tmp-checkpoint-…`` and the folder is renamed into place only after the
manifest is fsync'ed, so a run killed at any moment leaves either a complete checkpoint or
none. :func:`find_latest_valid` re-hashes the files and skips (with a warning) a newest
checkpoint that is incomplete or corrupted. ``torch.save`` / ``torch.load`` (pickle) are never used.

Hidden folders beside the checkpoints (never listed as checkpoints):

* ``.tmp-checkpoint-…``   a write in progress (or killed): removed when the run resumes;
* ``.trash/checkpoint-…`` an old checkpoint being deleted by :func:`rotate` — it is renamed there
  atomically first, so a kill in the middle of the deletion never leaves a half-deleted folder under
  a published name; leftovers are removed on resume and by the next rotation;
* ``.old-checkpoint-…``   a checkpoint being replaced by a re-written one of the same step (same idea);
* ``.broken-checkpoint-…`` a damaged checkpoint newer than the one a run resumed from, moved aside so
  that "latest" and rotation never pick it again. Only the newest one is kept (for a post-mortem of
  what damaged it); older ones are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import DCMCheckpointError

log = logging.getLogger("DCM.train")

MANIFEST = "MANIFEST.json"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
BROKEN_RE = re.compile(r"^\.broken-checkpoint-(\d+)$")
TRASH = ".trash"
FORMAT_VERSION = 1
#: sub-folder of a checkpoint holding the DCP shards of an FSDP2 run
SHARDED_DIR = "sharded"
#: how many damaged checkpoints moved aside on resume are kept (the newest), for a post-mortem
KEEP_BROKEN = 1


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


# ---------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    _sync_dir(path)


def _sync_dir(path: Path) -> None:
    """fsync a folder (its entries: renames, creations). Best effort."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors write + fsync (contiguous CPU copies; empty dicts allowed)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata=metadata)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- optimizer / scheduler / RNG


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` → (tensors, JSON). Tensors keyed ``state.<param id>.<name>``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = []
    for g in state["param_groups"]:
        gg = {}
        for k, v in g.items():
            gg[k] = list(v) if isinstance(v, tuple) else v
        groups.append(gg)
    return tensors, {"param_groups": groups, "scalars": scalars, "tuple_keys": ["betas"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    groups = []
    for g in meta["param_groups"]:
        gg = dict(g)
        for k in meta.get("tuple_keys", []):
            if k in gg and isinstance(gg[k], list):
                gg[k] = tuple(gg[k])
        groups.append(gg)
    return {"state": state, "param_groups": groups}


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    sd = scheduler.state_dict()
    out = {}
    for k, v in sd.items():
        try:
            json.dumps(v)
        except TypeError:
            raise DCMCheckpointError(f"LR scheduler state field {k!r} is not JSON-serialisable ({type(v).__name__}).") from None
        out[k] = v
    return out


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG this process uses: torch CPU/CUDA, numpy, python ``random`` and named generators."""
    tensors: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    for name, g in generators.items():
        tensors[f"gen.{name}"] = g.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    for name, g in generators.items():
        key = f"gen.{name}"
        if key not in tensors:
            raise DCMCheckpointError(f"checkpoint RNG state lacks generator {name!r}.")
        g.set_state(tensors[key])
    n = meta["numpy"]
    keys = tensors["numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))


# ---------------------------------------------------------------------------- writing


class CheckpointWriter:
    """Collects the files of one checkpoint in a temp folder, then publishes it atomically.

    Multi-process use: every process calls :meth:`begin` (after a barrier the main process
    created the folder), writes its own files, then a barrier, then the main process calls
    :meth:`commit`.
    """

    def __init__(self, root: Path, step: int) -> None:
        self.root = Path(root)
        self.step = step
        self.final = self.root / checkpoint_name(step)
        self.tmp = self.root / f".tmp-{checkpoint_name(step)}"
        #: manifest entries already computed (the shard files, hashed by the processes that share them)
        self.hashed: dict[str, dict[str, Any]] = {}

    def prepare(self) -> None:
        """Main process: a fresh temp folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_tensors(self.tmp / name, tensors, metadata={"format": "pt", "dcm_checkpoint": str(FORMAT_VERSION)})

    def json(self, name: str, obj: Any) -> None:
        save_json(self.tmp / name, obj)

    def sharded(self, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """EVERY process: write this process's rows of ``tensors`` (DTensors and plain tensors) into
        ``sharded/`` through DCP, then hash a share of the shard files; returns the manifest entries of all
        of them (the same on every process)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        folder = self.tmp / SHARDED_DIR
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
        # dcp.save returns after its final collective: every shard file is complete (and fsync'ed)
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        world, rank = dist.get_world_size(), dist.get_rank()
        mine = {
            f"{SHARDED_DIR}/{n}": {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
            for i, n in enumerate(files)
            if i % world == rank
        }
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        entries = {k: v for part in parts for k, v in part.items()}
        self.hashed.update(entries)
        _fsync_dir(folder)
        return entries

    def commit(self) -> Path:
        """Main process: hash every file (the shards' hashes come from :meth:`sharded`), write the manifest
        last, fsync, rename into place."""
        files = sorted(
            p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file() and p.name != MANIFEST
        )
        entries = {}
        for name in files:
            known = self.hashed.get(name)
            size = (self.tmp / name).stat().st_size
            if known is None or known["bytes"] != size:
                known = {"sha256": sha256_file(self.tmp / name), "bytes": size}
            entries[name] = known
        manifest = {"format_version": FORMAT_VERSION, "step": self.step, "files": entries}
        save_json(self.tmp / MANIFEST, manifest)
        _fsync_dir(self.tmp)
        if self.final.exists():
            trash = self.root / f".old-{checkpoint_name(self.step)}-{os.getpid()}"
            os.replace(self.final, trash)
            os.replace(self.tmp, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        _fsync_dir(self.root)
        return self.final


# ---------------------------------------------------------------------------- reading


def verify_checkpoint(path: Path) -> str | None:
    """None when complete and intact, else the reason it is not."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        return "no MANIFEST.json (the write did not finish)"
    try:
        # ValueError covers a non-UTF-8 byte (UnicodeDecodeError) and bad JSON (JSONDecodeError)
        manifest = load_json(mf)
    except (OSError, ValueError) as e:
        return f"MANIFEST.json is unreadable ({e})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return "MANIFEST.json is unreadable (no 'files' table of {name: {sha256, bytes}})"
    if "trainer_state.json" not in files:
        return "trainer_state.json is not listed in the manifest"
    if "trainable.safetensors" not in files and not any(_is_shard_name(n) for n in files):
        return f"trainable.safetensors (or {SHARDED_DIR}/*.safetensors) is not listed in the manifest"
    for name, info in files.items():
        f = path / name
        if not name or not (Path(name).name == name or _is_shard_name(name)):
            return f"the manifest lists {name!r}, which is not a file of this folder"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {info.get('bytes')}"
        if sha256_file(f) != info.get("sha256"):
            return f"{name} does not match its sha256 (corrupted)"
    return None


def _is_shard_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and parts[0] == SHARDED_DIR and parts[1] not in ("", ".", "..") and parts[1].endswith(".safetensors")


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint folder holds DCP shards (an FSDP2 run) rather than ``trainable.safetensors``."""
    return (Path(path) / SHARDED_DIR).is_dir()


def _shard_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(Path(path) / SHARDED_DIR))


def sharded_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of every tensor of a sharded checkpoint (read from the shards' headers)."""
    md = _shard_reader(path).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()}


def load_sharded(path: Path, targets: dict[str, torch.Tensor], *, this_process_only: bool) -> None:
    """Read a sharded checkpoint INTO ``targets`` (``{key: tensor}``, in place): plain tensors get the whole
    tensor, FSDP2 DTensors this process's rows only. ``this_process_only``: no collective (every process reads on
    its own: one process, DDP, export); otherwise every process of the group must call it.

    Refuses (naming the checkpoint) a key the checkpoint lacks or a shape that differs."""
    import torch.distributed.checkpoint as dcp

    shapes = sharded_shapes(path)
    missing = [k for k in targets if k not in shapes]
    wrong = [f"{k} {tuple(shapes[k][0])} vs {tuple(t.shape)}" for k, t in targets.items() if k in shapes and tuple(shapes[k][0]) != tuple(t.shape)]
    if missing or wrong:
        raise DCMCheckpointError(
            f"checkpoint {path} does not fit this run: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:3]}); the config changed the trainable set."
        )
    dcp.load(targets, storage_reader=_shard_reader(path), no_dist=this_process_only)


def read_sharded(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint whose key starts with ``prefix``, whole (this process alone)."""
    targets = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in sharded_shapes(path).items() if k.startswith(prefix)}
    load_sharded(path, targets, this_process_only=True)
    return targets


def sharded_as_files(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A sharded checkpoint's tensors, whole, in the layout of the unsharded files: ``trainable.safetensors``
    / ``ema.safetensors`` ``{name: tensor}`` and ``optimizer.safetensors`` ``{"state.<position>.<state>": tensor}``
    (positions from ``optimizer.json``'s ``param_names``). Materialises everything in this process: for a
    resume without FSDP and for tests."""
    meta = load_json(Path(path) / "optimizer.json")
    position = {n: i for i, n in enumerate(meta.get("param_names", []))}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_sharded(path).items():
        kind, _, rest = key.partition(".")
        if kind == "optimizer":
            name, _, state = rest.rpartition(".")
            if name not in position:
                raise DCMCheckpointError(f"checkpoint {path}: optimizer tensor {key} has no position in optimizer.json.")
            out.setdefault("optimizer.safetensors", {})[f"state.{position[name]}.{state}"] = t
        else:
            out.setdefault(f"{kind}.safetensors", {})[rest] = t
    return out


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every published checkpoint folder, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def find_latest_valid(root: Path, *, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; broken newer ones are reported."""
    warn = warn or log.warning
    for step, path in list_checkpoints(root):
        why = verify_checkpoint(path)
        if why is None:
            return path
        warn(f"skipping checkpoint {path.name}: {why}. Falling back to an older checkpoint.")
    return None


def resolve_resume(resume: str, root: Path) -> Path:
    """``latest`` → newest valid checkpoint under ``root``; a path → that checkpoint (verified)."""
    if resume == "latest":
        found = find_latest_valid(root)
        if found is None:
            raise DCMCheckpointError(
                f"--resume latest: no complete checkpoint under {root}. Start without --resume, or point --resume at "
                f"a checkpoint folder."
            )
        return found
    p = Path(resume)
    if not p.is_dir():
        raise DCMCheckpointError(f"--resume {resume}: not a checkpoint folder.")
    why = verify_checkpoint(p)
    if why is not None:
        raise DCMCheckpointError(f"--resume {resume}: the checkpoint is not usable: {why}.")
    return p


def _discard(root: Path, path: Path) -> None:
    """Delete a checkpoint folder without ever leaving it half-deleted under its published name:
    rename it into ``root/.trash/`` (atomic, same file system), make the rename durable, then delete."""
    trash = root / TRASH
    trash.mkdir(exist_ok=True)
    dest = trash / path.name
    if dest.exists():  # a leftover of an earlier, interrupted deletion
        shutil.rmtree(dest, ignore_errors=True)
    os.replace(path, dest)
    _sync_dir(root)
    shutil.rmtree(dest, ignore_errors=True)


def _remove_trash(root: Path) -> None:
    """Leftovers of interrupted deletions / replacements (never checkpoints anyone can resume from)."""
    trash = root / TRASH
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    for p in root.glob(".old-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


def rotate(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all), and leftovers of earlier deletions.

    Each old checkpoint is first renamed into ``.trash/`` and deleted there, so a kill at any moment
    leaves every ``checkpoint-*`` folder complete (or gone)."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    _remove_trash(root)
    if keep > 0:
        for _, path in list_checkpoints(root)[keep:]:
            _discard(root, path)
            removed.append(path)
    trash = root / TRASH
    with contextlib.suppress(OSError):
        trash.rmdir()
    return removed


def set_aside_broken(root: Path, path: Path) -> Path:
    """Move a damaged checkpoint out of the published names to ``.broken-checkpoint-…`` (see module doc)."""
    root = Path(root)
    broken = root / f".broken-{Path(path).name}"
    if broken.exists():
        shutil.rmtree(broken, ignore_errors=True)
    os.replace(path, broken)
    return broken


def prune_broken(root: Path, keep: int = KEEP_BROKEN) -> list[Path]:
    """Keep only the newest ``keep`` ``.broken-checkpoint-…`` folders (by step); returns the removed ones."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := BROKEN_RE.match(p.name)) and p.is_dir()), reverse=True)
    removed = []
    for _, p in found[keep:]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def clean_for_resume(root: Path) -> list[str]:
    """Before a resume (main process, nothing else writing): remove what interrupted writes, deletions
    and replacements left behind — ``.tmp-checkpoint-*``, ``.trash/``, ``.old-checkpoint-*`` — and all
    but the newest ``.broken-checkpoint-*``. Published checkpoints are not touched. Returns the names."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = [p.name for p in root.iterdir() if p.name == TRASH or p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-"))]
    for p in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    _remove_trash(root)
    gone += [p.name for p in prune_broken(root)]
    return sorted(gone)
