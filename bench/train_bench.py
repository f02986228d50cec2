"""Trainer throughput / memory benchmark (not a test): steps/s and peak memory of one DCM stage.

    python bench/train_bench.py --shape tiny --stage semantic --steps 20
    python bench/train_bench.py --shape wan1.3b --stage detail --steps 5 --device cuda --bf16 --latent 1,16,21,60,104

Builds a random transformer of the requested shape (dcm_core.tiny), a synthetic latent
dataset in a temp folder, runs ``--steps`` optimiser steps and prints one JSON line:
steps/s after the first (warm-up) step, peak process RSS, peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": {"wan": "{dim = 128, num_layers = 2, ffn_dim = 256}", "hunyuan_video": "{hidden = 128}"},
    "wan1.3b": {"wan": "{dim = 1536, num_layers = 30, ffn_dim = 8960}"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--family", choices=("wan", "hunyuan_video"), default="wan")
    ap.add_argument("--stage", choices=("semantic", "detail"), default="semantic")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--latent", default="1,16,5,8,8", help="B,C,T,H,W of the synthetic latents")
    ap.add_argument("--text-tokens", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="mixed_precision=bf16 (+ bf16 teacher)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    ap.add_argument("--semantic-lora", action="store_true", help="semantic stage: LoRA instead of full fine-tune")
    ap.add_argument("--disc-channels", type=int, default=64, help="discriminator width (official 1024)")
    ap.add_argument("--lora-rank", type=int, default=4, help="detail LoRA rank (official 128)")
    ap.add_argument("--teacher-not-checkpointed", action="store_true",
                    help="with --checkpointing: checkpoint the student only (the cost of teacher checkpointing)")
    ap.add_argument("--detail-base-bf16", action="store_true", help="model.detail_base_dtype=bf16 (needs --bf16)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.family not in SHAPES[args.shape]:
        ap.error(f"--shape {args.shape} has no {args.family} variant")
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"

    from dcm_core.train.config import load_config
    from dcm_core.train.data import write_latent_dataset
    from dcm_core.train.trainer import DCMTrainer

    b, c, t, h, w = (int(x) for x in args.latent.split(","))
    extra = 1 if args.family == "hunyuan_video" else 0
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        items = [
            dict(
                name=f"s{i}",
                latent=torch.randn(c, t, h, w, generator=g),
                prompt_embed=torch.randn(args.text_tokens + extra, 4096, generator=g) * 0.5,
                prompt_attention_mask=torch.ones(args.text_tokens, dtype=torch.bool),
            )
            for i in range(max(2, b * 2))
        ]
        uncond = (torch.zeros(args.text_tokens + extra, 4096), torch.zeros(args.text_tokens, dtype=torch.bool))
        data = write_latent_dataset(Path(tmp) / "data", items, uncond=uncond)
        ov = [
            f"model.pretrained=tiny:{args.family}",
            f"model.tiny_config={SHAPES[args.shape][args.family]}",
            f"data.path={data}",
            f"data.batch_size={b}",
            f"output_dir={Path(tmp) / 'run'}",
            f"max_train_steps={args.steps}",
            "checkpoint.every_steps=0",
            "export.at_end=false",
            "logging.progress_bar=false",
            f"disc.inner_channels={args.disc_channels}",
            f"model.lora_rank={args.lora_rank}",
            f"model.lora_alpha={2 * args.lora_rank}",
            f"mixed_precision={'bf16' if args.bf16 else 'no'}",
            f"model.gradient_checkpointing={'true' if args.checkpointing else 'false'}",
            f"model.semantic_lora={'true' if args.semantic_lora else 'false'}",
            f"model.detail_base_dtype={'bf16' if args.detail_base_bf16 else 'fp32'}",
        ]
        cfg = load_config(None, ov, stage=args.stage)
        t0 = time.perf_counter()
        tr = DCMTrainer(cfg)
        setup_s = time.perf_counter() - t0
        if args.teacher_not_checkpointed and tr.models.teacher is not None:
            tr.models.teacher.disable_gradient_checkpointing()  # the trainer before teacher checkpointing
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        res = tr.train()
        times = [r["step_time_s"] for r in res.history]
        steady = times[1:] or times
        out = {
            "shape": args.shape,
            "family": args.family,
            "stage": args.stage,
            "device": str(tr.accelerator.device),
            "bf16": args.bf16,
            "latent": [b, c, t, h, w],
            "trainable_params": sum(p.numel() for _, p in tr.trainable),
            "setup_s": round(setup_s, 2),
            "first_step_s": round(times[0], 4),
            "steps_per_s": round(len(steady) / sum(steady), 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
            "peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if torch.cuda.is_available() else None,
            "peak_cuda_reserved_gb": round(torch.cuda.max_memory_reserved() / 1024**3, 2) if torch.cuda.is_available() else None,
            "teacher_checkpointed": bool(tr.models.teacher is not None and tr.models.teacher.gradient_checkpointing),
            "text_tokens": args.text_tokens,
            "final_loss": res.history[-1]["loss"],
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
