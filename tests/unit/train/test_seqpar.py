"""Sequence parallelism (parallel.sequence_parallel, dcm_core/train/seqpar.py).

The equality test launches the CLI under ``accelerate launch`` with two CPU processes (gloo) and
``parallel.sequence_parallel=2`` — diffusers' Ulysses context parallelism splits each clip's tokens over the
two processes — and compares it with one process: per-step losses and gradient norms (generator and
discriminator) and the weights after three steps of each stage. The only thing the child process changes is
``torch.accelerator.device_count`` (0 on a CPU-only torch; see seqpar_child.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dcm_core.errors import DCMConfigError
from dcm_core.train.seqpar import SequenceParallel

ROOT = Path(__file__).resolve().parents[3]
CHILD = Path(__file__).with_name("seqpar_child.py")
# two heads (Ulysses gives each process one), 5 x 4 x 4 = 80 tokens (40 per process)
TWO_HEADS = "{dim = 256, num_layers = 2, ffn_dim = 256}"
STEPS = 3
#: |a − b| ≤ REL·|a| + ABS for the logged losses and gradient norms
REL, ABS = 1e-5, 1e-9
#: max |Δw| between the runs (AdamW turns fp32 rounding of near-zero gradients into ~1e-6 steps at lr 1e-4;
#: measured 1.0e-6), and the least max |Δw| of a run between steps 1 and 3 (measured 2e-4: the weights do move)
W_TOL, W_MOVED = 5e-6, 1e-4
#: the validation sample (4 sampler steps, latents up to ~12): max |Δ| ≤ V_REL · max |x| (measured 4.1e-7)
V_REL = 2e-6


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"checkpoint-{step:08d}"


def _weights(ckpt: Path, name: str) -> dict:
    """A checkpoint's tensors: ``name`` (safetensors), or under FSDP the trainable weights from the DCP shards."""
    from dcm_core.train import checkpoint as ck

    if name == "trainable.safetensors" and ck.is_sharded(ckpt):
        return {k[len("trainable."):]: t for k, t in ck.read_sharded(ckpt, "trainable.").items()}
    return load_file(str(ckpt / name))


LAUNCH = {
    "ddp": ["--multi_gpu"],
    "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp2"])
@pytest.mark.parametrize("stage", ["semantic", "detail"])
def test_two_processes_sequence_parallel_equal_one_process(stage, launch, tmp_path, th):
    from dcm_core.train.trainer import train

    data = th.make_dataset(tmp_path / "data", "wan", n=4)
    extra = {
        "model__tiny_config": TWO_HEADS,
        "max_train_steps": STEPS,
        "optim__lr": 1e-4,  # large enough for the weights to move well beyond the tolerance in 3 steps
        "disc__lr": 1e-4,
        "checkpoint__every_steps": 1,
        "checkpoint__keep": 0,
        "validation__every_steps": STEPS,  # sampling runs on every process of the group
    }
    one, two = tmp_path / "one", tmp_path / "sp2"
    train(th.tiny_config("wan", stage, data, one, **extra))

    env = th.subprocess_env()
    env.update({"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""})
    cmd = _accelerate() + [
        "launch", *LAUNCH[launch], "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0",
        str(CHILD), "train", "--stage", stage, *th.tiny_overrides("wan", data, two, **extra), "parallel.sequence_parallel=2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sequence parallel: 2 processes per clip (40 tokens each), 1 data-parallel group(s)" in proc.stderr
    assert ("2 process(es) (FSDP2)" in proc.stderr) == (launch == "fsdp2")

    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, STEPS + 1))
    keys = ["loss", "loss_cd", "grad_norm"] + (["loss_tc"] if stage == "semantic" else ["loss_g", "loss_fm", "loss_d", "d_grad_norm"])
    worst = 0.0
    for a, b in zip(m1, m2):
        for k in keys:
            assert math.isclose(a[k], b[k], rel_tol=REL, abs_tol=ABS), (a["step"], k, a[k], b[k])
            if abs(a[k]) * REL > ABS:  # (values below 1e-4 are held to ABS)
                worst = max(worst, abs(a[k] - b[k]) / abs(a[k]))

    # the validation sample and the export at the end (written by process 0 from the sequence-parallel student)
    val = f"validation/step-{STEPS:08d}.safetensors"
    exp = "export/transformer/diffusion_pytorch_model.safetensors"
    for rel, tol in ((val, V_REL), (exp, None)):
        a, b = load_file(str(one / rel)), load_file(str(two / rel))
        assert set(a) == set(b)
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        scale = max(a[k].abs().max().item() for k in a)
        print(f"{stage} {launch} {rel}: max |1proc - sp2| = {diff:.3g} (max |x| {scale:.3g})")
        assert diff <= (tol * scale if tol else W_TOL), (rel, diff)

    names = ["trainable.safetensors"] + (["discriminator.safetensors"] if stage == "detail" else [])
    for name in names:
        w1, w2 = _weights(_ckpt(one, STEPS), name), _weights(_ckpt(two, STEPS), name)
        first = _weights(_ckpt(one, 1), name)
        assert set(w1) == set(w2)
        diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        moved = max((w1[k] - first[k]).abs().max().item() for k in w1)
        print(f"{stage} {launch} {name}: max |w_1proc - w_sp2| = {diff:.3g}, max |w(step {STEPS}) - w(step 1)| = {moved:.3g}; "
              f"worst relative loss / grad-norm difference {worst:.3g}")
        assert moved > W_MOVED, (name, moved)
        assert diff <= W_TOL, (name, diff)


# ---------------------------------------------------------------------------- refusals (no processes needed)


def _acc(n: int = 2) -> SimpleNamespace:
    return SimpleNamespace(num_processes=n, device=torch.device("cpu"))


def test_degree_one_is_off():
    assert SequenceParallel.create(_acc(), 1, "wan") is None


def test_degree_must_divide_processes():
    with pytest.raises(DCMConfigError, match=r"sequence_parallel=2 must divide the number of processes \(3\)"):
        SequenceParallel.create(_acc(3), 2, "wan")


def test_hunyuan_is_refused():
    with pytest.raises(DCMConfigError, match="for Wan only"):
        SequenceParallel.create(_acc(), 2, "hunyuan_video")


def test_cpu_only_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 0)
    with pytest.raises(DCMConfigError, match="needs GPUs"):
        SequenceParallel.create(_acc(), 2, "wan")


def test_heads_and_tokens_must_divide():
    from dcm_core.tiny import build_transformer, wan_config

    sp = SequenceParallel(degree=2, dp_size=1, dp_rank=0, mesh=None)
    one_head = build_transformer("wan", wan_config(dim=128))
    with pytest.raises(DCMConfigError, match=r"num_attention_heads \(1\)"):
        sp.check_model(one_head, 80, "x")
    two_heads = build_transformer("wan", wan_config(dim=256))
    with pytest.raises(DCMConfigError, match=r"token count \(75, latent"):
        sp.check_model(two_heads, 75, "latent (16, 3, 10, 10)")
    sp.check_model(two_heads, 80, "x")


def test_config_key_is_checked_and_documented(th, tmp_path):
    with pytest.raises(DCMConfigError, match="parallel.sequence_parallel=0"):
        th.tiny_config("wan", "semantic", tmp_path, tmp_path / "o", parallel__sequence_parallel=0).resolved("wan")
    out = subprocess.run(
        [sys.executable, "-m", "dcm_core", "train", "--help-config"], cwd=ROOT, env=th.subprocess_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0 and "parallel.sequence_parallel = 1" in out.stdout, out.stderr[-2000:]


def test_plan_divides_the_activations(tmp_path, th):
    """`train --plan`: the blocks' activations and the discriminator's frames are split over the sequence group."""
    from dcm_core.train.plan import make_plan

    def plan(sp: int, gpus: int = 4):
        cfg = th.tiny_config("wan", "detail", tmp_path / "none", tmp_path / "run", model__gradient_checkpointing="true",
                             model__tiny_config="{dim = 256, num_layers = 4, ffn_dim = 512}", parallel__sequence_parallel=sp)
        return make_plan(cfg, video=(81, 480, 832), num_gpus=gpus)

    one, four = plan(1), plan(4)
    items1, items4 = ({n: b for n, b, _ in p.items} for p in (one, four))
    assert "sequence parallel 4 (8,190 tokens per process)" in four.title
    for key in ("student activations", "teacher activations (G step on fake)"):
        # the blocks / 4; the patch embedding and the gathered output stay whole (measured 0.33 at 4 tiny blocks)
        assert 0.25 < items4[key] / items1[key] < 0.4, (key, items4[key] / items1[key])
    # 21 latent frames over 4 processes: at most 6 frames each
    assert items4["discriminator features (fake + real)"] / items1["discriminator features (fake + real)"] == 6 / 21
    assert items4["student weights (fp32)"] == items1["student weights (fp32)"]  # weights are not split by it
    with pytest.raises(DCMConfigError, match="must divide --num-gpus 3"):
        plan(2, gpus=3)
