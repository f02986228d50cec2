"""Trainer entry point for the kill-and-resume test: ``hang_child.py STEP -- train ARGS...``.

Runs ``python -m dcm_core train ARGS`` and, right after checkpoint STEP is published (and rotated),
sleeps forever, so the test can SIGKILL the run at a known point. The hook lives here, not in the
trainer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def arm(step: int) -> None:
    from dcm_core.train.trainer import DCMTrainer

    orig = DCMTrainer.save_checkpoint

    def save_checkpoint(self, *a, **kw):
        out = orig(self, *a, **kw)
        if self.global_step == step:
            sys.stderr.flush()
            while True:
                time.sleep(3600)
        return out

    DCMTrainer.save_checkpoint = save_checkpoint


if __name__ == "__main__":
    spec, sep, *rest = sys.argv[1:]
    assert sep == "--", sys.argv
    arm(int(spec))
    from dcm_core.cli import main

    sys.exit(main(rest))
