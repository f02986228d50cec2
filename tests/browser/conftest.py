"""Browser tier: the real ComfyUI frontend in headless Debian chromium (testing-on-cpu.md §7).

Session fixtures:
* ``comfy_server`` — ``main.py --cpu`` in a subprocess on 127.0.0.1 with a temporary base directory
  (this pack + the test-only nodes in custom_nodes, tiny models; see comfy_server.py); stopped with
  SIGTERM at the end.
* ``frontend`` — one run of driver.cjs (playwright-core + /usr/bin/chromium, HOME in a temp dir):
  loads every workflows/*.json through the template route, reads back the graph, screenshots it,
  and queues every API twin in tests/comfy/workflows_api from the UI. Tests assert on its result.

Screenshots and the driver's result land in tests/_output/browser/ (gitignored).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "tests" / "_output" / "browser"


def load_server_module():
    """tests/browser/comfy_server.py as module ``dcm_comfy_server`` (no package imports: the tier
    folders are not packages and run under --import-mode=importlib)."""
    name = "dcm_comfy_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "comfy_server.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


cs = load_server_module()


def _tools() -> tuple[str, str]:
    chromium, node_path = os.environ.get("DCM_CHROMIUM"), os.environ.get("DCM_PLAYWRIGHT_NODE_PATH")
    if not (chromium and node_path):  # run without the root conftest's tier check (e.g. -p no:…)
        r = subprocess.run(
            ["bash", str(ROOT / "tools" / "browser_setup.sh")], capture_output=True, text=True, timeout=900
        )
        kv = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)
        if r.returncode != 0:
            pytest.skip(f"browser tier: {r.stdout.strip() or r.stderr.strip()[-300:]}")
        chromium, node_path = kv["CHROMIUM"], kv["NODE_PATH"]
    return chromium, node_path


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser_base")
    cs.make_base(base)
    build = cs.ModelBuild(base / "models").start()
    server = cs.ComfyServer(base, tmp_path_factory.mktemp("browser_home"))
    t0 = time.monotonic()
    try:
        server.start(timeout=180)
        server.models = build.finish(timeout=300)
        server.setup_s = time.monotonic() - t0
        server.models_cached = build.cached
        # First-run "Get Started with a Template" dialog covers the canvas unless this is set;
        # the minimap would cover part of each screenshot.
        server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
        yield server
    finally:
        rc = server.stop()
        server.exit_code = rc


@pytest.fixture(scope="session")
def frontend(comfy_server, tmp_path_factory):
    chromium, node_path = _tools()
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    home = tmp_path_factory.mktemp("chromium_home")
    pack = cs.PACK_DIR_NAME
    plan = {
        "url": comfy_server.url,
        "chromium": chromium,
        "outDir": str(OUT),
        "resultPath": str(OUT / "driver_result.json"),
        "timeoutMs": 120_000,
        "scale": 0.85,
        "workflows": [{"name": p.stem, "url": f"/api/workflow_templates/{pack}/{p.name}"} for p in cs.ui_workflows()],
        "queue": [{"name": p.stem, "api": json.loads(p.read_text())} for p in cs.api_workflows()],
        "negative": next(
            ({"name": p.stem, "url": f"/api/workflow_templates/{pack}/{p.name}"} for p in cs.ui_workflows()), None
        ),
    }
    plan_path = home / "plan.json"
    plan_path.write_text(json.dumps(plan))
    Path(plan["resultPath"]).unlink(missing_ok=True)
    env = dict(os.environ, HOME=str(home), NODE_PATH=node_path, PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")  # fmt: skip
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    t0 = time.monotonic()
    log = OUT / "driver.log"
    with open(log, "wb") as fh:
        try:
            rc = subprocess.run(["node", str(HERE / "driver.cjs"), str(plan_path)], cwd=home, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, timeout=600).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.monotonic() - t0
    try:
        result = json.loads(Path(plan["resultPath"]).read_text())
    except (OSError, ValueError) as e:
        pytest.fail(f"driver.cjs wrote no result (rc {rc}, {e})\n{cs.tail(log)}\n{comfy_server.log_tail()}")
    result["_seconds"] = seconds
    result["_rc"] = rc
    result["_log"] = str(log)
    result["_home"] = str(home)
    (OUT / "timings.json").write_text(json.dumps({
        "server_ready_s": comfy_server.ready_s, "server_and_models_s": comfy_server.setup_s,
        "models_cached": comfy_server.models_cached, "driver_s": seconds, "driver": result.get("timings"),
    }, indent=1))  # fmt: skip
    if not result.get("ok"):
        pytest.fail(f"driver.cjs failed: {result.get('error')}\n{cs.tail(log)}\n{comfy_server.log_tail()}")
    return result
