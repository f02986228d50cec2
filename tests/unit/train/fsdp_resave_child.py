"""Entry point of the resharding tests: ``fsdp_resave_child.py [--] train ARGS... --resume CKPT``.

Runs ``python -m dcm_core train ARGS`` (one copy per process under ``accelerate launch``) with
``DCMTrainer.train`` replaced by "write a checkpoint of the state just resumed, then stop": the
checkpoint a run with another process count reads back is written again by this one, so a test can
compare the two tensor for tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def resave(self):
    from dcm_core.train.trainer import TrainResult

    self.save_checkpoint()
    self.accelerator.end_training()
    return TrainResult(self.run_dir, self.global_step)


if __name__ == "__main__":
    rest = sys.argv[1:]
    if rest[:1] == ["--"]:  # (accelerate launch drops a "--" right after the script)
        rest = rest[1:]
    from dcm_core.train.trainer import DCMTrainer

    DCMTrainer.train = resave
    from dcm_core.cli import main

    sys.exit(main(rest))
