"""The README's memory table: ``--plan`` of the shipped recipes at the official model shapes (no weights needed).

    OMP_NUM_THREADS=1 python bench/train_plan_table.py [--num-gpus 8] [--sequence-parallel S] [--only wan]

Random-shape stand-ins (``tiny:`` with the real widths / depths) give the same parameter counts and
activation sizes as the released models; the shipped configs give everything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: what nvidia-smi reports as total memory, GiB: H100 80 GB = 81,559 MiB, H200 141 GB = 143,771 MiB
H100, H200 = 81559 / 1024, 143771 / 1024

CASES = [
    # (model, shipped config prefix, tiny family, tiny config, video F,H,W per stage)
    ("Wan2.1-T2V-1.3B", "wan", "wan", "{dim = 1536, num_layers = 30, ffn_dim = 8960}", "480p", (81, 480, 832), (81, 480, 832)),
    ("Wan2.1-T2V-14B", "wan", "wan", "{dim = 5120, num_layers = 40, ffn_dim = 13824}", "480p", (81, 480, 832), (81, 480, 832)),
    ("Wan2.1-T2V-14B", "wan", "wan", "{dim = 5120, num_layers = 40, ffn_dim = 13824}", "720p", (81, 720, 1280), (81, 720, 1280)),
    ("HunyuanVideo", "hunyuan", "hunyuan_video", "{hidden = 3072, num_layers = 20, num_single_layers = 40}", "720p",
     (125, 720, 1280), (61, 720, 1280)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-gpus", type=int, default=8)
    ap.add_argument("--skip", type=int, default=0, help="skip the first SKIP rows (resume an interrupted table)")
    ap.add_argument("--sequence-parallel", type=int, default=1, metavar="S", help="parallel.sequence_parallel (Wan only)")
    ap.add_argument("--only", default="", help="rows whose model name contains this text (e.g. 14B)")
    args = ap.parse_args()
    from dcm_core.train.config import load_config
    from dcm_core.train.plan import GiB, make_plan

    n, sp = args.num_gpus, args.sequence_parallel
    how = f"{n} GPUs FSDP2" + (f" + SP {sp}" if sp > 1 else "")
    print(f"| model | clip | stage | tokens | per GPU, {how} | of which activations | 8×80 GB | 8×141 GB "
          f"| with parallel.shard_teacher | 8×80 GB | 8×141 GB |")
    print("|---|---|---|---:|---:|---:|:---:|:---:|---:|:---:|:---:|")
    row = 0
    for model, prefix, fam, tiny, res, sem_video, det_video in CASES:
        if (sp > 1 and fam != "wan") or args.only not in model:
            continue
        for stage, video in (("semantic", sem_video), ("detail", det_video)):
            row += 1
            if row <= args.skip:
                continue
            cfg = load_config(str(ROOT / "dcm_core" / "train" / "configs" / f"{prefix}_{stage}.toml"),
                              [f"model.pretrained=tiny:{fam}", f"model.tiny_config={tiny}",
                               f"parallel.sequence_parallel={sp}"], stage=stage)
            plan = make_plan(cfg, num_gpus=n, video=video)
            act = sum(b for name, b, _ in plan.items if "activations" in name or "features" in name)
            tokens = plan.title.split(" = ")[1].split(" tokens")[0]
            total = plan.total / GiB
            cfg.parallel.shard_teacher = True  # (the activation probes are cached: the second plan is cheap)
            st = make_plan(cfg, num_gpus=n, video=video).total / GiB
            yes = lambda t, cap: "yes" if t <= cap else "no"  # noqa: E731
            print(f"| {model} | {res} {video[0]}f | {stage} | {tokens} | {total:.0f} GiB | {act / GiB:.0f} GiB | "
                  f"{yes(total, H100)} | {yes(total, H200)} | {st:.0f} GiB | {yes(st, H100)} | {yes(st, H200)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
