"""``python -m dcm_core demo``: DCM end to end on the CPU with the bundled toy world.

Samples one prompt + seed four ways from the same noise and writes, into ``--out``:

* ``teacher_50step.gif``  — the teacher, 50 flow-Euler steps on the toy grid (the reference, with the
  bundle's CFG);
* ``dcm_<N>step.gif``     — DCM: semantic expert then detail expert (default: the toy's recommended
  4 steps on its grid, 2 + 2);
* ``euler_<N>step.gif``   — plain flow-Euler on the teacher with the same N steps (and the teacher's CFG);
* ``vcm_<N>step.gif``     — a single-expert consistency baseline with the same N steps;
* ``strip.png``           — all four side by side (rows = methods, columns = frames);
* ``metrics.json``        — MSE to the teacher's sample, sharpness relative to it (HF energy ratio), motion
  error, model calls, seconds, the sigmas.

The schedule, routing boundary and CFG come from the bundle's manifest (``toy`` section: world v2, grid
shift 3, boundary 810, teacher CFG); ``--preset`` also takes the pack's presets (official lists as they
are; per-expert-uniform and pcm-default placed on the toy grid).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..schedule import PRESET_NAMES, build_sigmas, route
from . import models as M
from . import world

log = logging.getLogger("DCM.toy")

DEFAULT_PROMPT = "red circle moving right"
#: The toy's own schedule: ``--steps`` uniform steps on the bundle's grid (shift 3 for world v2).
TOY_PRESET = "toy"
DEFAULT_PRESET = TOY_PRESET


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="sample the bundled toy world with the dual-expert sampler (CPU, seconds)",
        description=(
            "DCM end to end on the CPU: the bundled toy teacher and its distilled DCM experts sample a prompt of the "
            "toy world ('<colour> <shape> <motion>', e.g. 'blue square moving up'). Writes one GIF per method, a "
            "side-by-side PNG strip and metrics.json."
        ),
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"toy-world prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=[TOY_PRESET] + [n for n in PRESET_NAMES if n != "custom"],
                   help=f"few-step schedule for DCM, plain Euler and the baseline (default {DEFAULT_PRESET}: the toy "
                        "grid, recommended 4 steps)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps for the toy (default: the bundle's recommended, 4) and pcm-default (default 6) presets")
    p.add_argument("--semantic-steps", type=int, default=3,
                   help="semantic-expert steps for the per-expert-uniform preset (default 3)")
    p.add_argument("--detail-steps", type=int, default=3,
                   help="detail-expert steps for the per-expert-uniform preset (default 3)")
    p.add_argument("--scale", type=int, default=6, help="pixel upscale factor of the GIFs and the strip (default 6)")
    p.add_argument("--fps", type=int, default=6, help="GIF frame rate (default 6)")
    p.add_argument("--weights", default=str(M.WEIGHTS_DIR), help="toy weights folder (default: the bundled one)")
    p.set_defaults(_run=run)
    return p


def _save_gif(frames: np.ndarray, path: Path, scale: int, fps: int) -> None:
    from PIL import Image

    imgs = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)


def _save_strip(rows: list[tuple[str, np.ndarray]], path: Path, scale: int, title: str) -> None:
    from PIL import Image, ImageDraw

    f, h, w, _ = rows[0][1].shape
    label_w, gap, head = 150, 4, 24
    W = label_w + f * (w * scale + gap)
    H = head + len(rows) * (h * scale + gap)
    canvas = Image.new("RGB", (W, H), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill=(20, 20, 20))
    for r, (label, frames) in enumerate(rows):
        y = head + r * (h * scale + gap)
        draw.text((6, y + h * scale // 2 - 12), label, fill=(20, 20, 20))
        for i in range(f):
            img = Image.fromarray(frames[i]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(img, (label_w + i * (w * scale + gap), y))
    canvas.save(path)


def run_demo(
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    out: str | Path = "demo_out",
    *,
    preset: str = DEFAULT_PRESET,
    steps: int | None = None,
    semantic_steps: int = 3,
    detail_steps: int = 3,
    scale: int = 6,
    fps: int = 6,
    weights: str | Path = M.WEIGHTS_DIR,
) -> dict:
    """Run the demo; returns the metrics dict that is also written to ``metrics.json``."""
    world.parse_prompt(prompt)  # fail early with the vocabulary
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()
    bundle = M.load_bundle(weights)
    t_load = time.perf_counter() - t_load
    st = bundle.settings
    w = st.world_module
    ctx = w.encode_text(prompt)[None]
    noise = M.make_noise(seed)
    few = schedule_sigmas(st, preset, steps=steps, semantic_steps=semantic_steps, detail_steps=detail_steps)
    n = len(few) - 1
    b, cfg = st.boundary_timestep, st.teacher_cfg
    per_call = 2 if cfg != 1.0 else 1  # CFG: a conditional and an unconditional call per step
    methods: list[tuple[str, str, int, Any]] = [
        ("teacher_50step", "teacher, 50 steps", 50 * per_call,
         lambda: M.sample_single(bundle.teacher, noise, ctx, M.teacher_sigmas(st), cfg)),
        (f"dcm_{n}step", f"DCM, {n} steps", n, lambda: M.sample_experts(bundle.dcm, noise, ctx, few, b)),
        (f"euler_{n}step", f"Euler, {n} steps", n * per_call,
         lambda: M.sample_single(bundle.teacher, noise, ctx, few, cfg)),
    ]
    if bundle.vcm is not None:
        methods.append((f"vcm_{n}step", f"1-expert CM, {n} st.", n,
                        lambda: M.sample_single(bundle.vcm, noise, ctx, few)))
    results: dict[str, dict] = {}
    rows = []
    ref = None
    for key, label, calls, fn in methods:
        t0 = time.perf_counter()
        lat = fn()
        dt = time.perf_counter() - t0
        if ref is None:
            ref = lat
        frames = w.latent_to_frames(lat[0])
        u8 = w.to_uint8(frames)
        _save_gif(u8, out / f"{key}.gif", scale, fps)
        rows.append((label, u8))
        results[key] = {
            "label": label,
            "model_calls": calls,
            "seconds": round(dt, 4),
            **M.score(lat, ref, prompt, w),
            "frame_change": float((frames[1:] - frames[:-1]).abs().mean()),
        }
    _save_strip(rows, out / "strip.png", scale, f"{prompt!r}  seed {seed}  ({preset})")
    metrics = {
        "prompt": prompt,
        "seed": seed,
        "preset": preset,
        "sigmas": few,
        "experts": route(few, b),
        "boundary_timestep": b,
        "world": st.world,
        "grid_shift": st.shift,
        "teacher_cfg": cfg,
        "load_seconds": round(t_load, 3),
        "methods": results,
        "files": sorted({p.name for p in out.iterdir()} | {"metrics.json"}),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def schedule_sigmas(st: M.ToySettings, preset: str, *, steps: int | None = None, semantic_steps: int = 3,
                    detail_steps: int = 3) -> list[float]:
    """The demo's few-step sigmas: ``toy`` = ``steps`` (default the bundle's recommended count) on the toy grid;
    per-expert-uniform and pcm-default placed on the toy grid with the bundle's boundary; official lists as is."""
    if preset == TOY_PRESET:
        return st.grid(steps or st.recommended_steps)
    return build_sigmas(preset, steps=steps or 6, semantic_steps=semantic_steps, detail_steps=detail_steps,
                        boundary_timestep=st.boundary_timestep, shift=st.shift)


def run(args: argparse.Namespace) -> int:
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    m = run_demo(args.prompt, args.seed, args.out, preset=args.preset, steps=args.steps,
                 semantic_steps=args.semantic_steps, detail_steps=args.detail_steps, scale=args.scale,
                 fps=args.fps, weights=args.weights)
    print(f"DCM toy demo: {m['prompt']!r}, seed {m['seed']}, {args.preset} -> {args.out}/")
    print(f"{'method':<22}{'calls':>6}{'seconds':>9}{'MSE→teacher':>13}{'sharpness':>11}{'motion err px':>15}")
    for key, r in m["methods"].items():
        print(f"{r['label']:<22}{r['model_calls']:>6}{r['seconds']:>9.3f}{r['mse_to_teacher']:>13.5f}"
              f"{r['sharpness_vs_teacher']:>11.2f}{r['motion_error_px']:>15.2f}")
    print(f"wrote {', '.join(m['files'])} in {time.perf_counter() - t0:.1f} s")
    return 0


__all__ = ["run_demo", "add_parser", "run"]
