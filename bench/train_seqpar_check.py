"""GPU check of sequence parallelism (``parallel.sequence_parallel``): 2 GPUs against 1, both stages.

Runs ``python -m dcm_core train`` once on one GPU and once under ``accelerate launch --multi_gpu
--num_processes N`` with ``parallel.sequence_parallel=N`` (diffusers' Ulysses context parallelism over NCCL,
the library path exactly as a user runs it), on a random-weight Wan transformer and a random latent dataset,
then compares the per-step losses and gradient norms and the trainable / discriminator weights of the last
checkpoint. Prints one JSON line per stage; exits 1 when a difference exceeds the tolerance.

    .venv/bin/python bench/train_seqpar_check.py                       # fp32, tiny (2 heads), ~1 min
    .venv/bin/python bench/train_seqpar_check.py --dim 1536 --layers 30 --ffn 8960 --latent 21,60,104 \\
        --bf16 --checkpointing --steps 2 --rel-tol 0.05 --w-tol 1e-3   # Wan-1.3B shape, 480x832x81: peak memory

The fp32 tolerance is the CPU test's (tests/unit/train/test_seqpar.py); under bf16 the runs differ by bf16
rounding (the split changes the attention's summation order), so only a loose check makes sense there and the
point of that run is the ``cuda_peak_gib`` of each process (logged by the trainer). CPU-only machines cannot run
this script: the CPU test covers the same comparison over gloo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path, t: int, h: int, w: int, n: int) -> Path:
    import torch

    from dcm_core.train.data import write_latent_dataset

    g = torch.Generator().manual_seed(0)
    items = [
        dict(
            name=f"clip{i}",
            latent=torch.randn(16, t, h, w, generator=g) * 2.0,
            prompt_embed=torch.randn(8, 4096, generator=g) * 0.5,
            prompt_attention_mask=torch.tensor([True] * 6 + [False] * 2),
            caption=f"caption {i}",
        )
        for i in range(n)
    ]
    uncond = (torch.randn(8, 4096, generator=g) * 0.5, torch.tensor([True] + [False] * 7))
    return write_latent_dataset(root, items, uncond=uncond)


def overrides(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    ov = [
        "model.pretrained=tiny:wan",
        f"model.tiny_config={{dim = {args.dim}, num_layers = {args.layers}, ffn_dim = {args.ffn}}}",
        f"data.path={data}", f"output_dir={out}", f"max_train_steps={args.steps}", "checkpoint.every_steps=1",
        "checkpoint.keep=0", "export.at_end=false", "logging.progress_bar=false", "model.lora_rank=4",
        "model.lora_alpha=8", f"optim.lr={args.lr}", f"disc.inner_channels={args.disc_channels}",
        f"mixed_precision={'bf16' if args.bf16 else 'no'}",
        f"model.gradient_checkpointing={'true' if args.checkpointing else 'false'}",
    ]
    return ov


def run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"failed: {' '.join(cmd[:8])} ...")


def compare(stage: str, one: Path, sp: Path, args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (sp / "metrics.jsonl").read_text().splitlines()]
    keys = ["loss", "loss_cd", "grad_norm"] + (["loss_tc"] if stage == "semantic" else ["loss_g", "loss_fm", "loss_d", "d_grad_norm"])
    # as the CPU test: |a − b| ≤ rel_tol·|a| + 1e-9 (values below ~1e-4 are held to the absolute part)
    close = all(math.isclose(a[k], b[k], rel_tol=args.rel_tol, abs_tol=1e-9) for a, b in zip(m1, m2) for k in keys)
    worst = max((abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(m1, m2) for k in keys if abs(a[k]) * args.rel_tol > 1e-9),
                default=0.0)
    ck = f"checkpoints/checkpoint-{args.steps:08d}"
    wdiff = {}
    for name in ["trainable"] + (["discriminator"] if stage == "detail" else []):
        w1, w2 = load_file(str(one / ck / f"{name}.safetensors")), load_file(str(sp / ck / f"{name}.safetensors"))
        wdiff[name] = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    ok = len(m1) == len(m2) == args.steps and close and all(v <= args.w_tol for v in wdiff.values())
    peak = lambda m: max((r.get("cuda_peak_gib", math.nan) for r in m), default=math.nan)  # noqa: E731
    return {
        "stage": stage, "processes": args.nproc, "ok": ok, "worst_rel_loss_diff": worst, "max_weight_diff": wdiff,
        "peak_gib_one_gpu": peak(m1), "peak_gib_sp": peak(m2), "rel_tol": args.rel_tol, "w_tol": args.w_tol,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--nproc", type=int, default=2, help="GPUs = sequence-parallel degree (default 2)")
    p.add_argument("--dim", type=int, default=256, help="transformer width (heads = dim / 128)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--latent", default="5,8,8", help="latent frames,height,width (480x832x81: 21,60,104)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--disc-channels", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--stages", default="semantic,detail")
    p.add_argument("--rel-tol", type=float, default=1e-5)
    p.add_argument("--w-tol", type=float, default=5e-6)
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < args.nproc:
        print(f"needs {args.nproc} CUDA GPUs (found {torch.cuda.device_count() if torch.cuda.is_available() else 0}).")
        return 2
    t, h, w = (int(x) for x in args.latent.split(","))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not args.bf16:  # cuDNN convolutions default to TF32: the fp32 comparison wants plain fp32
        env["NVIDIA_TF32_OVERRIDE"] = "0"
    acc = Path(args.python).with_name("accelerate")
    launcher = [str(acc)] if acc.is_file() else [args.python, "-m", "accelerate.commands.launch"]
    bad = 0
    with tempfile.TemporaryDirectory(prefix="dcm-seqpar-") as tmp:
        data = make_data(Path(tmp) / "data", t, h, w, n=2 * args.nproc)
        for stage in args.stages.split(","):
            one, sp = Path(tmp) / f"{stage}-one", Path(tmp) / f"{stage}-sp"
            run([args.python, "-m", "dcm_core", "train", "--stage", stage, *overrides(args, data, one)],
                dict(env, CUDA_VISIBLE_DEVICES="0"))
            run(launcher + ["launch", "--multi_gpu", "--num_processes", str(args.nproc), "--num_machines", "1",
                            "--mixed_precision", "bf16" if args.bf16 else "no", "--dynamo_backend", "no",
                            "--main_process_port", "0", "-m", "dcm_core", "train", "--stage", stage,
                            *overrides(args, data, sp), f"parallel.sequence_parallel={args.nproc}"], env)
            res = compare(stage, one, sp, args)
            print(json.dumps(res))
            bad += not res["ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
