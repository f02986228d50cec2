#!/usr/bin/env bash
# Create / refresh the development virtualenv (.venv) with the pinned stack.
#   - torch 2.13.0 (CPU build) first, then everything else under tools/constraints.txt;
#   - ComfyUI's own requirements (minus torch*) when a ComfyUI work tree is found at
#     $COMFYUI_PATH (default ~/ComfyUI);
#   - the lazy torchvision import shim (tools/torchvision_shim.py) as a .pth hook.
# Idempotent: a stamp file records what was installed; re-running is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
COMFYUI_PATH="${COMFYUI_PATH:-$HOME/ComfyUI}"
CONSTRAINTS=tools/constraints.txt

have_comfy=0
if [ -f "$COMFYUI_PATH/main.py" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then have_comfy=1; fi

want="$(cat "$CONSTRAINTS" pyproject.toml tools/bootstrap.sh tools/torchvision_shim.py | sha256sum | cut -c1-16)-comfy$have_comfy"
stamp="$VENV/.dcm-bootstrap"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
echo "[bootstrap] installing torch (CPU build) and the pinned stack"
"${PIP[@]}" -c "$CONSTRAINTS" torch
"${PIP[@]}" -c "$CONSTRAINTS" diffusers peft transformers accelerate safetensors einops numpy tqdm pillow av pytest hypothesis psutil pyyaml comfy-cli
if [ "$have_comfy" = 1 ]; then
  echo "[bootstrap] installing ComfyUI's requirements from $COMFYUI_PATH (without torch/torchvision/torchaudio)"
  tmp="$(mktemp)"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFYUI_PATH/requirements.txt" > "$tmp"
  "${PIP[@]}" -c "$CONSTRAINTS" -r "$tmp"
  rm -f "$tmp"
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp tools/torchvision_shim.py "$site/_dcm_torchvision_shim.py"
echo "import _dcm_torchvision_shim; _dcm_torchvision_shim.install()" > "$site/_dcm_torchvision_shim.pth"
echo "$want" > "$stamp"
echo "[bootstrap] done ($VENV)"
