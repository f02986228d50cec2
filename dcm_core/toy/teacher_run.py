"""A resumable, progress-showing teacher training run for the toy world (v2 first; issue 12).

``python -m dcm_core.toy.build --world v2 --teacher-only [--resume]`` drives this. Unlike
:func:`dcm_core.toy.teacher.train_teacher` (v1's one-shot loop, kept as it is for the bundled v1
models), a run here

* writes a checkpoint every ``ckpt_every`` steps to ``<run>/ckpt.safetensors`` (safetensors, atomically: model, EMA
  weights, optimizer, step, numpy + torch RNG states, loss EMA, the config), so a killed run continues
  from its last checkpoint with ``--resume`` and reaches the same weights as an uninterrupted run;
* logs one line per ``log_every`` steps to ``<run>/train.log`` (step, loss EMA, lr, s/step, ETA) and
  shows a tqdm bar;
* every ``eval_every`` steps samples a fixed held-out set of prompts × seeds with the EMA weights
  (``eval_steps`` flow-Euler steps on the shift-``sample_shift`` grid) and appends the world's analytic
  scores (colour / shape / motion correct, motion error px, HF energy, texture warp error) and whether
  the model listens to each word (``listens_*``: :func:`dcm_core.toy.study.conditioning_sensitivity`
  at σ 0.8) and whether its text embedder still tells the words of a kind apart (``word_cosine_*``:
  :func:`dcm_core.toy.study.word_separation`) to ``<run>/eval.jsonl``;
* at the end saves the EMA weights as a diffusers model in ``<run>/teacher`` (what ComfyUI and the
  trainer load) and the raw weights in ``<run>/teacher_raw``.

Choices (see :class:`RunConfig` and the README's "World v2 (in progress)"):

* architecture dim 256 / 3 blocks / ffn 512 (2 heads per block, ≈ 4.0 M parameters): 2.7× v1's
  1.5 M with twice the attention heads, and still inside the issue's 30 MB bundle in bf16 for teacher
  + DCM file (base + detail embedder/head copies + LoRA) + single-expert baseline (≈ 8 + 12 + 8 MB);
  a step costs ≈ 2.5× v1's;
* training σ = shift(u, ``train_shift``), u ~ U(0, 1), with ``train_shift`` equal to the toy's sampling
  shift (3), so training effort lands where the sampler evaluates the model (σ < 0.26 gets 10.5 % of
  the samples, against 2 % under shift 17, where the fine texture is decided);
* half of each batch's σ drawn from U(0.75, 1) instead (``band_frac``, ``band_min``; :func:`train_sigmas`):
  the band where the prompt's words decide the clip. Measured with the ideal denoiser
  (:func:`dcm_core.toy.study.word_value`): knowing the motion word lowers its v-loss by 0.030–0.042 at
  σ 0.8–0.98 on v2, the colour word by 0.013–0.027, the shape word by ≤ 0.005; below σ 0.8 the clip is
  mostly visible in the noisy input. Together with the grid's own share, 75 % of the samples land there
  (50 % under shift 3 alone). Sampling stays on the shift-3 grid;
* caption dropout 10 % (an unconditional branch for CFG), EMA of the weights (decay 0.999) for
  sampling, AdamW with warm-up then cosine decay to 5 %.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import tiny
from ..flow import add_noise, flow_step
from ..modeling import velocity
from ..schedule import FAMILY_WAN, flow_shift
from . import world_v2

log = logging.getLogger("DCM.toy")

#: Architecture of the v2 toy models (teacher and, later, experts): ComfyUI-loadable Wan (head_dim 128).
TOY_WAN_V2 = dict(dim=256, num_layers=3, ffn_dim=512)
#: The toy's recommended sampling shift (measured: see the README's "World v2" note); training uses the same.
TOY_SHIFT = 3.0
#: Held-out prompts × seeds scored during training (seeds far from the training stream's).
EVAL_PROMPTS = ("red circle moving right", "blue square moving left", "green diamond moving up",
                "yellow circle moving down", "white square bouncing", "magenta diamond growing",
                "blue circle shrinking", "red square moving up")
EVAL_SEED_BASE = 900_000


@dataclass
class RunConfig:
    world: str = "v2"
    arch: dict = field(default_factory=lambda: dict(TOY_WAN_V2))
    steps: int = 3200
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    train_shift: float = TOY_SHIFT
    band_frac: float = 0.5  # share of each batch whose σ is drawn from U(band_min, 1) instead of the shifted grid
    band_min: float = 0.75
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    eval_every: int = 250
    eval_steps: int = 50
    sample_shift: float = TOY_SHIFT
    eval_seeds: int = 1


#: Settings that do not change the trained weights, so a resumed run may change them.
_FREE_ON_RESUME = frozenset({"ckpt_every", "log_every", "eval_every", "eval_steps", "sample_shift", "eval_seeds"})


def _lr_at(cfg: RunConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _batch(w, rng: np.random.Generator, n: int, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    lat, txt = [], []
    for _ in range(n):
        clip = w.random_clip(int(rng.integers(2**62)))
        lat.append(clip.latent)
        txt.append(w.encode_text("" if rng.random() < dropout else clip.prompt.text))
    return torch.stack(lat), torch.stack(txt)


def train_sigmas(cfg: RunConfig, rng: np.random.Generator, n: int) -> torch.Tensor:
    """Training noise levels: σ = shift(u, ``train_shift``), u ~ U(0, 1), except that a ``band_frac`` share
    of the batch is drawn from U(``band_min``, 1), the band where the prompt's words decide the clip."""
    u = rng.random(n)
    sigma = np.asarray(flow_shift(u, cfg.train_shift), dtype=np.float64)
    if cfg.band_frac > 0:
        pick = rng.random(n) < cfg.band_frac
        sigma = np.where(pick, cfg.band_min + (1.0 - cfg.band_min) * rng.random(n), sigma)
    return torch.as_tensor(sigma, dtype=torch.float32)


def build_model(cfg: RunConfig) -> torch.nn.Module:
    model = tiny.build_transformer(FAMILY_WAN, tiny.wan_config(**cfg.arch), seed=cfg.seed).train()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
    return model


def grid_sigmas(steps: int, shift: float) -> list[float]:
    """``steps`` Euler steps on the shifted grid σ(1), σ((n−1)/n), …, σ(1/n), then 0."""
    return [float(flow_shift((steps - j) / steps, shift)) for j in range(steps)] + [0.0]


@torch.no_grad()
def sample(model: torch.nn.Module, noise: torch.Tensor, context: torch.Tensor, sigmas,
           cfg_scale: float = 1.0) -> torch.Tensor:
    """Flow-Euler over ``sigmas`` (descending, ending in 0), optionally with classifier-free guidance."""
    x = noise.float()
    uncond = torch.zeros_like(context) if cfg_scale != 1.0 else None
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        if uncond is None:
            v = velocity(model, x, a, context)
        else:
            vv = velocity(model, torch.cat([x, x]), a, torch.cat([context, uncond]))
            vc, vu = vv.chunk(2)
            v = vu + cfg_scale * (vc - vu)
        x = flow_step(x, v, a, b)
    return x


def eval_set(cfg: RunConfig) -> list[tuple[str, int]]:
    return [(p, EVAL_SEED_BASE + i * 97 + s) for i, p in enumerate(EVAL_PROMPTS) for s in range(cfg.eval_seeds)]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: RunConfig, *, steps: int | None = None,
                   shift: float | None = None, cfg_scale: float = 1.0) -> dict:
    """The world's analytic scores of the model's samples on the held-out set (means and rates)."""
    w = world_v2.get_world(cfg.world)
    pairs = eval_set(cfg)
    sig = grid_sigmas(steps or cfg.eval_steps, shift or cfg.sample_shift)
    noise = torch.stack([torch.randn(w.latent_shape()[1:], generator=torch.Generator().manual_seed(s))
                         for _, s in pairs])
    ctx = torch.stack([w.encode_text(p) for p, _ in pairs])
    lat = sample(model, noise, ctx, sig, cfg_scale)
    rows = [world_v2.score_clip(w.latent_to_frames(x), p) for x, (p, _) in zip(lat, pairs)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("colour_ok", "shape_ok", "motion_ok", "all_ok")}
    for k in ("motion_error_px", "hf_energy", "warp_error"):
        v = [r[k] for r in rows if math.isfinite(r[k])]
        out[k] = float(np.mean(v)) if v else float("nan")
    out["samples"] = len(rows)
    from .study import conditioning_sensitivity, word_separation  # (study imports this module)

    for k, v in conditioning_sensitivity(model, w, sigmas=(0.8,))["0.8"].items():
        out[f"listens_{k}"] = v  # ‖Δv‖²/‖v‖² at σ 0.8 when that word is swapped: ~0 = the word is ignored
    for k, v in word_separation(model, w).items():
        out[f"word_cosine_{k}"] = v["max_cosine"]  # → 1: the text embedder has merged that kind's words
    return out


def save_checkpoint(path: Path, cfg: "RunConfig", step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    opt: torch.optim.Optimizer, rng: np.random.Generator, loss_ema: float | None) -> None:
    """One safetensors file (never pickle), written atomically: model / EMA weights, the optimizer's tensors
    and the torch RNG state as tensors; config, step, loss EMA, numpy RNG state and the optimizer's param
    groups as JSON in the file's metadata."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous().clone() for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    for idx, state in osd["state"].items():
        for k, v in state.items():
            tensors[f"opt.{idx}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().contiguous().clone()
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {"config": asdict(cfg), "step": step, "loss_ema": loss_ema, "numpy_rng": rng.bit_generator.state,
            "param_groups": osd["param_groups"]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"dcm_toy_teacher_run": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """What :func:`save_checkpoint` wrote: ``config, step, loss_ema, numpy_rng, model, ema, opt, torch_rng``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("dcm_toy_teacher_run", "null") or "null")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a toy teacher-run checkpoint (no 'dcm_toy_teacher_run' metadata)")
    tensors = load_file(str(path))
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    return {**meta,
            "model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
            "ema": {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")},
            "opt": {"state": state, "param_groups": meta["param_groups"]},
            "torch_rng": tensors["torch_rng"]}


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> torch.nn.Module:
    """Train (or continue) the teacher in ``run_dir``; returns the EMA model.

    ``stop_after``: return after this many steps of *this call* (tests; a run killed on purpose), after
    writing a checkpoint, without the final export.
    """
    from tqdm import tqdm

    run = Path(run_dir)
    ckpt_path = run / "ckpt.safetensors"
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another folder")
    run.mkdir(parents=True, exist_ok=True)
    w = world_v2.get_world(cfg.world)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg)
    ema = build_model(cfg).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    step, loss_ema = 0, None
    if ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        diff = {k: (ck["config"].get(k), v) for k, v in asdict(cfg).items()
                if k not in _FREE_ON_RESUME and ck["config"].get(k) != v}
        if diff:
            raise ValueError(f"{ckpt_path} was written with another config (saved, now): {diff}")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        step, loss_ema = ck["step"], ck["loss_ema"]
        log.info("resumed %s at step %d", ckpt_path, step)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, cfg, step, model, ema, opt, rng, loss_ema)

    def write(name: str, line: str) -> None:
        with open(run / name, "a") as f:
            f.write(line + "\n")

    t0, start = time.time(), step
    bar = tqdm(total=cfg.steps, initial=step, desc=f"teacher {cfg.world}", disable=not progress, dynamic_ncols=True)
    while step < cfg.steps:
        x0, ctx = _batch(w, rng, cfg.batch_size, cfg.caption_dropout)
        sigma = train_sigmas(cfg, rng, cfg.batch_size)
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        v = velocity(model, add_noise(x0, noise, sigma), sigma, ctx)
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        lr = _lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up of the EMA (early weights forgotten)
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm.detach(), 1 - d)
        step += 1
        loss_ema = float(loss.detach()) if loss_ema is None else 0.98 * loss_ema + 0.02 * float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = (time.time() - t0) / max(1, step - start)
            write("train.log", f"step {step}/{cfg.steps} loss_ema {loss_ema:.5f} lr {lr:.2e} {rate:.2f} s/step "
                               f"eta {rate * (cfg.steps - step) / 60:.0f} min {time.strftime('%H:%M:%S')}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint()
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            ev = evaluate_model(ema, cfg)
            write("eval.jsonl", json.dumps({"step": step, **ev}))
            log.info("eval at step %d: %s", step, ev)
        if stop_after is not None and step - start >= stop_after:
            checkpoint()
            bar.close()
            return ema
    bar.close()
    ema.save_pretrained(str(run / "teacher"), safe_serialization=True)
    model.eval().save_pretrained(str(run / "teacher_raw"), safe_serialization=True)
    log.info("teacher %s: %d steps, loss EMA %.4f, saved %s", cfg.world, step, loss_ema, run / "teacher")
    return ema
