"""Trainer child process for the kill tests: ``python rel_train_child.py KILL_SPEC -- train ARGS...``.

Runs ``python -m dcm_core train ARGS`` in this process and SIGKILLs itself at a precise point of the
checkpoint machinery (a real SIGKILL: no ``finally`` runs, no atexit, no flush). ``KILL_SPEC``:

* ``none``                — no self-kill (the parent may SIGKILL at a random time instead);
* ``files:N``             — right after the N-th checkpoint file (safetensors or JSON) is written,
                            i.e. inside a checkpoint write, with the ``.tmp-checkpoint-…`` folder half full;
* ``manifest:N``          — after the N-th checkpoint's MANIFEST.json is written and synced, before
                            the folder is renamed into place;
* ``published:N``         — right after the N-th checkpoint folder was renamed into place (before rotation);
* ``step:N``              — at the start of optimisation step N (between checkpoints);
* ``rotate:N``            — in the N-th deletion of an old checkpoint by rotation, after its first file.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    from dcm_core.train import checkpoint as ck

    kind, _, n = spec.partition(":")
    if kind == "none":
        return
    target = int(n)
    count = {"files": 0, "fsync": 0}

    if kind == "files":
        for name in ("save_tensors", "save_json"):
            orig = getattr(ck, name)

            def wrapped(*a, __orig=orig, **k):
                r = __orig(*a, **k)
                count["files"] += 1
                if count["files"] == target:
                    _die()
                return r

            setattr(ck, name, wrapped)
    elif kind in ("manifest", "published"):
        # CheckpointWriter.commit syncs the temp folder after the manifest (1st call) and the root
        # after the rename (2nd call): calls 2N-1 / 2N of _fsync_dir belong to checkpoint N.
        orig = ck._fsync_dir
        want = 2 * target - 1 if kind == "manifest" else 2 * target

        def fsync(path, __orig=orig):
            __orig(path)
            count["fsync"] += 1
            if count["fsync"] == want:
                _die()

        ck._fsync_dir = fsync
    elif kind == "step":
        from dcm_core.train import trainer as tr

        orig = tr.DCMTrainer.train_step

        def step(self, __orig=orig):
            if self.global_step + 1 == target:
                _die()
            return __orig(self)

        tr.DCMTrainer.train_step = step
    elif kind == "rotate":
        import shutil

        orig = shutil.rmtree
        count["rotate"] = 0

        def rmtree(path, *a, __orig=orig, **k):
            if ck.CKPT_RE.match(Path(path).name):
                count["rotate"] += 1
                if count["rotate"] == target:
                    first = sorted(Path(path).iterdir())[0]
                    first.unlink()
                    _die()
            return __orig(path, *a, **k)

        shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown kill spec {spec!r}")


if __name__ == "__main__":
    spec, sep, *rest = sys.argv[1:]
    assert sep == "--", sys.argv
    arm(spec)
    from dcm_core.cli import main

    sys.exit(main(rest))
