"""Trainer entry point for the FSDP kill test: ``fsdp_kill_child.py STEP:K -- train ARGS...``.

Runs ``python -m dcm_core train ARGS`` (started by ``accelerate launch``, one copy per process).
Process 0 SIGKILLs itself right after writing the K-th file of checkpoint STEP into the
checkpoint's temp folder — a kill in the middle of a checkpoint write (no ``finally``, no flush).
The launcher then stops the other process. ``none`` disarms it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def arm(spec: str) -> None:
    if spec == "none" or os.environ.get("RANK", "0") != "0":
        return
    from dcm_core.train import checkpoint as ck

    step_s, _, k_s = spec.partition(":")
    step, k = int(step_s), int(k_s)
    written = {"n": 0}

    def wrap(name: str) -> None:
        orig = getattr(ck.CheckpointWriter, name)

        def method(self, *a, __orig=orig, **kw):
            out = __orig(self, *a, **kw)
            if self.step == step:
                written["n"] += 1
                if written["n"] == k:
                    print(f"fsdp_kill_child: SIGKILL of process 0 after file {k} ({a[0] if a else ''}) of checkpoint {step}",
                          file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        setattr(ck.CheckpointWriter, name, method)

    wrap("tensors")
    wrap("json")


if __name__ == "__main__":
    spec, sep, *rest = sys.argv[1:]
    assert sep == "--", sys.argv
    arm(spec)
    from dcm_core.cli import main

    sys.exit(main(rest))
