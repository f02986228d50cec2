"""Train the toy world's teacher: a tiny Wan2.1-architecture transformer, plain flow matching.

The teacher is what DCM distils. It is an ordinary rectified-flow model
(``x_σ = σ·ε + (1−σ)·x0``, target ``v = ε − x0``) trained on clips drawn fresh from the
toy world every step, with 10% caption dropout so an unconditional branch exists.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import tiny
from ..flow import add_noise
from ..modeling import velocity
from ..schedule import FAMILY_WAN, flow_shift
from . import world

log = logging.getLogger("DCM.toy")

#: Architecture of every toy model (teacher and experts share it): ComfyUI-loadable Wan.
TOY_WAN = dict(dim=128, num_layers=3, ffn_dim=512)


@dataclass
class TeacherConfig:
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    train_shift: float = 3.0  # σ = shift(u, 3), u ~ U(0, 1): covers the whole trajectory
    caption_dropout: float = 0.1
    seed: int = 0
    grad_clip: float = 1.0


def batch(rng: np.random.Generator, n: int, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    lat, txt = [], []
    for _ in range(n):
        clip = world.random_clip(int(rng.integers(2**62)))
        lat.append(clip.latent)
        txt.append(world.encode_text("" if rng.random() < dropout else clip.prompt.text))
    return torch.stack(lat), torch.stack(txt)


def train_teacher(cfg: TeacherConfig, out_dir: str | Path | None = None, progress: bool = True,
                  log_every: int = 0, log_file: str | Path | None = None) -> torch.nn.Module:
    """Train and return the teacher (a diffusers ``WanTransformer3DModel``); save it if ``out_dir``."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = tiny.build_transformer(FAMILY_WAN, tiny.wan_config(**TOY_WAN), seed=cfg.seed).train()
    # Standard init for training from scratch (tiny.randomize_ uses a flat N(0, 0.02)).
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    t0 = time.time()
    ema = None
    bar = tqdm(range(cfg.steps), desc="teacher", disable=not progress, dynamic_ncols=True)
    for step in bar:
        x0, ctx = batch(rng, cfg.batch_size, cfg.caption_dropout)
        u = torch.from_numpy(rng.random(cfg.batch_size).astype(np.float32))
        sigma = torch.as_tensor(flow_shift(u, cfg.train_shift), dtype=torch.float32)
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        x_t = add_noise(x0, noise, sigma)
        v = velocity(model, x_t, sigma, ctx)
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema = float(loss.detach()) if ema is None else 0.98 * ema + 0.02 * float(loss.detach())
        bar.set_postfix(loss=f"{ema:.4f}")
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            line = f"step {step} loss_ema {ema:.5f} lr {lr_at(step):.2e} elapsed {time.time() - t0:.0f}s"
            log.info("teacher %s", line)
            if log_file is not None:
                with open(log_file, "a") as f:
                    f.write(line + "\n")
    log.info("teacher: %d steps in %.1f s, final loss (EMA) %.4f", cfg.steps, time.time() - t0, ema)
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
    return model
