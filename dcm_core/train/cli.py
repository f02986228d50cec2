"""``python -m dcm_core train``: run one DCM training stage (directly or under ``accelerate launch``).

Examples::

    python -m dcm_core train --stage semantic --config dcm_core/train/configs/wan_semantic.toml \\
        model.pretrained=/models/Wan2.1-T2V-1.3B-Diffusers data.path=/data/latents output_dir=runs/wan_sem
    accelerate launch --num_processes 8 -m dcm_core train --stage detail --config wan_detail.toml --resume latest
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..errors import DCMConfigError
from .config import STAGES, describe_fields, load_config


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train DCM experts (headless)",
        description=(
            "Train the DCM semantic expert (stage 1) or detail expert (stage 2). Settings come from --config (TOML or "
            "JSON, one table per section) and `section.key=value` overrides; --help-config lists every key with its "
            "official default."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage", choices=STAGES, default=None, help="training stage (overrides / must match `stage` in the file)")
    p.add_argument("--config", default=None, help="TOML or JSON config file (examples: dcm_core/train/configs/)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="continue from the newest valid checkpoint of output_dir (latest) or from a checkpoint folder",
    )
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    g = p.add_argument_group(
        "memory plan (no weights are loaded, nothing is trained)",
        "--plan prints the per-GPU memory of the config (weights, gradients, AdamW, EMA, teacher, FSDP buffers, "
        "activations with / without gradient checkpointing, discriminator, overhead) and whether it fits: a lower bound "
        "(7-23 % below measured CPU peaks). Parameters are counted on PyTorch's meta device, activations in small "
        "real-width probes; see dcm_core/train/plan.py and dcm_core/train/README.md.",
    )
    g.add_argument("--plan", action="store_true", help="print the memory plan and exit")
    g.add_argument("--num-gpus", type=int, default=1, metavar="N", help="processes (GPUs) of the planned run (default 1)")
    g.add_argument("--gpu-memory", type=float, default=None, metavar="GiB", help="memory per GPU, e.g. 80 or 141")
    g.add_argument(
        "--sharding", choices=("fsdp", "ddp"), default="fsdp", help="with --num-gpus > 1: FSDP2 (default) or DDP"
    )
    g.add_argument(
        "--video", default=None, metavar="F,H,W",
        help="clip size in pixels, e.g. 81,480,832 (default: the first sample of data.path)",
    )
    g.add_argument("--plan-device", choices=("cuda", "cpu"), default="cuda", help="overhead model: GPU (default) or CPU")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=2e-6 data.batch_size=2")
    p.set_defaults(_run=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe_fields())  # noqa: T201 (CLI output)
        return 0
    cfg = load_config(args.config, args.overrides, stage=args.stage)
    if args.plan:
        from .plan import make_plan

        video = tuple(int(v) for v in args.video.split(",")) if args.video else None
        if video is not None and len(video) != 3:
            raise DCMConfigError(f"--video {args.video!r}: give FRAMES,HEIGHT,WIDTH, e.g. 81,480,832.")
        plan = make_plan(
            cfg, num_gpus=args.num_gpus, gpu_memory_gb=args.gpu_memory, fsdp=args.sharding == "fsdp", video=video,
            device=args.plan_device,
        )
        print(plan.render())  # noqa: T201 (CLI output)
        return 0
    log = logging.getLogger("DCM")
    if log.getEffectiveLevel() > logging.INFO:
        # training progress is worth seeing even without -v
        logging.getLogger("DCM.train").setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .trainer import train

    result = train(cfg, resume=args.resume)
    if result.exported:
        for what, path in result.exported.items():
            print(f"{what}: {path}")  # noqa: T201 (CLI output)
    return 0
