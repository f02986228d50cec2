"""Entry point of the model-construction test: ``fsdp_build_child.py OUT_DIR -- train ARGS...``.

Runs ``python -m dcm_core train ARGS`` (one copy per process under ``accelerate launch``), records per
process into ``OUT_DIR/rank{r}.json`` the bytes of MATERIALISED tensors (not on the ``meta`` device) of
the models right after :meth:`FSDP2.build_models`, and this process's bytes of the student and teacher
once the trainer is set up (the local rows of sharded tensors), then stops without training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def _bytes(module) -> dict[str, int]:
    from torch.distributed.tensor import DTensor

    out = {"materialised": 0, "meta": 0}
    for t in list(module.parameters()) + list(module.buffers()):
        local = t.to_local() if isinstance(t, DTensor) else t
        out["meta" if local.is_meta else "materialised"] += local.numel() * local.element_size()
    return out


if __name__ == "__main__":
    out_dir, *rest = sys.argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    from dcm_core.train import parallel
    from dcm_core.train.trainer import DCMTrainer, TrainResult

    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, object] = {}
    build = parallel.FSDP2.build_models

    def build_models(self, cfg):
        models = build(self, cfg)
        record["built"] = {"student": _bytes(models.student), "teacher": _bytes(models.teacher) if models.teacher else None}
        return models

    def stop(self):
        record["set_up"] = {"student": _bytes(self.student_unwrapped), "teacher": _bytes(self.models.teacher)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        self.accelerator.end_training()
        return TrainResult(self.run_dir, self.global_step)

    parallel.FSDP2.build_models = build_models
    DCMTrainer.train = stop
    from dcm_core.cli import main

    sys.exit(main(rest))
