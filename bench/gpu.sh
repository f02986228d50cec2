#!/usr/bin/env bash
# DCM node pack — GPU benchmark: the `make bench` scenarios on one NVIDIA GPU at 480x832x81, Wan2.1-1.3B shape.
#
# Prerequisites (no network is used):
#   * a copy of this repo (the node pack) with its venv built: .venv/ with a CUDA build of torch and the
#     pack's dev requirements (tools/bootstrap.sh, from local wheels if offline);
#   * ComfyUI v0.3.64 work tree at $COMFYUI_PATH (default ~/ComfyUI) — it is imported in-process, never modified;
#   * one NVIDIA GPU (>= 16 GB; H100/H200 tested by design), ~8 GB free RAM, and ~6.5 GB free disk in
#     $DCM_BENCH_CACHE (default ~/.cache/dcm-bench): the Wan 1.3B-shaped official DCM checkpoint (random
#     weights, fp32) is generated there on first use (streamed, ~1 min) and reused afterwards.
#
# Usage:
#   bash bench/gpu.sh              # ~5-7 min: 3 ComfyUI processes (default memory management, --lowvram,
#                                  #   --lowvram on an emulated 8 GB card), results in bench/results/gpu_latest.{json,md}
#   bash bench/gpu.sh --dry-run    # print the plan
#   bash bench/gpu.sh --cpu        # same flow on the CPU with the tiny model (logic check, ~2-3 min)
#
# Reports per mode: seconds per DCM step, expert-switch time (and ÷ one model call), DCM sampler ÷ the stock
# SplitSigmas + 2x SamplerCustomAdvanced chain, peak VRAM (allocated / reserved), and the standard Wan run
# (50 steps, CFG 5) projected from its first 2 steps vs the 6-step DCM run. Each process is capped at 170 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export COMFYUI_PATH=${COMFYUI_PATH:-$HOME/ComfyUI}
if [ ! -f "$COMFYUI_PATH/comfyui_version.py" ]; then
    echo "bench/gpu.sh: no ComfyUI work tree at COMFYUI_PATH=$COMFYUI_PATH" >&2
    exit 2
fi
if [[ " $* " != *" --cpu "* && " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 600 "$PY" -m bench.gpu "$@"
