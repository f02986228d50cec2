"""Trainer throughput: ``python -m dcm_core train`` in a subprocess, its RSS sampled from outside.

Each stage runs with the repo's config (``tiny_wan_<stage>.toml`` for the tiny model, ``wan_<stage>.toml``
— the official recipe: bf16 mixed precision, gradient checkpointing, LoRA r 128 / α 256, discriminator
heads on every 2nd block — with ``model.pretrained=tiny:wan`` at the 1.3B shape for the big one), batch 1
and a small random latent dataset. Steps/s comes from the trainer's own ``metrics.jsonl``
(``step_time_s``, the first step — warm-up — excluded when there are more), peak RSS from
``/proc/<pid>/status`` sampled every 50 ms (and the child's ``VmHWM``).

Not measured: validation sampling, checkpoint/exports (off; the trainer still saves its trainable state
once at the end, inside the measured wall time but outside ``step_time_s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import rss

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "dcm_core" / "train" / "configs"
TEXT_TOKENS = 8
SHAPE_1_3B = "{dim = 1536, num_layers = 30, ffn_dim = 8960}"


def make_dataset(root: Path, *, t: int, h: int, w: int, n: int = 2, seed: int = 0) -> Path:
    import torch

    from dcm_core.train.data import write_latent_dataset

    g = torch.Generator().manual_seed(seed)
    items = [
        dict(
            name=f"clip{i}",
            latent=torch.randn(16, t, h, w, generator=g) * 2.0,
            prompt_embed=torch.randn(TEXT_TOKENS, 4096, generator=g) * 0.5,
            prompt_attention_mask=torch.tensor([True] * (TEXT_TOKENS - 2) + [False] * 2),
            caption=f"caption {i}",
        )
        for i in range(n)
    ]
    uncond = (torch.randn(TEXT_TOKENS, 4096, generator=g) * 0.5, torch.tensor([True] + [False] * (TEXT_TOKENS - 1)))
    return write_latent_dataset(root, items, uncond=uncond)


def stage_command(model: str, stage: str, data: Path, out: Path, steps: int, *, teacher_checkpointing: bool = True) -> list[str]:
    common = [
        f"data.path={data}", f"output_dir={out}", f"max_train_steps={steps}", "checkpoint.every_steps=0",
        "validation.every_steps=0", "export.at_end=false", "logging.progress_bar=false", "data.batch_size=1",
        "data.num_workers=0",
    ]
    if model == "tiny":
        cfg = CONFIGS / f"tiny_wan_{stage}.toml"
        extra: list[str] = []
    else:
        cfg = CONFIGS / f"wan_{stage}.toml"
        extra = ["model.pretrained=tiny:wan", f"model.tiny_config={SHAPE_1_3B}", "model.semantic_expert="]
        if stage == "semantic":
            # the official full fine-tune needs ~28 GB (fp32 student + grads + AdamW + teacher): over this
            # machine's RAM, so the pack's memory-saving option (LoRA on the teacher) is measured instead
            extra.append("model.semantic_lora=true")
    # (teacher_checkpointing=False: the cost-of-teacher-checkpointing row, bench/train_variant.py)
    entry = ["-m", "dcm_core"] if teacher_checkpointing else [str(ROOT / "bench" / "train_variant.py"), "--teacher-not-checkpointed", "--"]
    return [sys.executable, *entry, "train", "--stage", stage, "--config", str(cfg), *common, *extra]


def run_stage(
    model: str, stage: str, data: Path, work: Path, *, steps: int, timeout: float, threads: int = 1, teacher_checkpointing: bool = True
) -> dict:
    out = work / f"run_{model}_{stage}{'' if teacher_checkpointing else '_teacher_not_ckpt'}"
    cmd = stage_command(model, stage, data, out, steps, teacher_checkpointing=teacher_checkpointing)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log_path = work / f"train_{model}_{stage}{'' if teacher_checkpointing else '_teacher_not_ckpt'}.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        timed_out = False
        hwm = 0
        with rss.Monitor(pid=p.pid, interval=0.05) as mon:
            while p.poll() is None:
                hwm = max(hwm, rss.read_status(p.pid)["hwm"])
                if time.perf_counter() - t0 > timeout:
                    timed_out = True
                    p.kill()
                    break
                time.sleep(0.1)
            p.wait()
            peak = mon.peak()
    wall = time.perf_counter() - t0
    metrics = []
    mfile = out / "metrics.jsonl"
    if mfile.exists():
        metrics = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
    times = [m["step_time_s"] for m in metrics if "step_time_s" in m]
    timed = times[1:] if len(times) > 1 else times
    res = {
        "model": model, "stage": stage, "teacher_checkpointing": teacher_checkpointing, "command": cmd[1:], "returncode": p.returncode, "timed_out": timed_out,
        "wall_s": wall, "steps_done": len(times), "step_times_s": times,
        "steps_per_s": (len(timed) / sum(timed)) if timed and sum(timed) > 0 else None,
        "peak_rss": max(peak["rss"], hwm), "peak_rss_anon": peak["anon"],
    }
    if p.returncode != 0 or not times:
        res["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return res
