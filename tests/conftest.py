"""Test tiers.

* unit    — always; pure dcm_core + tiny diffusers models, no ComfyUI.
* comfy   — real ComfyUI in-process; needs a work tree at $COMFYUI_PATH (default ~/ComfyUI,
            pinned to commit a125cd84 / v0.3.64). Without one the tier is skipped with one line.
* browser — the ComfyUI frontend in headless Debian chromium (see tests/browser); needs ComfyUI,
            and chromium + npm playwright-core, which tools/browser_setup.sh installs when missing
            (apt-get as root, npm); otherwise the tier is skipped with one line.
* cli     — comfy-cli (launch / run / stop) against a real server; needs ComfyUI and comfy-cli in the venv.
* soak    — a real ComfyUI server under a long seeded queue, interrupts, model-file swaps and two clients
            (tests/soak); needs ComfyUI. Short form here, the full one with ``make soak``.

Tests live in tests/<tier>/; the tier is derived from the folder.

Required tiers (CI): ``DCM_REQUIRE_TIERS=comfy,browser,cli,soak`` (set by ``.ci/run``) turns "skip the tier"
into "fail the session": if a listed tier cannot run on this machine, pytest stops before running any
test with one message that names the tier, why, and how to get the ComfyUI work tree. The check runs
whatever tests were selected (a CI machine that cannot run a required tier is misconfigured, whichever
subset it was asked for). Without the variable, a tier that cannot run is skipped with one SKIP line.
"""

from __future__ import annotations

import os
import shutil
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


from tools.comfy_inprocess import comfyui_path  # noqa: E402


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


def pytest_addoption(parser):
    # The reliability suite (tests/*/reliability) reads this; DCM_RELIABILITY_FULL=1 does the same.
    parser.addoption(
        "--reliability-full",
        action="store_true",
        default=False,
        help="reliability suite: run the large generated-case counts (make reliability)",
    )


def _browser_status() -> tuple[bool, str]:
    """Debian chromium + npm playwright-core, installed by tools/browser_setup.sh when missing."""
    chromium, node_path = os.environ.get("DCM_CHROMIUM", ""), os.environ.get("DCM_PLAYWRIGHT_NODE_PATH", "")
    if chromium and node_path and os.access(chromium, os.X_OK) and Path(node_path, "playwright-core").is_dir():
        return True, f"chromium {chromium}"
    if not os.access(chromium or "/usr/bin/chromium", os.X_OK) and _CONFIG is not None:
        tr = _CONFIG.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line("browser tier: installing Debian chromium and npm playwright-core (tools/browser_setup.sh) ...")
    try:
        bash = shutil.which("bash") or "/bin/bash"
        r = subprocess.run([bash, str(ROOT / "tools" / "browser_setup.sh")], capture_output=True, text=True, timeout=900)
    except Exception as e:  # noqa: BLE001
        return False, f"tools/browser_setup.sh did not run: {e}"
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line and not line.startswith("SKIP"))
    if r.returncode != 0 or "CHROMIUM" not in out or "NODE_PATH" not in out:
        why = next((ln[5:].strip() for ln in r.stdout.splitlines() if ln.startswith("SKIP:")), "")
        return False, why or f"tools/browser_setup.sh failed (rc {r.returncode}): {r.stderr.strip()[-300:]}"
    os.environ["DCM_CHROMIUM"], os.environ["DCM_PLAYWRIGHT_NODE_PATH"] = out["CHROMIUM"], out["NODE_PATH"]
    return True, f"chromium {out['CHROMIUM']}"


def _cli_status() -> tuple[bool, str]:
    comfy = Path(sys.executable).parent / "comfy"
    if not comfy.is_file():
        return False, f"comfy-cli is not installed in {Path(sys.executable).parent.parent} (tools/bootstrap.sh installs it)"
    return True, f"comfy-cli {comfy}"


# Tiers with prerequisites beyond the ComfyUI work tree; each check runs once, and only when the
# tier has tests collected (the browser check may install chromium / playwright-core).
_TIER_CHECKS = {"browser": _browser_status, "cli": _cli_status}
_TIER_STATUS: dict[str, tuple[bool, str]] = {}


def _tier_status(tier: str) -> tuple[bool, str]:
    if tier not in _TIER_STATUS:
        if not _COMFY_OK:
            _TIER_STATUS[tier] = (False, _COMFY_NOTE)
        elif tier in _TIER_CHECKS:
            _TIER_STATUS[tier] = _TIER_CHECKS[tier]()
        else:
            _TIER_STATUS[tier] = (True, _COMFY_NOTE)
    return _TIER_STATUS[tier]


_CONFIG = None

REQUIRE_ENV = "DCM_REQUIRE_TIERS"
TIERS = ("unit", "comfy", "browser", "cli", "soak")
COMFYUI_REPO = "https://github.com/Comfy-Org/ComfyUI"


def required_tiers() -> list[str]:
    """The tiers ``$DCM_REQUIRE_TIERS`` (comma-separated) says may not be skipped."""
    raw = os.environ.get(REQUIRE_ENV, "")
    tiers = [t.strip() for t in raw.split(",") if t.strip()]
    unknown = [t for t in tiers if t not in TIERS]
    if unknown:
        raise pytest.UsageError(f"{REQUIRE_ENV}={raw}: unknown tier(s) {unknown}; the tiers are {', '.join(TIERS)}.")
    return tiers


def _require_tiers() -> None:
    """Fail the session (one message) when a tier named in ``$DCM_REQUIRE_TIERS`` cannot run here."""
    tiers = required_tiers()
    problems = []
    for tier in tiers:
        if tier == "unit":
            continue
        ok, note = _tier_status(tier)
        if not ok and tier != "comfy" and not _COMFY_OK:
            problems.append(f"  {tier}: needs the ComfyUI work tree too")
        elif not ok:
            problems.append(f"  {tier}: {note}")
        elif tier == "comfy" and "tests are pinned to" in note:
            problems.append(f"  comfy: {note}")
    if not problems:
        return
    comfy_missing = not _COMFY_OK or any("tests are pinned to" in p for p in problems)
    lines = [
        f"{REQUIRE_ENV}={os.environ[REQUIRE_ENV]} (set by .ci/run): required test tier(s) cannot run on this "
        f"machine, so the session fails instead of skipping them:",
        *problems,
    ]
    if comfy_missing:
        lines += [
            f"Get the ComfyUI work tree the comfy, browser and cli tiers need (ComfyUI v0.3.64, commit "
            f"{PINNED_COMFYUI_COMMIT}):",
            f"  git clone {COMFYUI_REPO} ~/ComfyUI && git -C ~/ComfyUI checkout {PINNED_COMFYUI_COMMIT}",
            "or set COMFYUI_PATH to a work tree at that commit; then run .ci/run again (make venv then installs "
            "ComfyUI's requirements into .venv).",
        ]
    lines.append(f"Run without {REQUIRE_ENV} (plain `make test`) to skip these tiers with one SKIP line each.")
    raise pytest.UsageError("\n".join(lines))


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config
    config.addinivalue_line("markers", "cli: needs ComfyUI and comfy-cli (tests/cli)")
    config.addinivalue_line("markers", "soak: a live ComfyUI server under load (tests/soak)")
    if os.environ.get(REQUIRE_ENV, "").strip() and not getattr(config.option, "collectonly", False):
        _require_tiers()


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _tier_of(item)
        if tier in ("comfy", "browser", "cli", "soak"):
            item.add_marker(getattr(pytest.mark, tier))
            if tier in ("browser", "cli", "soak"):
                item.add_marker(pytest.mark.comfy)
            ok, note = _tier_status(tier)
            if not ok:
                _SKIPPED_TIERS[tier] = note
                item.add_marker(pytest.mark.skip(reason=f"{tier} tier: {note}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fold a skipped tier into one short-summary line (``SKIPPED [n] tests/<tier>: …``)."""
    rep = yield
    tier = _tier_of(item)
    if rep.skipped and tier in _SKIPPED_TIERS and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        rep.longrepr = (f"tests/{tier}", None, rep.longrepr[2])
    return rep


def pytest_report_header(config):
    req = os.environ.get(REQUIRE_ENV, "").strip()
    return (f"dcm tiers: unit=on, comfy={'on — ' + _COMFY_NOTE if _COMFY_OK else 'SKIP — ' + _COMFY_NOTE}"
            + (f"; required: {req}" if req else ""))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for tier, why in sorted(_SKIPPED_TIERS.items()):
        terminalreporter.write_line(f"SKIP {tier} tier: {why}", yellow=True, bold=True)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test, the previous count restored after: tiny tensors on a shared
    2-core machine run faster and keep CPU times honest. Folders opt in with an autouse ``_one_thread``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
