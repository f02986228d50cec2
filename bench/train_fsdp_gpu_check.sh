#!/usr/bin/env bash
# FSDP check of the DCM trainer on 2 NVIDIA GPUs (NCCL), tiny random Wan, no network, ~2-4 min.
# What the CPU tests (tests/unit/train/test_fsdp.py, gloo) cannot reach: accelerate's real
# DistributedType.FSDP path (its FSDP plugin object), the CUDA device mesh / NCCL collectives, DDP with
# device_ids for the discriminator, bf16 autocast on CUDA.
#
#   bash bench/train_fsdp_gpu_check.sh [OUT_DIR]          # needs >= 2 GPUs
#   bash bench/train_fsdp_gpu_check.sh --cpu [OUT_DIR]    # the same flow on 2 CPU processes (logic check)
#
# Runs (fp32 unless said; NVIDIA_TF32_OVERRIDE=0 so cuBLAS / cuDNN stay in true fp32):
#   1. semantic stage, 2 steps: FSDP on 2 GPUs x batch 1   vs   1 GPU x batch 2 (same global batch)
#   2. detail stage on run 1's 1-GPU semantic expert, 4 steps, EMA, checkpoints at 2 and 4: FSDP vs 1 GPU
#   3. resume: FSDP detail run stopped after step 2, `--resume latest` to step 4 == run 2's FSDP step 4 (torch.equal)
#   4. bf16 autocast + FSDP activation checkpointing, both stages: finite, in the ballpark of a 1-GPU bf16 run
#      (bf16 rounding differs between batch 1 and batch 2: weights within 2e-3, Adam moments within 50 %)
#   5. (GPUs only) the official Wan detail recipe at the Wan-1.3B shape on one 480x832x81 clip (512 text tokens),
#      FSDP2 over 2 GPUs (bf16 all-gathers), teacher replicated and then parallel.shard_teacher=true:
#      `train --plan` next to the measured peak CUDA memory and a "fits / does NOT fit on an 80 GB card" line
# Checkpoints under FSDP are sharded (DCP, checkpoint-N/sharded/): they are compared through
# dcm_core.train.checkpoint.sharded_as_files (read whole, the unsharded layout).
# The GPU part (5. and everything on NCCL) was written without a GPU: not run yet.
# and prints PASS/FAIL per check (fp32: the tolerances of test_fsdp.py) and the mean step times.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ACC=${ACC:-$(dirname "$PY")/accelerate}
CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
OUT=${1:-$(mktemp -d /tmp/dcm_fsdp_check.XXXXXX)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} NVIDIA_TF32_OVERRIDE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ $CPU = 1 ]; then
    export ACCELERATE_USE_CPU=true CUDA_VISIBLE_DEVICES=
    ONE=()
else
    n=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
    if [ "$n" -lt 2 ]; then echo "train_fsdp_gpu_check.sh: needs 2 GPUs (found $n); use --cpu for the logic check" >&2; exit 2; fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -2
    ONE=(env CUDA_VISIBLE_DEVICES=0)
fi
echo "output: $OUT"
CFG=dcm_core/train/configs
"$PY" - "$OUT/data" <<'EOF'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("h", "tests/unit/train/conftest.py")
h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)
h.make_dataset(Path(sys.argv[1]), "wan", n=4)
EOF
COMMON=(data.path="$OUT/data" optim.lr=1e-4 logging.progress_bar=false)
SEM=(checkpoint.every_steps=0 validation.every_steps=2)
DET=(max_train_steps=4 checkpoint.every_steps=2 checkpoint.keep=0 optim.use_ema=true data.caption_dropout=0.5
     validation.every_steps=4 model.semantic_expert="$OUT/sem_1")

fsdp() {  # fsdp MIXED_PRECISION [extra accelerate flags] -- train args
    local mp=$1; shift
    local flags=()
    while [ "$1" != "--" ]; do flags+=("$1"); shift; done; shift
    timeout 600 "$ACC" launch --use_fsdp --fsdp_version 2 --fsdp_reshard_after_forward true --num_processes 2 \
        --num_machines 1 --mixed_precision "$mp" --dynamo_backend no --main_process_port 0 "${flags[@]}" \
        -m dcm_core train "$@" 2>&1 | grep -E "FSDP|process\(es\)|resumed|finished|Error|error" || true
}
one() { timeout 600 "${ONE[@]}" "$PY" -m dcm_core train "$@" data.batch_size=2 2>&1 | grep -E "finished|Error|error" || true; }

echo "== 1. semantic, fp32"
one --config $CFG/tiny_wan_semantic.toml "${COMMON[@]}" "${SEM[@]}" output_dir="$OUT/sem_1"
fsdp no -- --config $CFG/tiny_wan_semantic.toml "${COMMON[@]}" "${SEM[@]}" output_dir="$OUT/sem_fsdp"
echo "== 2. detail, fp32"
one --config $CFG/tiny_wan_detail.toml "${COMMON[@]}" "${DET[@]}" output_dir="$OUT/det_1"
fsdp no -- --config $CFG/tiny_wan_detail.toml "${COMMON[@]}" "${DET[@]}" output_dir="$OUT/det_fsdp"
echo "== 3. resume under FSDP"
fsdp no -- --config $CFG/tiny_wan_detail.toml "${COMMON[@]}" "${DET[@]}" output_dir="$OUT/det_resume" max_train_steps=2 export.at_end=false
fsdp no -- --config $CFG/tiny_wan_detail.toml "${COMMON[@]}" "${DET[@]}" output_dir="$OUT/det_resume" --resume latest
echo "== 4. bf16 autocast + activation checkpointing"
BF=(mixed_precision=bf16)
one --config $CFG/tiny_wan_semantic.toml "${COMMON[@]}" "${SEM[@]}" "${BF[@]}" model.gradient_checkpointing=true output_dir="$OUT/sem_bf16_1"
fsdp bf16 --fsdp_activation_checkpointing true -- --config $CFG/tiny_wan_semantic.toml "${COMMON[@]}" "${SEM[@]}" "${BF[@]}" output_dir="$OUT/sem_bf16_fsdp"
one --config $CFG/tiny_wan_detail.toml "${COMMON[@]}" "${DET[@]}" "${BF[@]}" model.gradient_checkpointing=true output_dir="$OUT/det_bf16_1"
fsdp bf16 --fsdp_activation_checkpointing true -- --config $CFG/tiny_wan_detail.toml "${COMMON[@]}" "${DET[@]}" "${BF[@]}" output_dir="$OUT/det_bf16_fsdp"

if [ $CPU = 0 ]; then
    echo "== 5. real scale: Wan-1.3B shape, official detail recipe (bf16, checkpointing, r128, 1024-wide heads), one"
    echo "      480x832x81 clip (16x21x60x104 latent, 512 text tokens), FSDP2 over 2 GPUs, 3 steps: peak CUDA memory"
    "$PY" - "$OUT/data_480p" <<'EOF'
import sys, torch
from pathlib import Path
from dcm_core.train.data import write_latent_dataset
g = torch.Generator().manual_seed(0)
items = [dict(name=f"c{i}", latent=torch.randn(16, 21, 60, 104, generator=g), prompt_embed=torch.randn(512, 4096, generator=g) * 0.5,
              prompt_attention_mask=torch.ones(512, dtype=torch.bool), caption="c") for i in range(2)]
write_latent_dataset(Path(sys.argv[1]), items, uncond=(torch.zeros(512, 4096), torch.zeros(512, dtype=torch.bool)))
EOF
    WAN13="model.tiny_config={dim = 1536, num_layers = 30, ffn_dim = 8960}"
    R=(--config $CFG/wan_detail.toml model.pretrained=tiny:wan "$WAN13" data.path="$OUT/data_480p" 'model.semantic_expert=""'
       max_train_steps=3 checkpoint.every_steps=0 validation.every_steps=0 export.at_end=false logging.progress_bar=false)
    "$PY" -m dcm_core train "${R[@]}" output_dir="$OUT/det_480p" --plan --num-gpus 2 --gpu-memory 80 || true
    fsdp bf16 --fsdp_activation_checkpointing true -- "${R[@]}" output_dir="$OUT/det_480p"
    "$PY" -m dcm_core train "${R[@]}" output_dir="$OUT/det_480p_st" parallel.shard_teacher=true --plan --num-gpus 2 --gpu-memory 80 || true
    fsdp bf16 --fsdp_activation_checkpointing true -- "${R[@]}" output_dir="$OUT/det_480p_st" parallel.shard_teacher=true
    for run in det_480p det_480p_st; do
        "$PY" - "$OUT/$run/metrics.jsonl" "$run" <<'PYEOF' || echo "FAIL  $run: no metrics (out of memory or error; see above)"
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
peak = max(r.get("cuda_peak_gib", 0) for r in m)  # process 0's max_memory_allocated (the trainer logs it)
h100 = 81559 / 1024 - 1.0  # an H100 80 GB as nvidia-smi reports it, less ~1 GiB of CUDA context outside the allocator
print(f"{sys.argv[2]}: measured peak CUDA memory (process 0) {peak:.1f} GiB, step time {m[-1]['step_time_s']:.2f} s -> "
      f"{'fits' if peak <= h100 else 'does NOT fit'} on an 80 GB card (allocator slack not counted)")
PYEOF
    done
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out = Path(sys.argv[1]); ok = True
def report(name, good, info=""):
    global ok
    ok &= bool(good); print(f"{'PASS' if good else 'FAIL'}  {name}  {info}")
def ckpt(run, step):
    from dcm_core.train import checkpoint as ck
    d = out / run / "checkpoints" / f"checkpoint-{step:08d}"
    if not d.is_dir():
        return {}
    files = {f.name: load_file(str(f)) for f in sorted(d.glob("*.safetensors"))}
    if ck.is_sharded(d):  # FSDP2: DCP shards, read whole in the unsharded layout
        files.update(ck.sharded_as_files(d))
    return files
def maxdiff(a, b):
    return max(((x.double() - y.double()).abs().max().item() for k in a for x, y in [(a[k], b[k])] if x.numel()), default=0.0)
def close(run_a, run_b, step, weight_atol, moment_rtol):
    a, b = ckpt(run_a, step), ckpt(run_b, step)
    names = sorted(n for n in a if not n.startswith("rng-"))
    if not a or names != sorted(n for n in b if not n.startswith("rng-")):
        return report(f"{run_a} == {run_b} @ {step}", False, f"files {sorted(a)} vs {sorted(b)}")
    for n in names:
        if a[n].keys() != b[n].keys():
            report(f"{run_a}/{n}", False, "keys differ"); continue
        finite = all(torch.isfinite(t).all() for t in a[n].values())
        if "optimizer" in n:
            rel = max(((a[n][k].double() - b[n][k].double()).norm() / b[n][k].double().norm().clamp_min(1e-30)).item() for k in a[n])
            report(f"{run_a} vs {run_b} @ {step} {n}", finite and rel <= moment_rtol, f"max per-tensor rel-norm diff {rel:.2e} (tol {moment_rtol:g})")
        else:
            d = maxdiff(a[n], b[n])
            report(f"{run_a} vs {run_b} @ {step} {n}", finite and d <= weight_atol, f"max |diff| {d:.2e} (tol {weight_atol:g})")
def times(run):
    m = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    t = [r["step_time_s"] for r in m[1:]] or [m[0]["step_time_s"]]
    losses_ok = all(torch.isfinite(torch.tensor(r["loss"])) for r in m)
    return sum(t) / len(t), losses_ok
close("sem_fsdp", "sem_1", 2, 2e-5, 5e-3)
for s in (2, 4):
    close("det_fsdp", "det_1", s, 2e-5, 5e-3)
a, b = ckpt("det_fsdp", 4), ckpt("det_resume", 4)
same = bool(a) and a.keys() == b.keys() and all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)
report("FSDP resume (2 + 2 steps) == FSDP 4 steps, bit-identical incl. RNG files", same)
for st in ("sem", "det"):
    step = 2 if st == "sem" else 4
    close(f"{st}_bf16_fsdp", f"{st}_bf16_1", step, 2e-3, 0.5)  # bf16 autocast noise: only finite + same ballpark
for run in ("sem_1", "sem_fsdp", "det_1", "det_fsdp", "sem_bf16_1", "sem_bf16_fsdp", "det_bf16_1", "det_bf16_fsdp"):
    t, fin = times(run)
    report(f"losses finite: {run}", fin, f"mean step time (after step 1) {t:.3f} s")
print("ALL PASS" if ok else "SOME CHECKS FAILED")
sys.exit(0 if ok else 1)
EOF
