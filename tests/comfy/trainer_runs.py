"""One in-process trainer run for the comfy-tier tests that train tiny experts and load the export in ComfyUI."""

from __future__ import annotations

from pathlib import Path


def train_in_process(stage: str, overrides: list[str], config: Path | None = None):
    """``DCMTrainer(load_config(config, overrides, stage=stage)).train()`` → (trainer, result).

    accelerate keeps a process-wide singleton; it is reset afterwards so the next run in this process starts clean.
    """
    from accelerate.state import AcceleratorState, GradientState

    from dcm_core.train.config import load_config
    from dcm_core.train.trainer import DCMTrainer

    try:
        tr = DCMTrainer(load_config(config, overrides, stage=stage))
        res = tr.train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return tr, res
