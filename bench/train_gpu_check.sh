#!/usr/bin/env bash
# GPU check of the DCM trainer (one H100/H200, ~5 min): Wan2.1-1.3B-shaped random weights, the official
# recipe's switches (bf16 autocast, bf16 teacher, gradient checkpointing, rank-128 LoRA, 1024-wide heads),
# a 480x832x81 latent (1x16x21x60x104). Prints one JSON line per run (steps/s, peak CUDA memory).
#   bash bench/train_gpu_check.sh [.venv/bin/python]
set -euo pipefail
PY=${1:-.venv/bin/python}
common=(--shape wan1.3b --family wan --device cuda --bf16 --checkpointing --threads 8 --disc-channels 1024 --lora-rank 128)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# what `train --plan` predicts for the detail run below (compare with its peak_cuda_gb)
WAN13="model.tiny_config={dim = 1536, num_layers = 30, ffn_dim = 8960}"
"$PY" -m dcm_core train --config dcm_core/train/configs/wan_detail.toml model.pretrained=tiny:wan "$WAN13" \
    --plan --video 81,480,832 --gpu-memory 80 || true
timeout 240 "$PY" bench/train_bench.py "${common[@]}" --stage semantic --steps 4 --latent 1,16,21,60,104
timeout 240 "$PY" bench/train_bench.py "${common[@]}" --stage detail --steps 4 --latent 1,16,21,60,104
timeout 120 "$PY" bench/train_bench.py "${common[@]}" --stage semantic --semantic-lora --steps 4 --latent 1,16,21,60,104
