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
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=2e-6 data.batch_size=2")
    p.set_defaults(_run=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe_fields())  # noqa: T201 (CLI output)
        return 0
    cfg = load_config(args.config, args.overrides, stage=args.stage)
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
