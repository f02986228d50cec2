"""``python -m dcm_core.toy.study``: measurements on a toy teacher before distilling (issue 12, items 1–2).

Two studies, both on a fixed held-out set of prompts × seeds, every sampler starting from the same noise:

* **hardness** — how far the teacher's own few-step flow-Euler samples (2 / 4 / 6 steps, on the toy grid
  and on the official presets) are from its reference sample: MSE in latent space (also relative to the
  reference's variance), sharpness ratio (HF energy of the few-step sample ÷ the reference's) and the
  world's analytic scores. A world is "hard for few-step sampling" when these differ clearly.
* **spectral** — a model-free proxy (:func:`spectral_decided`): which share of the clips' (fine-detail)
  energy is above the noise at each σ, for v1 and v2;
* **conditioning** — does the teacher listen to each word of the prompt (:func:`conditioning_sensitivity`), and
  does its text embedder still tell the words of one kind apart (:func:`word_separation`), and does it know
  which frame and place a token is at (:func:`position_probe`);
* **word value** — model-free: what each word is worth to the ideal denoiser at high σ (:func:`word_value`);
* **cfg** — which guidance scale the teacher's reference samples use (:func:`cfg_study`);
* **stages** — where a distilled DCM's distance to the teacher's sample comes from (:func:`stage_errors`):
  the semantic expert's error at the routing boundary, what that error costs at σ 0 when the *teacher*
  finishes the trajectory (against a random error of the same size), and the detail expert's error when it
  starts from the teacher's own state at the boundary; on the toy VBench's tuning pairs (``--weights``,
  ``--dcm``);
* **shift** — which grid the teacher's 50-step *reference* sampling should use: for each shift s, the
  50-step sample on σ = shift(u, s) against a near-converged ODE solution (``--converged-steps`` Euler
  steps; its own error is bounded by comparing two converged solutions on different grids), plus the
  last σ before 0 (DCM's shift-17 grid ends with a single jump 0.26 → 0) and the sharpness ratio.

The teacher is a diffusers folder (``--teacher``) or a resumable run's checkpoint (``--ckpt``, EMA
weights; e.g. a short-trained proxy of a v2 teacher still in training).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..schedule import OFFICIAL_PRESETS
from . import teacher_run as TR
from . import world_v2

#: Held-out prompts for the studies (every motion; seeds disjoint from training's stream and from make toy-eval's).
STUDY_PROMPTS = ("red circle moving right", "blue square moving left", "green diamond moving up",
                 "yellow circle moving down", "white square bouncing", "magenta diamond growing",
                 "blue circle shrinking", "yellow square moving right", "red diamond moving left",
                 "green square moving up", "magenta circle moving down", "white diamond bouncing")
STUDY_SEED_BASE = 700_000


def load_teacher(teacher: str | None = None, ckpt: str | None = None) -> tuple[torch.nn.Module, dict]:
    if ckpt:
        ck = TR.load_checkpoint(ckpt)
        cfg = TR.RunConfig(**ck["config"])
        model = TR.build_model(cfg).eval()
        model.load_state_dict(ck["ema"])
        return model, {"source": str(ckpt), "step": ck["step"], "loss_ema": ck["loss_ema"], "world": cfg.world}
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(str(teacher), torch_dtype=torch.float32).float().eval()
    return model, {"source": str(teacher)}


def _inputs(world, n: int, seeds_per_prompt: int = 1):
    pairs = [(p, STUDY_SEED_BASE + 131 * i + s) for i, p in enumerate(STUDY_PROMPTS[:n]) for s in range(seeds_per_prompt)]
    noise = torch.stack([torch.randn(world.latent_shape()[1:], generator=torch.Generator().manual_seed(s))
                         for _, s in pairs])
    ctx = torch.stack([world.encode_text(p) for p, _ in pairs])
    return pairs, noise, ctx


def _scores(world, lat: torch.Tensor, pairs) -> dict:
    rows = [world_v2.score_clip(world.latent_to_frames(x), p) for x, (p, _) in zip(lat, pairs)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("all_ok", "colour_ok", "shape_ok", "motion_ok")}
    out["motion_error_px"] = float(np.mean([r["motion_error_px"] for r in rows]))
    we = [r["warp_error"] for r in rows if np.isfinite(r["warp_error"])]
    out["warp_error"] = float(np.mean(we)) if we else float("nan")
    return out


def _hf(world, lat: torch.Tensor) -> np.ndarray:
    return np.array([world_v2.hf_energy(world.latent_to_frames(x)) for x in lat])


def _compare(world, lat: torch.Tensor, ref: torch.Tensor, pairs) -> dict:
    mse = ((lat - ref) ** 2).mean(dim=(1, 2, 3, 4))
    var = ref.var(dim=(1, 2, 3, 4))
    return {"mse": float(mse.mean()), "mse_rel": float((mse / var).mean()),
            "sharpness_ratio": float(np.mean(_hf(world, lat) / np.maximum(_hf(world, ref), 1e-8))),
            **_scores(world, lat, pairs)}


def few_step_schedules(shift: float) -> dict[str, list[float]]:
    out = {f"{n} steps, toy grid (shift {shift:g})": TR.grid_sigmas(n, shift) for n in (2, 4, 6)}
    out["4 steps, hunyuan-t2v-4step"] = list(OFFICIAL_PRESETS["hunyuan-t2v-4step"])
    out["6 steps, wan2.1-t2v-6step"] = list(OFFICIAL_PRESETS["wan2.1-t2v-6step"])
    return out


@torch.no_grad()
def hardness(model, world, *, n_prompts: int = 12, ref_steps: int = 50, ref_shift: float = TR.TOY_SHIFT,
             cfg_scale: float = 1.0) -> dict:
    pairs, noise, ctx = _inputs(world, n_prompts)
    ref = TR.sample(model, noise, ctx, TR.grid_sigmas(ref_steps, ref_shift), cfg_scale)
    res = {"reference": f"{ref_steps} steps, shift {ref_shift:g}", "reference_scores": _scores(world, ref, pairs),
           "samples": len(pairs), "few_step": {}}
    for label, sig in few_step_schedules(ref_shift).items():
        res["few_step"][label] = {"sigmas": [round(s, 6) for s in sig],
                                  **_compare(world, TR.sample(model, noise, ctx, sig, cfg_scale), ref, pairs)}
    return res


@torch.no_grad()
def shift_study(model, world, *, shifts=(1.0, 3.0, 5.0, 17.0), steps: int = 50, converged_steps: int = 400,
                n_prompts: int = 12, cfg_scale: float = 1.0) -> dict:
    pairs, noise, ctx = _inputs(world, n_prompts)
    conv = TR.sample(model, noise, ctx, TR.grid_sigmas(converged_steps, 3.0), cfg_scale)
    conv_b = TR.sample(model, noise, ctx, TR.grid_sigmas(converged_steps, 1.0), cfg_scale)
    res = {"converged": f"{converged_steps} steps, shift 3",
           "converged_uncertainty_mse": float(((conv - conv_b) ** 2).mean()),  # vs 400 steps at shift 1
           "converged_scores": _scores(world, conv, pairs), "samples": len(pairs), "shifts": {}}
    for s in shifts:
        sig = TR.grid_sigmas(steps, s)
        res["shifts"][f"{s:g}"] = {"last_sigma_before_0": round(sig[-2], 6), "first_step_below_1": round(sig[1], 6),
                                   **_compare(world, TR.sample(model, noise, ctx, sig, cfg_scale), conv, pairs)}
    return res


CFG_SCALES = (1.0, 2.0, 3.0, 4.0, 5.0)


@torch.no_grad()
def cfg_study(model, world, *, scales=CFG_SCALES, steps: int = 50, shift: float = TR.TOY_SHIFT,
              seeds_per_prompt: int = 2) -> dict:
    """Which classifier-free guidance scale the teacher's reference samples (and so the distillation targets)
    should use: the world's analytic scores of ``steps``-step samples on the toy grid per scale, on the studies'
    prompts × seeds (disjoint from the toy VBench's pairs, so the choice is not tuned to the eval set)."""
    pairs, noise, ctx = _inputs(world, len(STUDY_PROMPTS), seeds_per_prompt)
    sig = TR.grid_sigmas(steps, shift)
    out = {"samples": len(pairs), "steps": steps, "shift": shift, "scales": {}}
    for c in scales:
        lat = TR.sample(model, noise, ctx, sig, c)
        out["scales"][f"{c:g}"] = {**_scores(world, lat, pairs), "hf_energy": float(_hf(world, lat).mean())}
    return out


CONDITIONING_BASES = ("red circle moving right", "green square moving up", "white diamond growing")


def _swap(prompt: str, what: str) -> str:
    from .world import COLOURS, MOTIONS, SHAPES, parse_prompt

    p = parse_prompt(prompt)
    nxt = lambda seq, v: list(seq)[(list(seq).index(v) + 1) % len(seq)]  # noqa: E731
    if what == "colour":
        return f"{nxt(COLOURS, p.colour)} {p.shape} {p.motion}"
    if what == "shape":
        return f"{p.colour} {nxt(SHAPES, p.shape)} {p.motion}"
    if what == "motion":
        return f"{p.colour} {p.shape} {nxt(MOTIONS, p.motion)}"
    return ""


@torch.no_grad()
def conditioning_sensitivity(model, world, *, sigmas=(0.95, 0.8, 0.5), bases=CONDITIONING_BASES,
                             n_noise: int = 2, seed: int = 0) -> dict:
    """Does the teacher listen to each word? ``‖v(p′) − v(p)‖² / ‖v(p)‖²`` at σ when one attribute of the
    prompt is swapped (colour, shape, motion) or the prompt is dropped (unconditional), averaged over
    ``bases`` and noises. A teacher that ignores a word has ~0 for it (measured: the bundled v1 teacher
    gives ~1e-4 for shape and motion against ~0.2 for colour — it draws colours, not shapes or motions)."""
    from ..modeling import velocity

    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n_noise, *world.latent_shape()[1:]), generator=g)
    out: dict[str, dict[str, float]] = {}
    for s in sigmas:
        row = {k: 0.0 for k in ("colour", "shape", "motion", "unconditional")}
        for b in bases:
            vb = velocity(model, x, s, world.encode_text(b)[None].expand(n_noise, -1, -1))
            for k in row:
                va = velocity(model, x, s, world.encode_text(_swap(b, k))[None].expand(n_noise, -1, -1))
                row[k] += float((va - vb).pow(2).mean() / vb.pow(2).mean()) / len(bases)
        out[f"{s:g}"] = row
    return out


WORD_GROUPS = {"colour": None, "shape": None, "direction": ("left", "right", "up", "down")}


@torch.no_grad()
def word_separation(model, world) -> dict:
    """Are the words of one kind still told apart after the model's own text embedder? Cosine similarity of
    the embedded word vectors (``condition_embedder.text_embedder``), the largest within each group
    (colours, shapes, the four directions of ``moving …``) and the mean across groups. A group whose words
    map to nearly the same vector (cosine → 1) cannot steer the model apart, whatever comes after."""
    from .world import _WORD_VECTORS, COLOURS, SHAPES

    te = model.condition_embedder.text_embedder
    groups = {"colour": tuple(COLOURS), "shape": tuple(SHAPES), "direction": WORD_GROUPS["direction"]}
    out = {}
    for g, words in groups.items():
        e = torch.nn.functional.normalize(te(torch.stack([torch.from_numpy(_WORD_VECTORS[w]) for w in words])), dim=-1)
        cos = e @ e.T
        off = cos[~torch.eye(len(words), dtype=torch.bool)]
        out[g] = {"max_cosine": float(off.max()), "mean_cosine": float(off.mean())}
    return out


def ridge_r2(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             ridge: float = 10.0) -> list[float]:
    """R² on the test rows of a ridge regression (features standardised on the training rows, with
    intercept) fitted on the training rows, per target."""
    mu, sd = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-8)

    def aug(x):
        return torch.cat([(x.double() - mu) / sd, torch.ones(len(x), 1, dtype=torch.float64)], 1)

    a, b = aug(train_x), aug(test_x)
    coef = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ train_y.double())
    pred = b @ coef
    y = test_y.double()
    return [float(v) for v in 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-12)]


@torch.no_grad()
def position_probe(model, world, *, sigmas=(0.98, 0.9, 0.5), n_train: int = 6, n_test: int = 2, seed: int = 0) -> dict:
    """Does the model know *where* a token is? Wan has no absolute position embedding (RoPE gives only
    relative offsets), yet a prompt's motion word pins the object's mean path to absolute frames and
    places. A ridge probe from each block's token features to the token's (frame, row, column) index,
    fitted on ``n_train`` noises and scored (R²) on ``n_test`` others, per σ; ≤ 0 means not decodable."""
    from ..modeling import velocity

    feats: dict[str, torch.Tensor] = {}
    hooks = [model.patch_embedding.register_forward_hook(
        lambda mod, a, o: feats.__setitem__("input", o.flatten(2).transpose(1, 2)))]
    for i, b in enumerate(model.blocks):
        hooks.append(b.register_forward_hook(lambda mod, a, o, i=i: feats.__setitem__(f"block{i}", o)))
    _, f, h, w = world.latent_shape()[1:]
    pt, ph, pw = model.config.patch_size
    t, y, x = torch.meshgrid(torch.arange(f // pt), torch.arange(h // ph), torch.arange(w // pw), indexing="ij")
    target = torch.stack([t.flatten(), y.flatten(), x.flatten()], 1).float()
    n = n_train + n_test
    prompts = [STUDY_PROMPTS[i % len(STUDY_PROMPTS)] for i in range(n)]
    ctx = torch.stack([world.encode_text(p) for p in prompts])
    g = torch.Generator().manual_seed(seed)
    out: dict = {}
    try:
        for s in sigmas:
            velocity(model, torch.randn((n, *world.latent_shape()[1:]), generator=g), s, ctx)
            row = {}
            for k, v in feats.items():
                r2 = ridge_r2(v[:n_train].reshape(-1, v.shape[-1]), target.repeat(n_train, 1),
                              v[n_train:].reshape(-1, v.shape[-1]), target.repeat(n_test, 1))
                row[k] = dict(zip(("frame", "row", "column"), r2))
            out[f"{s:g}"] = row
    finally:
        for hk in hooks:
            hk.remove()
    return out


WORD_VALUE_PROMPTS = ("red circle moving right", "blue square moving up", "green diamond bouncing",
                      "white circle moving left")
WORD_VALUE_SIGMAS = (0.98, 0.95, 0.9, 0.85, 0.8)
WORD_VALUE_CLIPS = 60  # clips per prompt in each set


def word_value(world, *, per_prompt: int | None = None, tests_per_prompt: int = 6, sigmas=WORD_VALUE_SIGMAS,
               prompts=None, seed: int = 0) -> dict:
    """What each word is worth to the *ideal* denoiser, per σ (model-free; the loss a teacher can gain by
    listening to it).

    The Bayes-optimal x0-prediction given ``x_σ`` over a finite set of clips is the softmax-weighted mean
    of the clips (weights ``exp(−‖x_σ − (1−σ)x_i‖² / 2σ²)``). For a test clip of prompt P, the v-loss
    ``‖x̂0 − x0‖²/σ²`` is computed with the set of P's clips (the word known) and with the union over every
    value of one attribute (the word unknown), the two sets of equal size so set size does not favour either.
    ``gain`` = loss without the word − loss with it. Reliable at high σ (where the posterior spreads over
    many clips); at low σ a finite set only finds its nearest clip, so σ < 0.8 is not reported.
    """
    import dataclasses

    from .world import COLOURS, MOTIONS, SHAPES

    per_prompt = per_prompt or WORD_VALUE_CLIPS
    prompts = prompts or WORD_VALUE_PROMPTS
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    cache: dict = {}

    def clips(p, k):
        have = cache.get(p)
        if have is None or len(have) < k:
            more = [world.make_clip(p.text, int(rng.integers(2**31))).latent.flatten()
                    for _ in range(k - (0 if have is None else len(have)))]
            cache[p] = torch.stack(([] if have is None else list(have)) + more)
        return cache[p][:k]

    def denoise(xt, s, X):
        w = torch.softmax(-((xt[None] - (1 - s) * X) ** 2).sum(1) / (2 * s * s), 0)
        return (w[:, None] * X).sum(0)

    kinds = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": MOTIONS}
    acc = {k: {"with": np.zeros(len(sigmas)), "without": np.zeros(len(sigmas))} for k in kinds}
    n = 0
    for text in prompts:
        p = world.parse_prompt(text)
        for k, values in kinds.items():
            union = torch.cat([clips(dataclasses.replace(p, **{k: v}), per_prompt) for v in values])
            own = clips(p, len(union))
            for r in range(tests_per_prompt):
                x0 = world.make_clip(text, 10**7 + 1000 * n + r).latent.flatten()
                eps = torch.randn(x0.shape, generator=g)
                for i, s in enumerate(sigmas):
                    xt = s * eps + (1 - s) * x0
                    acc[k]["with"][i] += float(((denoise(xt, s, own) - x0) ** 2).mean()) / s**2
                    acc[k]["without"][i] += float(((denoise(xt, s, union) - x0) ** 2).mean()) / s**2
        n += 1
    m = n * tests_per_prompt
    out = {"per_prompt_clips": per_prompt, "tests": m, "by_sigma": {}}
    for i, s in enumerate(sigmas):
        out["by_sigma"][f"{s:g}"] = {k: {"loss_with": acc[k]["with"][i] / m, "gain": (acc[k]["without"][i] - acc[k]["with"][i]) / m}
                                    for k in kinds}
    return out


#: Noise levels at which :func:`spectral_decided` reports (DCM's switch points and the presets' last jumps among them).
SPECTRAL_SIGMAS = (0.99, 0.975, 0.95, 0.9, 0.81, 0.7, 0.5, 0.26, 0.1, 0.05)
HF_CUTOFF = 1 / 6  # cycles per pixel: periods ≤ 6 px (the v2 textures' band) count as "fine detail"


def spectral_decided(world, *, n_clips: int = 256, sigmas=SPECTRAL_SIGMAS, seed: int = 0) -> dict:
    """A model-free hardness proxy: which share of the clips' energy is already above the noise at σ.

    In pixel space the forward process is ``(1−σ)·p0 + σ·n`` with white ``n`` of std ``1/LATENT_GAIN``
    (the latent map is orthonormal up to that gain). A spatial frequency is "decided" at σ when the
    clips' mean power there exceeds the noise's, ``(1−σ)²·P(f) > σ²/GAIN²`` (a linear-Gaussian / Wiener
    view: the best denoiser keeps that frequency). Reported per σ: the decided share of all non-DC
    energy and of the fine-detail energy (period ≤ 6 px).
    """
    from .world import LATENT_GAIN

    rng = np.random.default_rng(seed)
    power = None
    for _ in range(n_clips):
        f = world.random_clip(int(rng.integers(2**62))).frames.double()  # [F, 3, H, W]
        p = (torch.fft.fft2(f).abs() ** 2).mean(dim=(0, 1)) / (f.shape[-1] * f.shape[-2])
        power = p if power is None else power + p
    power = (power / n_clips).numpy()
    fy = np.fft.fftfreq(power.shape[0])[:, None]
    fx = np.fft.fftfreq(power.shape[1])[None, :]
    rad = np.sqrt(fx**2 + fy**2)
    nondc = rad > 0
    hf = rad >= HF_CUTOFF
    out = {"hf_share_of_energy": float(power[hf].sum() / power[nondc].sum()), "by_sigma": {}}
    for s in sigmas:
        decided = (1 - s) ** 2 * power > (s / LATENT_GAIN) ** 2
        out["by_sigma"][f"{s:g}"] = {"all": float(power[decided & nondc].sum() / power[nondc].sum()),
                                     "fine": float(power[decided & hf].sum() / power[hf].sum())}
    return out


@torch.no_grad()
def stage_errors(teacher, dcm, settings, *, n_pairs: int = 32, detail_steps=(1, 2, 3, 4), full_steps=(2, 4, 6)) -> dict:
    """Split a DCM model's MSE to the teacher's 50-step sample into its two stages (toy-VBench tuning pairs).

    ``settings`` is the bundle's :class:`~dcm_core.toy.models.ToySettings` (world, grid shift, boundary).
    ``x_b`` is the teacher's state on its 50-point grid at the first σ ≤ the boundary, ``x0`` its sample.
    The semantic expert jumps from the noise to σ_b in one step; its error at σ_b is then carried to σ 0 by
    the teacher's own remaining grid (what the semantic stage costs at the end), beside a random error of
    the same size. The detail expert starts from the teacher's ``x_b`` (what the detail stage costs alone).
    Teacher flow-Euler with the same steps is the reference for both."""
    from ..flow import flow_step
    from ..modeling import DETAIL, SEMANTIC, velocity
    from ..sampler import sample_dcm
    from . import vbench as V

    prs = V.pairs(n_pairs, settings.world_module, seed=V.TUNE_SEED)
    noise, ctx = V.noise_and_context(settings.world_module, prs)

    def teacher_euler(x, sigmas):
        return TR.sample(teacher, x, ctx, sigmas)

    def expert_euler(expert, x, sigmas):  # one DCM expert for every step, whatever the boundary
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            x = flow_step(x, velocity(dcm, x, a, ctx, expert), a, b)
        return x

    def mse(a, b):
        return round(float(((a - b) ** 2).mean()), 5)

    grid = settings.grid(50)
    kb = sum(1 for s in grid if s > settings.boundary_timestep / 1000)
    s_b = grid[kb]
    x_b = teacher_euler(noise, grid[:kb + 1])
    x0 = teacher_euler(x_b, grid[kb:])  # the teacher's own remaining grid from σ_b finishes every case below
    sem = expert_euler(SEMANTIC, noise, [1.0, s_b])
    eul = teacher_euler(noise, [1.0, s_b])
    err = mse(sem, x_b)
    rnd = x_b + err ** 0.5 * torch.randn(x_b.shape, generator=torch.Generator().manual_seed(0))
    out = {
        "pairs": n_pairs, "seed": V.TUNE_SEED, "sigma_boundary": round(s_b, 4),
        "x_b_mean_square": round(float((x_b ** 2).mean()), 5),
        "semantic_1step": {"at_boundary": err, "teacher_finishes": mse(teacher_euler(sem, grid[kb:]), x0)},
        "teacher_euler_1step": {"at_boundary": mse(eul, x_b), "teacher_finishes": mse(teacher_euler(eul, grid[kb:]), x0)},
        "random_error_same_size": {"at_boundary": mse(rnd, x_b), "teacher_finishes": mse(teacher_euler(rnd, grid[kb:]), x0)},
        "detail_from_teacher_x_b": {}, "full_dcm": {},
    }
    for n in detail_steps:
        sig = [s_b * (1 - j / n) for j in range(n)] + [0.0]
        out["detail_from_teacher_x_b"][str(n)] = {"detail": mse(expert_euler(DETAIL, x_b, sig), x0),
                                                  "teacher_euler": mse(teacher_euler(x_b, sig), x0)}
    for n in full_steps:
        out["full_dcm"][str(n)] = mse(sample_dcm(lambda x, s, e: velocity(dcm, x, s, ctx, e), noise, settings.grid(n),
                                                 settings.boundary_timestep), x0)
    return out


def _emit(res: dict, out: str | None) -> None:
    """Print a study's JSON, and write it to ``out`` too when given."""
    text = json.dumps(res, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcm_core.toy.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--teacher", help="diffusers teacher folder (e.g. dcm_core/toy/weights/teacher)")
    src.add_argument("--ckpt", help="a teacher run's ckpt.safetensors (EMA weights), e.g. runs/toy_v2/teacher_run/ckpt.safetensors")
    p.add_argument("--world", choices=("v1", "v2"), default=None, help="default: the checkpoint's, else v1")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--converged-steps", type=int, default=400)
    p.add_argument("--only", choices=("hardness", "shift", "spectral", "conditioning", "word-value", "cfg", "stages"),
                   default=None, help="one study (spectral, word-value: model-free, for v1 and v2, no teacher needed; "
                                      "stages: a bundle's DCM experts, --weights / --dcm)")
    p.add_argument("--pairs", type=int, default=32, help="stages: tuning prompt/seed pairs of the toy VBench")
    p.add_argument("--weights", default=None, help="stages: the bundle folder (default the bundled toy weights)")
    p.add_argument("--dcm", default=None, help="stages: another DCM file (e.g. a run's export) with the bundle's teacher")
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    if a.only == "stages":
        from . import models as M

        weights = Path(a.weights) if a.weights else M.WEIGHTS_DIR
        st = M.toy_settings(weights)
        teacher = M.load_teacher(weights)
        dcm = M.load_dcm_file(a.dcm, weights) if a.dcm else M.load_dcm(weights)
        res = stage_errors(teacher, dcm, st, n_pairs=a.pairs)
        res["dcm"] = a.dcm or str(weights / M.DCM_FILE)
        res["wall_seconds"] = round(time.time() - t0, 1)
        _emit(res, a.out)
        return 0
    if a.only in ("spectral", "word-value") or not (a.teacher or a.ckpt):
        if a.only not in (None, "spectral", "word-value"):
            p.error("--teacher or --ckpt is needed for the hardness, shift and conditioning studies")
        fn = word_value if a.only == "word-value" else spectral_decided
        res = {v: fn(world_v2.get_world(v)) for v in ((a.world,) if a.world else ("v1", "v2"))}
        _emit(res, a.out)
        return 0
    model, info = load_teacher(a.teacher, a.ckpt)
    world = world_v2.get_world(a.world or info.get("world", "v1"))
    res = {"teacher": info, "world": world.__name__.rsplit(".", 1)[-1], "cfg_scale": a.cfg}
    if a.only in (None, "conditioning"):
        res["conditioning"] = conditioning_sensitivity(model, world)
        res["word_separation"] = word_separation(model, world)
        res["position_probe"] = position_probe(model, world)
    if a.only in (None, "cfg"):
        res["cfg_study"] = cfg_study(model, world)
    if a.only in (None, "hardness"):
        res["hardness"] = hardness(model, world, n_prompts=a.prompts, cfg_scale=a.cfg)
    if a.only in (None, "shift"):
        res["shift_study"] = shift_study(model, world, n_prompts=a.prompts, converged_steps=a.converged_steps,
                                         cfg_scale=a.cfg)
    res["wall_seconds"] = round(time.time() - t0, 1)
    _emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
