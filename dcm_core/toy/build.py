"""``make toy-models`` / ``python -m dcm_core.toy.build``: rebuild the bundled toy models from scratch.

World v2 (the default; the bundled models). Every stage is project code; the distillation runs go through
the real trainer CLI, ``python -m dcm_core train``, exactly as a user would run them:

1. teacher      — the resumable flow-matching run of :mod:`dcm_core.toy.teacher_run` (checkpoints,
                  ``train.log``, ``eval.jsonl``) in ``<work>/teacher_run``;
2. dataset      — ``--clips`` world-v2 clips in the trainer's latent-dataset format (raw-latent convention:
                  ``latents.from_model_space``, so the trainer's normalisation gives back the toy latent),
                  with the empty prompt's embedding for the teacher's CFG;
3. DCM          — ``train --stage semantic`` (k ∈ 29..49 of the shift-3 grid → σ_prev[29] = 0.806,
                  pseudo-Huber + TC), then ``train --stage detail`` on it (LoRA + own embedder / head, EMA
                  target, hinge GAN + feature matching); the teacher's CFG as the trainer's ``w = scale − 1``;
4. baselines    — the paper's Table 1 at the same budget (both DCM stages' steps): an LCM-style single
                  expert (``schedule.k0=0``: one consistency phase over the whole trajectory) and a
                  PCM-style phased single expert (``schedule.k0=0 schedule.phases=4``);
5. ablations    — DCM without GAN / feature matching (always), and with ``--ablations`` DCM without the TC
                  loss (both stages retrained);
6. bundle       — teacher, DCM (``--detail-run``) and the LCM-style single expert into
                  ``dcm_core/toy/weights`` (bf16) with a manifest: commands, configs, seeds, wall times,
                  sha256, versions, and the ``toy`` section the demo, ``make toy-eval`` and the tests sample
                  with (world, grid shift, routing boundary, teacher CFG, recommended steps).

Resumable at every level: a killed build re-run with the same arguments continues the teacher from its
last checkpoint, skips finished trainer runs and continues killed ones (``--resume latest``). ``--jobs``
trainer runs go at once, one torch thread each. ``--world v1`` rebuilds the earlier flat world's models.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..latents import from_model_space
from ..schedule import FAMILY_WAN
from ..train.checkpoint import sha256_file
from . import models as M
from . import teacher as T
from . import teacher_run as TR
from . import world

log = logging.getLogger("DCM.toy")

#: Trainer overrides shared by every toy distillation run (the toy world, not the 1.3B recipe).
COMMON = [
    "mixed_precision=no",
    "guidance.cfg_scale=0",  # the toy teacher is sampled without CFG; the student follows the plain ODE
    "data.caption_dropout=0",
    "data.batch_size=8",
    "checkpoint.every_steps=200",
    "checkpoint.keep=1",
    "logging.progress_bar=false",
    "export.dtype=fp32",
]
SEMANTIC = ["optim.lr=1e-4", "optim.lr_scheduler=constant_with_warmup", "optim.lr_warmup_steps=20"]
#: The toy detail stage. Measured on this world (see README "Toy world"): the online consistency target
#: with lr ≥ 1e-4 (with or without GAN) drifts away from the teacher (6-step MSE 0.06 vs Euler's 0.014);
#: an EMA target (decay 0.95, the official code's EMA default) at lr 2e-5 for 200 steps beats Euler, and
#: the hinge GAN + feature matching did not help at this scale (its discriminator stays at chance), so
#: the bundled detail expert is trained without it and the GAN run is kept as an ablation (--ablations).
DETAIL = ["optim.lr=2e-5", "optim.lr_scheduler=constant", "optim.use_ema=true", "optim.ema_decay=0.95",
          "model.lora_rank=32", "model.lora_alpha=64", "loss.adv_weight=0"]
#: The single-expert baseline covers the whole trajectory in one phase, like the detail stage's long phase,
#: so it gets the detail stage's target and lr (with the semantic stage's lr 1e-4 and an online target it
#: collapsed to noise: 6-step MSE 0.31).
BASELINE = ["optim.lr=2e-5", "optim.lr_scheduler=constant", "optim.use_ema=true", "optim.ema_decay=0.95",
            "schedule.k0=0"]
DETAIL_GAN = ["loss.adv_weight=0.1", "disc.inner_channels=64", "disc.lr=1e-5"]


def write_dataset(root: Path, clips: int, seed: int) -> Path:
    """``clips`` v1-world clips in the trainer's latent-dataset format (see :func:`write_dataset_v2`)."""
    return write_dataset_v2(root, clips, seed, w=world)


def _train(stage: str, out: Path, overrides: list[str], log_file: Path) -> float:
    cmd = [sys.executable, "-m", "dcm_core", "train", "--stage", stage, f"output_dir={out}", *overrides]
    log.info("$ %s", " ".join(cmd))
    t0 = time.time()
    with open(log_file, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
    return time.time() - t0


def build(work: Path, *, teacher_steps: int, semantic_steps: int, detail_steps: int, clips: int, seed: int,
          ablations: bool, bundle: bool, weights_dir: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    times_file = work / "times.json"  # wall seconds of every stage built in this folder, kept across runs
    times: dict[str, float] = json.loads(times_file.read_text()) if times_file.exists() else {}
    commands: dict[str, list[str]] = {}
    t_all = time.time()

    def done(name: str, seconds: float) -> None:
        times[name] = seconds
        times_file.write_text(json.dumps(times, indent=1))

    teacher_dir = work / "teacher"
    if not (teacher_dir / "config.json").exists():
        t0 = time.time()
        T.train_teacher(T.TeacherConfig(steps=teacher_steps, seed=seed), out_dir=teacher_dir,
                        log_every=max(1, teacher_steps // 40), log_file=work / "teacher.log")
        done("teacher", time.time() - t0)
    data_dir = work / "data"
    if not (data_dir / "videos2caption.json").exists():
        t0 = time.time()
        write_dataset(data_dir, clips, seed)
        done("dataset", time.time() - t0)

    base = [f"model.pretrained={teacher_dir}", f"data.path={data_dir}", f"seed={seed}", *COMMON]

    def stage(name: str, st: str, extra: list[str], steps: int) -> Path:
        out = work / name
        ov = base + extra + [f"max_train_steps={steps}"]
        commands[name] = ["python", "-m", "dcm_core", "train", "--stage", st, f"output_dir={out}", *ov]
        if not (out / "export" / "export_info.json").exists():
            done(name, _train(st, out, ov, work / f"{name}.log"))
        return out / "export"

    sem = stage("semantic", "semantic", SEMANTIC, semantic_steps)
    det = stage("detail", "detail", DETAIL + [f"model.semantic_expert={sem}"], detail_steps)
    # the single-expert baseline gets the training budget of both DCM stages together
    vcm = stage("vcm", "semantic", BASELINE, semantic_steps + detail_steps)
    if ablations:
        sem_notc = stage("semantic_no_tc", "semantic", SEMANTIC + ["loss.tc_weight=0"], semantic_steps)
        stage("detail_no_tc", "detail", DETAIL + [f"model.semantic_expert={sem_notc}"], detail_steps)
        stage("detail_gan", "detail", DETAIL + DETAIL_GAN + [f"model.semantic_expert={sem}"], detail_steps)
    times["this_invocation"] = time.time() - t_all

    manifest = {
        **_manifest_head(seed),
        "teacher": {"architecture": T.TOY_WAN, "config": T.TeacherConfig(steps=teacher_steps, seed=seed).__dict__},
        "world": {"size": world.SIZE, "frames": world.FRAMES, "text_tokens": world.TEXT_TOKENS,
                  "dataset_clips": clips},
        "commands": commands,
        "wall_seconds": {k: round(v, 1) for k, v in times.items()},
        "files": {},
    }
    if bundle:
        _bundle(weights_dir, teacher_dir, det, vcm, manifest)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _copy_bf16(src: Path, dst: Path) -> None:
    """Re-save a safetensors file with every floating tensor in bf16, metadata kept (atomic)."""
    from safetensors import safe_open

    from ..formats import save_state_dict

    with safe_open(str(src), framework="pt") as f:
        meta = dict(sorted((f.metadata() or {}).items()))  # (a fixed order: same input, same bytes)
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    meta["dcm.toy.stored_dtype"] = "bf16"
    save_state_dict(sd, dst, meta)
    os.chmod(dst, 0o644)


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("diffusers", "peft", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    return out


# ============================================================================= world v2 (the bundled models)

#: The toy's routing boundary on its shift-3 grid: floor(1000·σ) ≤ 810 → detail expert. The semantic expert
#: takes σ > 0.81 (grid points k ≥ 29 of 50: K0 = 29, its phase ends at σ_prev[29] = 0.8056), where the
#: prompt's words decide the clip (the ideal denoiser's word value, :func:`dcm_core.toy.study.word_value`, is
#: spent above σ ≈ 0.75); on the toy grid 6 / 4 / 2 steps split 3 + 3 / 2 + 2 / 1 + 1 like the official lists.
TOY_BOUNDARY = 810.0
TOY_K0 = 29
#: Classifier-free guidance of the v2 teacher (reference samples, plain Euler, and the distillation targets:
#: the trainer's w = scale − 1). Chosen with ``python -m dcm_core.toy.study --only cfg`` on the studies' 24
#: prompt/seed pairs (disjoint from the toy VBench's): at step 2000 of the teacher run, scales 1 / 2 / 3 / 4 / 5
#: got motion right on 33 / 29 / 29 / 21 / 25 % of samples and raised the samples' HF energy 0.19 → 0.43 against
#: the world's own 0.19 (over-sharpened textures), so the teacher is sampled and distilled without CFG.
TOY_CFG = 1.0
#: The toy discriminator's learning rate (official 1e-5 for a 1024-channel head on a 1.3B backbone).
TOY_DISC_LR = 1e-4
#: The detail-stage run bundled as the DCM experts: the official recipe's hinge GAN + feature matching is trained
#: too ("detail") but not bundled. Measured (``python -m dcm_core.toy.vbench --tune``, 32 tuning pairs): MSE to the
#: teacher 0.0302 / 0.0306 / 0.0353 without it against 0.0309 / 0.0321 / 0.0368 with it at 2 / 4 / 6 steps. Why
#: it adds nothing here: its discriminator stays at chance (hinge loss ≈ 2, see the README). DCM's "real" and
#: "fake" are the target network's and the student's jumps, re-noised with one shared noise; they differ by far
#: less than the noise, and a 64-channel head on 3-block teacher features does not tell them apart.
TOY_DETAIL_RUN = "detail_no_gan"

V2_COMMON = [
    "mixed_precision=no",
    "data.caption_dropout=0",
    "data.batch_size=8",
    "checkpoint.every_steps=100",
    "checkpoint.keep=1",
    "logging.progress_bar=false",
    "export.dtype=fp32",
    f"schedule.shift={TR.TOY_SHIFT:g}",
    f"schedule.boundary_timestep={TOY_BOUNDARY:g}",
]


#: The toy's DCM budget (world v2). Measured with ``python -m dcm_core.toy.study --only stages`` on the toy
#: VBench's tuning pairs: the semantic expert's error at the boundary, carried to σ 0 by the teacher, fell from
#: MSE 0.014 after 400 steps to 0.008 after 600 (0.009 at 800, 0.013 at 1000: constant lr, no further gain);
#: the detail stage at lr 2e-5 / rank 32 for 200 steps left DCM at 0.030 (4 steps); at lr 1e-4 for 400 steps
#: rank 128 gave 0.022. The LoRA rank is 64, not the official 128, to keep the bundle within 30 MB.
TOY_SEMANTIC_STEPS, TOY_DETAIL_STEPS = 600, 400
TOY_DETAIL_LR, TOY_LORA_RANK = 1e-4, 64


def v2_stages(semantic_steps: int, detail_steps: int, ablations: bool,
              detail_run: str = "detail_no_gan") -> dict[str, dict]:
    """The distillation runs of world v2: name → {stage, overrides, after (the run whose export it needs)}.

    Every single-expert baseline gets the budget of both DCM stages together (the paper's Table 1 compares
    at equal training cost). The no-TC ablation's detail stage uses the bundled detail run's recipe, so it
    differs from the bundled DCM in the TC loss only."""
    sem = ["optim.lr=1e-4", "optim.lr_scheduler=constant_with_warmup", "optim.lr_warmup_steps=20",
           f"schedule.k0={TOY_K0}"]
    det = [f"optim.lr={TOY_DETAIL_LR:g}", "optim.lr_scheduler=constant", "optim.use_ema=true", "optim.ema_decay=0.95",
           f"model.lora_rank={TOY_LORA_RANK}", f"model.lora_alpha={2 * TOY_LORA_RANK}", f"schedule.k0={TOY_K0}"]
    gan = ["loss.adv_weight=0.1", "disc.inner_channels=64", f"disc.lr={TOY_DISC_LR:g}"]
    single = ["optim.lr=2e-5", "optim.lr_scheduler=constant", "optim.use_ema=true", "optim.ema_decay=0.95"]
    both = semantic_steps + detail_steps
    out = {
        "semantic": dict(stage="semantic", overrides=sem, steps=semantic_steps),
        "detail": dict(stage="detail", overrides=det + gan, steps=detail_steps, after="semantic"),
        # LCM-style: one consistency phase over the whole trajectory
        "lcm": dict(stage="semantic", overrides=single + ["schedule.k0=0"], steps=both),
        # PCM-style: one model, four phases (a consistency target at the end of each)
        "pcm": dict(stage="semantic", overrides=single + ["schedule.k0=0", "schedule.phases=4"], steps=both),
        # DCM without GAN / feature matching (the detail stage's consistency loss alone)
        "detail_no_gan": dict(stage="detail", overrides=det + ["loss.adv_weight=0"], steps=detail_steps, after="semantic"),
    }
    if ablations:  # DCM without the TC loss (both stages retrained: the semantic expert changes)
        out["semantic_no_tc"] = dict(stage="semantic", overrides=sem + ["loss.tc_weight=0"], steps=semantic_steps)
        no_tc_detail = det + (gan if detail_run == "detail" else ["loss.adv_weight=0"])
        out["detail_no_tc"] = dict(stage="detail", overrides=no_tc_detail, steps=detail_steps, after="semantic_no_tc")
    return out


def write_dataset_v2(root: Path, clips: int, seed: int, w=None) -> Path:
    """``clips`` world-v2 clips (every prompt in turn, a fresh texture / background / start per clip) in the
    trainer's latent-dataset format, with the unconditional embedding for the teacher's CFG (``w``: another
    world module with the same interface, e.g. v1)."""
    from ..train.data import write_latent_dataset
    from . import world_v2

    W = w or world_v2

    rng = np.random.default_rng(seed)
    prompts = W.all_prompts()
    items = []
    for i in range(clips):
        p = prompts[i % len(prompts)]
        clip = W.make_clip(p, int(rng.integers(2**62)))
        n = len(p.split())
        items.append({
            "name": f"clip{i:05d}",
            "latent": from_model_space(clip.latent[None], FAMILY_WAN)[0],
            "prompt_embed": W.encode_text(p),
            "prompt_attention_mask": torch.tensor([1] * n + [0] * (W.TEXT_TOKENS - n)),
            "caption": p,
        })
    uncond = (W.encode_text(""), torch.zeros(W.TEXT_TOKENS, dtype=torch.long))
    return write_latent_dataset(root, items, uncond=uncond)


STAMP = "build_stamp.json"


def _export_id(export: Path) -> str:
    """Identity of a finished run's export (its export_info.json records the step and the export time)."""
    return hashlib.sha256((export / "export_info.json").read_bytes()).hexdigest()[:16]


def _up_to_date(out: Path, stamp: dict, previous: dict | None, steps: int, dep: Path | None) -> bool:
    """Whether the finished run in ``out`` was made by the command and from the dependency in ``stamp``
    (``previous``: the stamp it was made under, None when none). Runs finished before stamps existed count
    as current when their step count matches and their dependency's export is older than theirs."""
    info_file = out / "export" / "export_info.json"
    if not info_file.exists():
        return False
    if previous is not None:
        return previous == stamp
    if json.loads(info_file.read_text()).get("step") != steps:
        return False
    return dep is None or (dep / "export_info.json").stat().st_mtime <= info_file.stat().st_mtime


def _set_aside(out: Path, log_file: Path) -> Path:
    """Move a stale run (and its log) out of the way; nothing is deleted."""
    n = 1
    while out.with_name(f"{out.name}.stale-{n}").exists():
        n += 1
    aside = out.with_name(f"{out.name}.stale-{n}")
    out.rename(aside)
    if log_file.exists():
        log_file.rename(aside / "build.log")
    return aside


def _run_stage(name: str, spec: dict, work: Path, base: list[str], exports: dict[str, Path],
               inputs_id: str = "") -> tuple[list[str], float | None, bool]:
    """One trainer run through the user's CLI; skipped when its export is up to date (same command, same
    dependency export, same teacher and dataset: ``inputs_id``), continued (``--resume latest``) when a
    killed run left a checkpoint, set aside to ``<run>.stale-N`` and retrained when its command, teacher,
    dataset or dependency changed (e.g. other step counts).
    Returns (command, wall seconds or None when skipped, resumed)."""
    out = work / name
    ov = base + list(spec["overrides"]) + [f"max_train_steps={spec['steps']}"]
    dep = exports[spec["after"]] if spec.get("after") else None
    if dep is not None:
        ov.append(f"model.semantic_expert={dep}")
    cmd = ["python", "-m", "dcm_core", "train", "--stage", spec["stage"], f"output_dir={out}", *ov]
    stamp = {"command": cmd, "after": _export_id(dep) if dep is not None else None, "inputs": inputs_id}
    log_file = work / f"{name}.log"
    previous = json.loads((out / STAMP).read_text()) if (out / STAMP).exists() else None
    if _up_to_date(out, stamp, previous, spec["steps"], dep):
        (out / STAMP).write_text(json.dumps(stamp, indent=1))
        return cmd, None, False
    if (out / "export" / "export_info.json").exists() or previous not in (None, stamp):
        why = f"another command, teacher, dataset or {spec['after']} export" if dep else "another command, teacher or dataset"
        log.info("[%s] stale (%s): set aside to %s; retraining", name, why, _set_aside(out, log_file).name)
    extra = ["--resume", "latest"] if any((out / "checkpoints").glob("checkpoint-*")) else []
    if not extra:
        out.mkdir(parents=True, exist_ok=True)
        (out / STAMP).write_text(json.dumps(stamp, indent=1))  # a killed run continues only under this command
    log.info("[%s] $ %s", name, " ".join(cmd + extra))
    t0 = time.time()
    with open(log_file, "a") as f:
        subprocess.run([sys.executable, *cmd[1:], *extra], check=True, stdout=f, stderr=subprocess.STDOUT,
                       cwd=Path(__file__).resolve().parents[2])
    return cmd, time.time() - t0, bool(extra)


def build_v2(work: Path, *, cfg: "TR.RunConfig", semantic_steps: int, detail_steps: int, clips: int, seed: int,
             ablations: bool, bundle: bool, weights_dir: Path, jobs: int = 2, teacher_cfg: float = TOY_CFG,
             detail_run: str = TOY_DETAIL_RUN) -> dict:
    """``make toy-models``: teacher → dataset → DCM (semantic, detail) + baselines (+ ablations) → bundle.

    Resumable at every level: the teacher run continues from its checkpoint, finished trainer runs are skipped,
    killed ones continue from theirs. ``jobs`` trainer runs go at once (one torch thread each)."""
    from concurrent.futures import ThreadPoolExecutor

    work.mkdir(parents=True, exist_ok=True)
    times_file = work / "times.json"
    times: dict[str, float] = json.loads(times_file.read_text()) if times_file.exists() else {}
    t_all = time.time()

    def done(name: str, seconds: float | None, resumed: bool = False) -> None:
        if seconds is not None:  # a resumed run adds its invocations; a fresh one (re)starts the count
            times[name] = (times.get(name, 0.0) if resumed else 0.0) + seconds
            times_file.write_text(json.dumps(times, indent=1))

    run = work / "teacher_run"
    teacher_dir = run / "teacher"
    if not (teacher_dir / "config.json").exists():
        t0 = time.time()
        TR.train(cfg, run, resume=True)
        done("teacher", time.time() - t0)
    elif "teacher" not in times and (run / "train.log").exists():  # trained by `--teacher-only`: its log's rate
        times["teacher"] = _teacher_seconds_from_log(run / "train.log")
    data_dir = work / "data"
    if not (data_dir / "videos2caption.json").exists():
        t0 = time.time()
        write_dataset_v2(data_dir, clips, seed)
        done("dataset", time.time() - t0)

    w = max(0.0, teacher_cfg - 1.0)  # the trainer's CFG w: v_c + w·(v_c − v_u)
    base = [f"model.pretrained={teacher_dir}", f"data.path={data_dir}", f"seed={seed}", f"guidance.cfg_scale={w:g}",
            *V2_COMMON]
    # the teacher's weights and the dataset: a run made from other ones is retrained
    inputs_id = hashlib.sha256((sha256_file(teacher_dir / "diffusion_pytorch_model.safetensors")
                                + sha256_file(data_dir / "videos2caption.json")).encode()).hexdigest()[:16]
    stages = v2_stages(semantic_steps, detail_steps, ablations, detail_run)
    exports = {name: work / name / "export" for name in stages}
    commands: dict[str, list[str]] = {}
    pending = dict(stages)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures: dict[str, Any] = {}
        while pending or futures:
            for name, spec in list(pending.items()):
                dep = spec.get("after")
                if dep is None or (dep not in pending and dep not in futures):
                    futures[name] = pool.submit(_run_stage, name, spec, work, base, exports, inputs_id)
                    del pending[name]
            finished = [n for n, f in futures.items() if f.done()]
            if not finished:
                time.sleep(0.5)
                continue
            for n in finished:
                cmd, seconds, resumed = futures.pop(n).result()  # raises when a run failed
                commands[n] = cmd
                done(n, seconds, resumed)
    times["this_invocation"] = time.time() - t_all

    manifest = {
        **_manifest_head(seed),
        "toy": {"world": cfg.world, "shift": TR.TOY_SHIFT, "boundary_timestep": TOY_BOUNDARY, "k0": TOY_K0,
                "teacher_cfg": teacher_cfg, "recommended_steps": 4},
        "teacher": {"architecture": cfg.arch, "config": asdict(cfg),
                    "command": "python -m dcm_core.toy.build --work " + str(work)},
        "world": {"version": cfg.world, "size": world.SIZE, "frames": world.FRAMES, "text_tokens": world.TEXT_TOKENS,
                  "dataset_clips": clips},
        "commands": commands,
        "wall_seconds": {k: round(v, 1) for k, v in times.items()},
        "files": {},
    }
    if bundle:
        manifest["toy"]["bundled"] = {"dcm": detail_run, "single_expert": "lcm"}
        _bundle(weights_dir, teacher_dir, exports[detail_run], exports["lcm"], manifest)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _manifest_head(seed: int) -> dict:
    """What every bundle manifest starts with: who made it, when, where, with which versions and seed."""
    return {
        "made_by": "python -m dcm_core.toy.build (make toy-models)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **_versions()},
        "seed": seed,
    }


def _teacher_seconds_from_log(path: Path) -> float:
    """Wall seconds (approximate) of a finished teacher run from its ``train.log`` (each line: step and the mean s/step of the
    invocation that wrote it; a resumed run adds its invocations)."""
    total, start, last = 0.0, 0, (0, 0.0)
    for line in path.read_text().splitlines():
        parts = line.split()
        step, rate = int(parts[1].split("/")[0]), float(parts[parts.index("s/step") - 1])
        if step <= last[0]:  # a resumed invocation starts: close the previous one
            total += (last[0] - start) * last[1]
            start = step - 1
        last = (step, rate)
    return total + (last[0] - start) * last[1]


def _bundle(weights_dir: Path, teacher_dir: Path, det: Path, single: Path, manifest: dict) -> None:
    weights_dir.mkdir(parents=True, exist_ok=True)
    tdst = weights_dir / M.TEACHER_DIR
    tdst.mkdir(exist_ok=True)
    shutil.copyfile(teacher_dir / "config.json", tdst / "config.json")
    # bf16 keeps the bundle small; the loaders upcast to fp32
    _copy_bf16(teacher_dir / "diffusion_pytorch_model.safetensors", tdst / "diffusion_pytorch_model.safetensors")
    _copy_bf16(det / "transformer" / "diffusion_pytorch_model.safetensors", weights_dir / M.DCM_FILE)
    _copy_bf16(single / "transformer" / "diffusion_pytorch_model.safetensors", weights_dir / M.VCM_FILE)
    for p in sorted(weights_dir.rglob("*.safetensors")) + [tdst / "config.json"]:
        manifest["files"][p.relative_to(weights_dir).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    (weights_dir / M.MANIFEST).write_text(json.dumps(manifest, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcm_core.toy.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="working folder for runs and logs (default runs/toy_v2; runs/toy for --world v1)")
    p.add_argument("--world", choices=("v1", "v2"), default="v2",
                   help="toy world: v2 (default; the bundled models: textured objects) or v1 (the earlier flat world)")
    p.add_argument("--teacher-only", action="store_true",
                   help="v2: train only the teacher (resumable run in <work>/teacher_run: checkpoints, train.log, eval.jsonl)")
    p.add_argument("--resume", action="store_true",
                   help="v2 --teacher-only: continue the teacher run from its last checkpoint (the full build always resumes)")
    p.add_argument("--arch", default=None, metavar="DIM,LAYERS,FFN",
                   help="v2: teacher architecture (default %s)" % ",".join(str(v) for v in TR.TOY_WAN_V2.values()))
    p.add_argument("--batch-size", type=int, default=None, help="v2: teacher batch size (default 16)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help=f"teacher training steps (default v2 {TR.RunConfig.steps}, v1 {T.TeacherConfig.steps})")
    p.add_argument("--teacher-cfg", type=float, default=TOY_CFG,
                   help=f"v2: the teacher's CFG scale for reference samples and distillation targets (default {TOY_CFG:g})")
    p.add_argument("--semantic-steps", type=int, default=None,
                   help=f"semantic-stage steps (default v2 {TOY_SEMANTIC_STEPS}, v1 600)")
    p.add_argument("--detail-steps", type=int, default=None, help=f"detail-stage steps (default v2 {TOY_DETAIL_STEPS}, v1 200)")
    p.add_argument("--detail-run", choices=("detail", "detail_no_gan"), default=TOY_DETAIL_RUN,
                   help=f"v2: which detail-stage run is bundled as the DCM experts (default {TOY_DETAIL_RUN})")
    p.add_argument("--clips", type=int, default=1024, help="clips in the distillation dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="v2: trainer runs at once, one thread each (default 2)")
    p.add_argument("--ablations", action="store_true",
                   help="also train the ablations (v2: DCM without the TC loss; DCM without GAN/FM and the "
                        "LCM / PCM baselines are always trained)")
    p.add_argument("--no-bundle", action="store_true", help="do not copy the results into the bundled weights folder")
    p.add_argument("--weights-dir", default=str(M.WEIGHTS_DIR))
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One thread by default: on a busy 2-core machine two intra-op threads spin against each other
    # and training becomes many times slower (measured); --threads 2 helps only on an idle machine.
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # for the trainer subprocesses
    if a.world == "v2":
        return _main_v2(a)
    m = build(Path(a.work or "runs/toy"), teacher_steps=a.teacher_steps or T.TeacherConfig.steps,
              semantic_steps=a.semantic_steps or 600, detail_steps=a.detail_steps or 200, clips=a.clips, seed=a.seed,
              ablations=a.ablations, bundle=not a.no_bundle, weights_dir=Path(a.weights_dir))
    print(json.dumps(m["wall_seconds"], indent=1))
    return 0


def _main_v2(a: argparse.Namespace) -> int:
    cfg = TR.RunConfig(seed=a.seed)
    if a.teacher_steps:
        cfg.steps = a.teacher_steps
    if a.arch:
        dim, layers, ffn = (int(v) for v in a.arch.split(","))
        cfg.arch = dict(dim=dim, num_layers=layers, ffn_dim=ffn)
    if a.batch_size:
        cfg.batch_size = a.batch_size
    work = Path(a.work or "runs/toy_v2")
    run = work / "teacher_run"
    try:
        if a.teacher_only:
            TR.train(cfg, run, resume=a.resume)
            print(f"teacher: {run / 'teacher'} (log {run / 'train.log'}, scores {run / 'eval.jsonl'})")
            return 0
        m = build_v2(work, cfg=cfg, semantic_steps=a.semantic_steps or TOY_SEMANTIC_STEPS,
                     detail_steps=a.detail_steps or TOY_DETAIL_STEPS,
                     clips=a.clips, seed=a.seed, ablations=a.ablations, bundle=not a.no_bundle,
                     weights_dir=Path(a.weights_dir), jobs=a.jobs, teacher_cfg=a.teacher_cfg, detail_run=a.detail_run)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: a trainer run failed ({e}); its log is in {work}/<run>.log — fix and re-run to continue",
              file=sys.stderr)
        return 1
    print(json.dumps(m["wall_seconds"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
