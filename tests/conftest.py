"""Test tiers.

* unit    — always; pure dcm_core + tiny diffusers models, no ComfyUI.
* comfy   — real ComfyUI in-process; needs a work tree at $COMFYUI_PATH (default ~/ComfyUI,
            pinned to commit a125cd84 / v0.3.64). Without one the tier is skipped with one line.
* browser — the ComfyUI frontend in headless Debian chromium (see tests/browser).

Tests live in tests/<tier>/; the tier is derived from the folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED_COMFYUI_COMMIT = "a125cd84"

# The dev venv installs this hook via tools/bootstrap.sh; repeat it here so a venv made
# another way can import torchvision (pulled in by ComfyUI / transformers) too.
sys.path.insert(0, str(ROOT / "tools"))
try:
    import torchvision_shim  # noqa: E402

    torchvision_shim.install()
finally:
    sys.path.pop(0)


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()


def comfyui_status() -> tuple[bool, str]:
    p = comfyui_path()
    if not (p / "main.py").is_file() or not (p / "comfy" / "model_patcher.py").is_file():
        return False, f"no ComfyUI work tree at {p} (set COMFYUI_PATH; pinned commit {PINNED_COMFYUI_COMMIT})"
    try:
        head = subprocess.run(["git", "-C", str(p), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip()
    except Exception:
        commit = ""
    note = f"ComfyUI at {p}"
    if commit and not commit.startswith(PINNED_COMFYUI_COMMIT):
        note += f" (commit {commit[:8]}, tests are pinned to {PINNED_COMFYUI_COMMIT})"
    return True, note


_COMFY_OK, _COMFY_NOTE = comfyui_status()
_SKIPPED_TIERS: dict[str, str] = {}


def _tier_of(item) -> str:
    parts = Path(str(item.fspath)).resolve().relative_to(ROOT / "tests").parts
    return parts[0] if len(parts) > 1 else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _tier_of(item)
        if tier in ("comfy", "browser"):
            item.add_marker(getattr(pytest.mark, tier))
            if tier == "browser":
                item.add_marker(pytest.mark.comfy)
            if not _COMFY_OK:
                _SKIPPED_TIERS[tier] = _COMFY_NOTE
                item.add_marker(pytest.mark.skip(reason=f"{tier} tier: {_COMFY_NOTE}"))


def pytest_report_header(config):
    return f"dcm tiers: unit=on, comfy={'on — ' + _COMFY_NOTE if _COMFY_OK else 'SKIP — ' + _COMFY_NOTE}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for tier, why in sorted(_SKIPPED_TIERS.items()):
        terminalreporter.write_line(f"SKIP {tier} tier: {why}", yellow=True, bold=True)
