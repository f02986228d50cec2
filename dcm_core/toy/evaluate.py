"""``python -m dcm_core.toy.evaluate`` (``make toy-eval``): measured quality on the toy world.

On a fixed set of prompts × seeds, every method samples from the same noise and is scored by

* **MSE to teacher** — mean squared error (model-space latent) to the teacher's 50-step sample
  from the same noise and prompt: how well a few-step method reproduces the teacher;
* **motion error** — :func:`dcm_core.toy.world.motion_error` in pixels: track the shape in every
  frame and compare with the toy world's motion law started from the tracked first frame
  (frame differences vs the known motion).

Methods: the teacher (50 steps), DCM (semantic + detail experts), plain flow-Euler on the teacher
with the same few steps, the single-expert consistency baseline, and — when the ablation runs
exist (``make toy-models`` with ``--ablations``) — DCM without the Temporal Coherence loss and
DCM with the GAN / feature-matching terms in the detail stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..schedule import build_sigmas
from . import models as M
from . import world

#: The fixed evaluation set: every motion, colours and shapes spread over it.
EVAL_PROMPTS = (
    "red circle moving right", "blue square moving left", "green diamond moving up", "yellow circle moving down",
    "white square bouncing", "magenta diamond growing", "blue circle shrinking", "yellow square moving right",
    "red diamond moving left", "green square moving up", "magenta circle moving down", "white diamond bouncing",
    "red square growing", "green circle shrinking",
)
EVAL_SEEDS = (0, 1, 2)

ABLATIONS = {"dcm_no_tc": "detail_no_tc", "dcm_gan": "detail_gan"}


def _official_file(run: Path) -> Path:
    return run / "export" / "transformer" / "diffusion_pytorch_model.safetensors"


def evaluate(weights: Path = M.WEIGHTS_DIR, runs: Path | None = Path("runs/toy"), *, preset: str = "wan2.1-t2v-6step",
             prompts=EVAL_PROMPTS, seeds=EVAL_SEEDS) -> dict:
    torch.set_grad_enabled(False)
    bundle = M.load_bundle(weights)
    extra = {}
    if runs is not None:
        for key, run in ABLATIONS.items():
            f = _official_file(runs / run)
            if f.exists():
                extra[key] = M.load_dcm_file(f, weights)
    few = build_sigmas(preset, boundary_timestep=M.BOUNDARY)
    methods = {
        "teacher_50step": lambda n, c: M.sample_single(bundle.teacher, n, c, M.teacher_sigmas()),
        "dcm": lambda n, c: M.sample_experts(bundle.dcm, n, c, few),
        "euler": lambda n, c: M.sample_single(bundle.teacher, n, c, few),
    }
    if bundle.vcm is not None:
        methods["single_expert_cm"] = lambda n, c: M.sample_single(bundle.vcm, n, c, few)
    for key, model in extra.items():
        methods[key] = (lambda mdl: (lambda n, c: M.sample_experts(mdl, n, c, few)))(model)
    scores: dict[str, dict[str, list[float]]] = {k: {"mse": [], "motion": [], "seconds": []} for k in methods}
    truth_motion = []
    for p in prompts:
        ctx = world.encode_text(p)[None]
        for s in seeds:
            noise = M.make_noise(s)
            ref = None
            for key, fn in methods.items():
                t0 = time.perf_counter()
                lat = fn(noise, ctx)
                scores[key]["seconds"].append(time.perf_counter() - t0)
                if ref is None:
                    ref = lat
                scores[key]["mse"].append(float(((lat - ref) ** 2).mean()))
                scores[key]["motion"].append(world.motion_error(world.latent_to_frames(lat[0]), p))
            truth_motion.append(world.motion_error(world.make_clip(p, s).frames, p))
    summary = {
        k: {
            "mse_to_teacher": float(np.mean(v["mse"])),
            "mse_to_teacher_std": float(np.std(v["mse"])),
            "motion_error_px": float(np.mean(v["motion"])),
            "seconds_per_sample": float(np.mean(v["seconds"])),
        }
        for k, v in scores.items()
    }
    dcm = summary["dcm"]["mse_to_teacher"]
    out = {
        "preset": preset,
        "sigmas": few,
        "prompts": list(prompts),
        "seeds": list(seeds),
        "samples": len(prompts) * len(seeds),
        "methods": summary,
        "world_clips_motion_error_px": float(np.mean(truth_motion)),
        "euler_over_dcm_mse": summary["euler"]["mse_to_teacher"] / dcm if dcm > 0 else float("inf"),
    }
    if "single_expert_cm" in summary:
        out["single_expert_over_dcm_mse"] = summary["single_expert_cm"]["mse_to_teacher"] / dcm if dcm > 0 else float("inf")
    return out


LABELS = {
    "teacher_50step": "teacher, 50 steps (reference)",
    "dcm": "**DCM** (semantic + detail experts)",
    "euler": "plain flow-Euler on the teacher",
    "single_expert_cm": "single-expert consistency model",
    "dcm_no_tc": "DCM without the TC loss",
    "dcm_gan": "DCM with the hinge GAN + feature matching in the detail stage",
}


def markdown(res: dict) -> str:
    n = len(res["sigmas"]) - 1
    lines = [
        f"| method ({n} steps unless noted) | MSE to teacher ↓ | motion error (px) ↓ |",
        "|---|---|---|",
    ]
    for k, v in res["methods"].items():
        lines.append(f"| {LABELS.get(k, k)} | {v['mse_to_teacher']:.5f} | {v['motion_error_px']:.2f} |")
    lines.append("")
    lines.append(
        f"{res['samples']} samples ({len(res['prompts'])} prompts × {len(res['seeds'])} seeds), schedule "
        f"`{res['preset']}`. Plain Euler / DCM MSE ratio: **{res['euler_over_dcm_mse']:.2f}×**"
        + (f"; single-expert / DCM: **{res['single_expert_over_dcm_mse']:.2f}×**" if "single_expert_over_dcm_mse" in res else "")
        + f". Motion error of clips rendered by the world itself (tracking floor): {res['world_clips_motion_error_px']:.2f} px."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcm_core.toy.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(M.WEIGHTS_DIR))
    p.add_argument("--runs", default="runs/toy", help="folder of `make toy-models --ablations` runs (ablations)")
    p.add_argument("--preset", default="wan2.1-t2v-6step")
    p.add_argument("--out", default="runs/toy/eval.json")
    a = p.parse_args(argv)
    t0 = time.time()
    res = evaluate(Path(a.weights), Path(a.runs) if a.runs else None, preset=a.preset)
    res["wall_seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(markdown(res))
    print(f"\n(wrote {out}; {res['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
