#!/usr/bin/env bash
# GPU check of the DCM trainer on ONE GPU (H100 80 GB / H200 141 GB, ~5-10 min): Wan2.1-1.3B-shaped random
# weights, the official recipe's switches (bf16 autocast, bf16 teacher, gradient checkpointing of student AND
# teacher, rank-128 LoRA, 1024-wide heads), one 480x832x81 clip (latent 1x16x21x60x104 = 32,760 tokens) with
# 512 text tokens (umT5 length). Prints one JSON line per run (steps/s, peak CUDA memory allocated / reserved)
# and, last, the answer to "does the 480x832x81 detail stage fit on an 80 GB card".
#   bash bench/train_gpu_check.sh [.venv/bin/python]
# NOT RUN YET: written without a GPU (no device was lent to the session that wrote it). Check the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=$(mktemp -d /tmp/dcm_gpu_check.XXXXXX)
LAT=1,16,21,60,104
common=(--shape wan1.3b --family wan --device cuda --bf16 --checkpointing --threads 8 --disc-channels 1024 --lora-rank 128
        --text-tokens 512 --latent $LAT)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# what `train --plan` predicts for the detail run below (one GPU; compare with its peak_cuda_reserved_gb)
WAN13="model.tiny_config={dim = 1536, num_layers = 30, ffn_dim = 8960}"
"$PY" -m dcm_core train --config dcm_core/train/configs/wan_detail.toml model.pretrained=tiny:wan "$WAN13" \
    --plan --num-gpus 1 --video 81,480,832 --gpu-memory 80 || true
run() { local name=$1; shift; timeout 600 "$PY" bench/train_bench.py "${common[@]}" "$@" | tail -1 | tee "$OUT/$name.json"; }
run semantic_lora --stage semantic --semantic-lora --steps 4 || echo '{"failed": "semantic_lora"}' > "$OUT/semantic_lora.json"
run detail --stage detail --steps 4 || echo '{"failed": "detail"}' > "$OUT/detail.json"
# the cost of teacher checkpointing: the same detail run with the teacher NOT checkpointed (expected: out of memory
# on 80 GB — ~72 KB per token per block of saved teacher activations)
run detail_teacher_not_ckpt --stage detail --steps 3 --teacher-not-checkpointed || echo '{"failed": "detail_teacher_not_ckpt"}' > "$OUT/detail_teacher_not_ckpt.json"
run detail_base_bf16 --stage detail --steps 3 --detail-base-bf16 || echo '{"failed": "detail_base_bf16"}' > "$OUT/detail_base_bf16.json"
timeout 600 "$PY" bench/train_bench.py "${common[@]}" --stage semantic --steps 3 | tail -1 | tee "$OUT/semantic_full.json" \
    || echo '{"failed": "semantic full fine-tune (fp32 student + AdamW + bf16 teacher on one GPU)"}' > "$OUT/semantic_full.json"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
H100_GIB = 81559 / 1024  # what nvidia-smi reports for an H100 80 GB
CONTEXT_GIB = 1.0        # CUDA context + cuBLAS workspace, outside the caching allocator (an estimate)
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text() or "{}")
    if "failed" in r:
        print(f"{f.stem:28s} FAILED (out of memory or error; see above)")
        continue
    need = r["peak_cuda_reserved_gb"] + CONTEXT_GIB
    verdict = "fits" if need <= H100_GIB else "does NOT fit"
    print(f"{f.stem:28s} {r['steps_per_s']:.3f} steps/s, peak allocated {r['peak_cuda_gb']:.1f} GiB, reserved "
          f"{r['peak_cuda_reserved_gb']:.1f} GiB (+{CONTEXT_GIB:.0f} context) -> {verdict} on an 80 GB card")
PYEOF
