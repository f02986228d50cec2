"""``python bench/train_variant.py --teacher-not-checkpointed -- train ARGS``: ``python -m dcm_core train`` with
the frozen teacher NOT gradient-checkpointed while the student is (the trainer before teacher checkpointing).
For the bench's "cost of teacher checkpointing" row only; the product has no such switch (the official
recipe checkpoints both)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    flag, *rest = argv
    if flag != "--teacher-not-checkpointed":
        raise SystemExit(f"usage: train_variant.py --teacher-not-checkpointed -- train ARGS (got {flag!r})")
    if rest[:1] == ["--"]:
        rest = rest[1:]
    from dcm_core.train.models import StageModels

    def student_only(self) -> None:
        self.student.enable_gradient_checkpointing()

    StageModels.enable_gradient_checkpointing = student_only
    from dcm_core.cli import main as cli

    return cli(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
