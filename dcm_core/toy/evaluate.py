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
DCM with the GAN / feature-matching terms in the detail stage. Each is run with three step counts
(:data:`SCHEDULES`): the official 6-step Wan list, and 4 and 2 steps placed by the per-expert-uniform rule.
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


#: Step counts compared (label, build_sigmas arguments): the official Wan list, then fewer steps placed
#: by the per-expert-uniform rule (the authors' advice for other step counts).
SCHEDULES = (
    ("6 steps: wan2.1-t2v-6step (3 + 3)", {"preset": "wan2.1-t2v-6step"}),
    ("4 steps: per-expert-uniform 2 + 2", {"preset": "per-expert-uniform", "semantic_steps": 2, "detail_steps": 2}),
    ("2 steps: per-expert-uniform 1 + 1", {"preset": "per-expert-uniform", "semantic_steps": 1, "detail_steps": 1}),
)


def schedule_sigmas(spec: dict) -> list[float]:
    spec = dict(spec)
    return build_sigmas(spec.pop("preset"), boundary_timestep=M.BOUNDARY, **spec)


def evaluate(weights: Path = M.WEIGHTS_DIR, runs: Path | None = Path("runs/toy"), *, schedules=SCHEDULES,
             prompts=EVAL_PROMPTS, seeds=EVAL_SEEDS) -> dict:
    """Every method on every schedule from the same noise; MSE to the teacher's 50-step sample (latent space)
    and the motion error of the decoded frames."""
    torch.set_grad_enabled(False)
    bundle = M.load_bundle(weights)
    experts = {"dcm": bundle.dcm}
    if runs is not None:
        for key, run in ABLATIONS.items():
            f = _official_file(runs / run)
            if f.exists():
                experts[key] = M.load_dcm_file(f, weights)
    scheds = [(label, schedule_sigmas(spec)) for label, spec in schedules]

    def methods(few):
        out = {k: (lambda n, c, m=m: M.sample_experts(m, n, c, few)) for k, m in experts.items()}
        out["euler"] = lambda n, c: M.sample_single(bundle.teacher, n, c, few)
        if bundle.vcm is not None:
            out["single_expert_cm"] = lambda n, c: M.sample_single(bundle.vcm, n, c, few)
        return out

    runners = {label: methods(few) for label, few in scheds}
    scores = {label: {k: {"mse": [], "motion": [], "seconds": []} for k in fns} for label, fns in runners.items()}
    teacher = {"motion": [], "seconds": []}
    truth_motion = []
    for p in prompts:
        ctx = world.encode_text(p)[None]
        for s in seeds:
            noise = M.make_noise(s)
            t0 = time.perf_counter()
            ref = M.sample_single(bundle.teacher, noise, ctx, M.teacher_sigmas())
            teacher["seconds"].append(time.perf_counter() - t0)
            teacher["motion"].append(M.score(ref, ref, p)["motion_error_px"])  # (its MSE to itself is 0)
            for label, fns in runners.items():
                for key, fn in fns.items():
                    t0 = time.perf_counter()
                    lat = fn(noise, ctx)
                    sc = scores[label][key]
                    sc["seconds"].append(time.perf_counter() - t0)
                    got = M.score(lat, ref, p)
                    sc["mse"].append(got["mse_to_teacher"])
                    sc["motion"].append(got["motion_error_px"])
            truth_motion.append(world.motion_error(world.make_clip(p, s).frames, p))

    def summarise(v):
        return {
            "mse_to_teacher": float(np.mean(v["mse"])),
            "mse_to_teacher_std": float(np.std(v["mse"])),
            "motion_error_px": float(np.mean(v["motion"])),
            "seconds_per_sample": float(np.mean(v["seconds"])),
        }

    results = []
    for label, few in scheds:
        summary = {k: summarise(v) for k, v in scores[label].items()}
        dcm = summary["dcm"]["mse_to_teacher"]
        wins = sum(a < b for a, b in zip(scores[label]["dcm"]["mse"], scores[label]["euler"]["mse"]))
        results.append({
            "schedule": label,
            "sigmas": few,
            "methods": summary,
            "euler_over_dcm_mse": summary["euler"]["mse_to_teacher"] / dcm if dcm > 0 else float("inf"),
            "dcm_closer_than_euler": f"{wins}/{len(scores[label]['dcm']['mse'])}",
        })
    return {
        "prompts": list(prompts),
        "seeds": list(seeds),
        "samples": len(prompts) * len(seeds),
        "teacher_50step": {"motion_error_px": float(np.mean(teacher["motion"])),
                           "seconds_per_sample": float(np.mean(teacher["seconds"]))},
        "world_clips_motion_error_px": float(np.mean(truth_motion)),
        "schedules": results,
    }


LABELS = {
    "teacher_50step": "teacher, 50 steps (reference)",
    "dcm": "**DCM** (semantic + detail experts)",
    "euler": "plain flow-Euler on the teacher",
    "single_expert_cm": "single-expert consistency model",
    "dcm_no_tc": "DCM without the TC loss",
    "dcm_gan": "DCM with the hinge GAN + feature matching in the detail stage",
}


def write_report(res: dict, out: str | Path, t0: float, render) -> None:
    """Stamp the wall time, write ``res`` as JSON to ``out`` and print its table (``render(res)``)."""
    res["wall_seconds"] = round(time.time() - t0, 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(render(res))
    print(f"\n(wrote {out}; {res['wall_seconds']} s)")


def markdown(res: dict) -> str:
    scheds = res["schedules"]
    head = "| method | " + " | ".join(f"MSE to teacher, {r['schedule'].split(':')[0]} ↓" for r in scheds)
    lines = [head + " | motion error (px), 6 steps ↓ |", "|---|" + "---|" * (len(scheds) + 1)]
    for k in scheds[0]["methods"]:
        cells = " | ".join(f"{r['methods'][k]['mse_to_teacher']:.4f}" for r in scheds)
        lines.append(f"| {LABELS.get(k, k)} | {cells} | {scheds[0]['methods'][k]['motion_error_px']:.2f} |")
    lines.append(f"| {LABELS['teacher_50step']} | 0 | " + " | ".join("0" for _ in scheds[1:])
                 + f" | {res['teacher_50step']['motion_error_px']:.2f} |")
    lines.append("")
    lines.append(
        f"{res['samples']} samples ({len(res['prompts'])} prompts × {len(res['seeds'])} seeds). Schedules: "
        + "; ".join(f"{r['schedule']} = {', '.join(f'{x:g}' for x in r['sigmas'])}" for r in scheds) + ". "
        + "Plain Euler ÷ DCM MSE: " + ", ".join(f"**{r['euler_over_dcm_mse']:.2f}×** ({r['schedule'].split(':')[0]}; "
                                                f"DCM closer on {r['dcm_closer_than_euler']} samples)" for r in scheds)
        + f". Motion error of clips rendered by the world itself (the tracker's floor): "
        f"{res['world_clips_motion_error_px']:.2f} px."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcm_core.toy.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(M.WEIGHTS_DIR))
    p.add_argument("--runs", default="runs/toy", help="folder of `make toy-models --ablations` runs (ablations)")
    p.add_argument("--quick", action="store_true", help="2 prompts × 1 seed (a smoke run)")
    p.add_argument("--out", default="runs/toy/eval.json")
    a = p.parse_args(argv)
    t0 = time.time()
    kw = {"prompts": EVAL_PROMPTS[:2], "seeds": EVAL_SEEDS[:1]} if a.quick else {}
    res = evaluate(Path(a.weights), Path(a.runs) if a.runs else None, **kw)
    write_report(res, a.out, t0, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
