"""Browser tier: the real ComfyUI frontend in headless Debian chromium.

Every test runs once per frontend (``frontend_name``):
* ``pinned`` — the comfyui-frontend-package the pinned ComfyUI requires (1.27.10 at a125cd84), from the venv;
* ``current`` — the newest one on PyPI, pinned (version + sha256) in tools/browser_setup.sh, fetched by
  ``tools/browser_setup.sh --frontend`` into a cache outside the venv and served by the same pinned
  backend through ``--front-end-root``. When it cannot be fetched, or the pinned backend cannot serve it
  (the UI never comes up, or no workflow loads), its tests skip with one line saying why; the pinned
  frontend runs regardless.

Session fixtures (one instance per frontend, the pinned one first):
* ``comfy_server`` — ``main.py --cpu`` in a subprocess on 127.0.0.1 with a temporary base directory
  (this pack + the test-only nodes in custom_nodes, tiny models; see comfy_server.py); stopped with
  SIGTERM at the end. The ``current`` server boots in the background while the pinned frontend runs.
* ``frontend`` — one run of driver.cjs (playwright-core + /usr/bin/chromium, HOME in a temp dir):
  loads every workflows/*.json through the template route, reads back the graph, screenshots it,
  and queues every API twin in tests/comfy/workflows_api from the UI. Tests assert on its result.

Screenshots, the driver's result and timings land in tests/_output/browser/<frontend>/ (gitignored).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "tests" / "_output" / "browser"
FRONTENDS = ("pinned", "current")
SKIP_PREFIX = "current frontend"  # every skip of the current frontend's tests starts with this


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


@functools.cache
def current_frontend() -> tuple[str | None, str | None, str]:
    """(version, --front-end-root dir, "") of the newest frontend, or (version?, None, why not)."""
    env = dict(os.environ, DCM_PYTHON=sys.executable)
    try:
        r = subprocess.run(["bash", str(ROOT / "tools" / "browser_setup.sh"), "--frontend"],
                           capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, None, f"tools/browser_setup.sh --frontend did not finish: {e}"
    kv = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln and not ln.startswith("SKIP"))
    if r.returncode == 0 and kv.get("FRONTEND_ROOT") and Path(kv["FRONTEND_ROOT"], "index.html").is_file():
        return kv["FRONTEND_VERSION"], kv["FRONTEND_ROOT"], ""
    why = next((ln[5:].strip() for ln in r.stdout.splitlines() if ln.startswith("SKIP:")), "")
    return None, None, why or f"tools/browser_setup.sh --frontend failed (rc {r.returncode}): {r.stderr.strip()[-300:]}"


def _backend_name() -> str:
    try:
        text = (cs.comfyui_path() / "comfyui_version.py").read_text()
        return "ComfyUI " + re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)
    except (OSError, AttributeError):
        return "the pinned ComfyUI"


def _skip_current(why: str):
    pytest.skip(f"{SKIP_PREFIX} not run: {why}")


# The frontends whose tests were collected (so the current one's server only boots when it will be used).
_WANTED: set[str] = set()
_STARTS: dict[str, _ServerStart] = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(getattr(item, "callspec", None), "params", {}).get("frontend_name")
        if name is not None:
            _WANTED.add(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fold the current frontend's skips into one short-summary line (``SKIPPED [n] tests/browser: …``)."""
    rep = yield
    if rep.skipped and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        msg = str(rep.longrepr[2]).removeprefix("Skipped: ")
        if msg.startswith(SKIP_PREFIX):
            rep.longrepr = ("tests/browser", None, msg)
    return rep


def pytest_sessionfinish(session, exitstatus):
    for start in _STARTS.values():  # a server started for tests that never ran (-x, -k)
        start.stop()


class _ServerStart:
    """One frontend's ComfyUI server, started in a background thread (for ``current``: the frontend
    is fetched first), so it can boot while the other frontend's driver runs."""

    def __init__(self, name: str, tmp_path_factory):
        self.name = name
        self.base = tmp_path_factory.mktemp(f"browser_base_{name}")
        self.home = tmp_path_factory.mktemp(f"browser_home_{name}")
        self.server: cs.ComfyServer | None = None
        self.version: str | None = None
        self.skip_why = ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"comfy-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            extra = []
            if self.name == "current":
                self.version, root, why = current_frontend()
                if root is None:
                    self.skip_why = why
                    return
                extra = ["--front-end-root", root]
            else:
                from importlib.metadata import version

                self.version = version("comfyui_frontend_package")
            cs.make_base(self.base)
            self.server = cs.ComfyServer(self.base, self.home, extra_args=extra)
            self.server.start(timeout=240)
        except BaseException as e:  # noqa: BLE001  (re-raised / reported in the fixture)
            self.error = e

    def result(self) -> cs.ComfyServer:
        self.thread.join()
        if self.skip_why:
            _skip_current(self.skip_why)
        if self.error is not None:
            if self.name == "current":  # the pinned frontend's server tells whether the pack is at fault
                _skip_current(f"{_backend_name()} did not start with --front-end-root for comfyui-frontend-package "
                              f"{self.version}: {_first_line(self.error) or type(self.error).__name__}")  # fmt: skip
            raise self.error
        return self.server

    def stop(self) -> int | None:
        self.thread.join()
        return self.server.stop() if self.server is not None else None


def _start(name: str, tmp_path_factory) -> _ServerStart:
    if name not in _STARTS:
        _STARTS[name] = _ServerStart(name, tmp_path_factory)
    return _STARTS[name]


@pytest.fixture(scope="session", params=FRONTENDS)
def frontend_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def comfy_server(frontend_name, tmp_path_factory):
    start = _start(frontend_name, tmp_path_factory)
    # Models are built (or linked from the cache) while the server boots.
    build = cs.ModelBuild(start.base / "models").start()
    if frontend_name == "pinned" and "current" in _WANTED:
        _start("current", tmp_path_factory)  # boots beside the pinned frontend's run
    t0 = time.monotonic()
    try:
        server = start.result()
        server.models = build.finish(timeout=300)
        server.setup_s = time.monotonic() - t0
        server.models_cached = build.cached
        server.frontend_name = frontend_name
        server.frontend_version = start.version
        # First-run "Get Started with a Template" dialog covers the canvas unless this is set;
        # the minimap would cover part of each screenshot.
        server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
        yield server
    finally:
        if build.proc is not None and build.proc.poll() is None:
            build.proc.kill()
        rc = start.stop()
        _STARTS.pop(frontend_name, None)
        if start.server is not None:
            start.server.exit_code = rc


def _first_line(text) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:300] if lines else ""


def _cannot_serve(result: dict) -> str:
    """Why the page shows that the backend cannot serve this frontend at all ("" when it can)."""
    errs = "; page error: " + _first_line(result["pageErrors"][0]) if result.get("pageErrors") else ""
    if "ui_ready" not in (result.get("timings") or {}):
        return f"the UI did not come up ({_first_line(result.get('error')) or 'no error reported'}){errs}"
    wfs = result.get("workflows") or {}
    if wfs and all(w.get("error") for w in wfs.values()):
        return f"no workflow loads ({_first_line(next(iter(wfs.values()))['error'])}){errs}"
    return ""


@pytest.fixture(scope="session")
def frontend(comfy_server, frontend_name, tmp_path_factory):
    chromium, node_path = _tools()
    out = OUT / frontend_name
    out.mkdir(parents=True, exist_ok=True)
    for old in [*OUT.glob("*.png"), *out.glob("*.png")]:  # (top level: the layout before per-frontend folders)
        old.unlink()
    home = tmp_path_factory.mktemp(f"chromium_home_{frontend_name}")
    pack = cs.PACK_DIR_NAME
    plan = {
        "url": comfy_server.url,
        "chromium": chromium,
        "outDir": str(out),
        "resultPath": str(out / "driver_result.json"),
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
    log = out / "driver.log"
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
    result["_out"] = str(out)
    result["_home"] = str(home)
    result["_expected_version"] = comfy_server.frontend_version
    # Routes this frontend asked for that the backend does not have (newer frontend, older backend).
    missing_routes = sorted(
        {urlsplit(e.split(" ", 2)[2]).path for e in result.get("httpErrors", []) if e[:4] == "404 "}
    )
    (out / "timings.json").write_text(json.dumps({
        "frontend": frontend_name, "frontend_version": result.get("frontendVersion"),
        "server_ready_s": comfy_server.ready_s, "server_and_models_s": comfy_server.setup_s,
        "models_cached": comfy_server.models_cached, "driver_s": seconds, "driver": result.get("timings"),
        "not_found_routes": missing_routes,
    }, indent=1))  # fmt: skip
    if frontend_name == "current":
        why = _cannot_serve(result)
        if why:
            _skip_current(f"{_backend_name()} cannot serve comfyui-frontend-package {comfy_server.frontend_version}: "
                          f"{why} (driver log {log})")  # fmt: skip
    if not result.get("ok"):
        pytest.fail(f"driver.cjs failed: {result.get('error')}\n{cs.tail(log)}\n{comfy_server.log_tail()}")
    return result
