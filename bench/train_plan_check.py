"""Check ``python -m dcm_core train --plan`` against the peak RSS of real CPU runs (not a test: minutes of CPU).

    OMP_NUM_THREADS=1 python bench/train_plan_check.py [--shapes tiny,mid] [--steps 2]

For every shape and stage: write a small random latent dataset, print the plan of the run
(``--plan --plan-device cpu``, no weights loaded), then run the same config for ``--steps`` steps in
a subprocess and read its peak resident set (``VmHWM``). One JSON line per run with both numbers and
their ratio. Shapes: ``tiny`` (dim 128, 2 blocks, 16x5x8x8 latents — the runtime dominates),
``mid`` (Wan-1.3B width: dim 1536, ffn 8960, 2 blocks, 16x5x24x40 latents = 1,200 tokens, the
official 512 text tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": ("{dim = 128, num_layers = 2, ffn_dim = 256}", (16, 5, 8, 8), 8),
    "mid": ("{dim = 1536, num_layers = 2, ffn_dim = 8960}", (16, 5, 24, 40), 512),
}
RUNS = [
    ("semantic", []),
    ("semantic", ["model.gradient_checkpointing=true"]),
    ("detail", ["model.gradient_checkpointing=true"]),
    ("detail", []),
]


def _dataset(root: Path, latent: tuple[int, ...], text: int) -> Path:
    import torch

    from dcm_core.train.data import write_latent_dataset

    g = torch.Generator().manual_seed(0)
    items = [
        dict(name=f"clip{i}", latent=torch.randn(*latent, generator=g), prompt_embed=torch.randn(text, 4096, generator=g) * 0.5,
             prompt_attention_mask=torch.ones(text, dtype=torch.bool), caption=f"c{i}")
        for i in range(2)
    ]
    return write_latent_dataset(root, items, uncond=(torch.zeros(text, 4096), torch.zeros(text, dtype=torch.bool)))


def _peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return peak, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,mid")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            tiny, latent, text = SHAPES[shape]
            data = _dataset(Path(tmp) / f"data_{shape}", latent, text)
            for i, (stage, extra) in enumerate(RUNS):
                out = Path(tmp) / f"run_{shape}_{stage}_{i}"
                ov = [
                    "model.pretrained=tiny:wan", f"model.tiny_config={tiny}", f"data.path={data}", f"output_dir={out}",
                    f"max_train_steps={args.steps}", "checkpoint.every_steps=0", "export.at_end=false",
                    "logging.progress_bar=false", "model.lora_rank=128", "model.lora_alpha=256", *extra,
                ]
                base = [sys.executable, "-m", "dcm_core", "train", "--stage", stage, *ov]
                plan = subprocess.run(base + ["--plan", "--plan-device", "cpu"], cwd=ROOT, env=env, capture_output=True,
                                      text=True, check=True).stdout
                total = next(float(line.split()[1]) for line in plan.splitlines() if line.strip().startswith("total"))
                peak, wall = _peak_rss(base, env)
                print(json.dumps({
                    "shape": shape, "stage": stage, "overrides": extra, "plan_gib": total,
                    "measured_peak_rss_gib": round(peak / 2**30, 3), "plan_over_measured": round(total * 2**30 / peak, 3),
                    "wall_s": round(wall, 1),
                }), flush=True)
                if os.environ.get("DCM_PLAN_CHECK_VERBOSE"):
                    print(plan, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
