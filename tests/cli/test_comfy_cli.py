"""comfy-cli drives the pack: launch in the background, run each tiny-model API workflow with
``--wait``, stop. Tests run in file order (launch → run → stop); the session fixture in conftest.py
does the launch and makes sure the server is gone at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API = sorted((ROOT / "tests" / "comfy" / "workflows_api").glob("*.json"))


def test_launch_background_serves_the_pack(comfy_cli_server):
    import dcm_comfy_server as cs

    url = comfy_cli_server["url"]
    info = cs.http_json(url + "/object_info", timeout=30)
    pack_nodes = [t for t in info if t.startswith("DCM") and not t.startswith("DCMTest")]
    assert pack_nodes, f"no DCM node in /object_info of the comfy-launched server\n{cs.tail(comfy_cli_server['log'])}"
    assert (comfy_cli_server["base"] / "custom_nodes" / cs.PACK_DIR_NAME / "__init__.py").is_file()
    stats = cs.http_json(url + "/system_stats")
    assert stats["devices"][0]["type"] == "cpu"
    argv = stats["system"].get("argv") or []
    assert "--base-directory" in argv and str(comfy_cli_server["base"]) in argv, argv


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_comfy_run_wait_completes(comfy_cli_server, path):
    import dcm_comfy_server as cs

    cli, base = comfy_cli_server["cli"], comfy_cli_server["base"]
    before = set((base / "output").rglob("*"))
    r = cli("--workspace", comfy_cli_server["ws"], "run", "--workflow", path, "--wait",
            "--host", "127.0.0.1", "--port", comfy_cli_server["port"], "--timeout", 120, timeout=180)  # fmt: skip
    log = cs.tail(comfy_cli_server["log"], 40)
    assert r.rc == 0, f"{r.text()}\n--- server log ---\n{log}"
    # The server's own record of the run: the history entry whose prompt is this file's graph.
    want = {k: (v["class_type"], v["inputs"]) for k, v in json.loads(path.read_text()).items()}
    history = cs.http_json(comfy_cli_server["url"] + "/history?max_items=64")
    mine = [
        (pid, e)
        for pid, e in history.items()
        if {k: (v["class_type"], v["inputs"]) for k, v in e["prompt"][2].items()} == want
    ]
    assert mine, f"no history entry runs {path.name} as written\n{r.text()}"
    pid, entry = mine[-1]
    assert entry["status"]["status_str"] == "success", f"{cs.history_error(entry)}\n{log}"
    assert pid in r.out + r.err, f"comfy run did not report prompt {pid}\n{r.text()}"
    files = cs.output_files(base, entry)
    assert files and all(f.is_file() and f.stat().st_size > 0 for f in files), f"outputs {files}"
    assert set((base / "output").rglob("*")) - before, "no new file under output/"


def test_comfy_stop_stops_the_server(comfy_cli_server):
    import dcm_comfy_server as cs

    cli, port = comfy_cli_server["cli"], comfy_cli_server["port"]
    r = cli("--workspace", comfy_cli_server["ws"], "stop", timeout=60)
    assert r.rc == 0, r.text()
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            cs.http_json(f"http://127.0.0.1:{port}/system_stats", timeout=1)
        except Exception:  # noqa: BLE001 - connection refused: stopped
            return
        time.sleep(0.3)
    pytest.fail(f"server on port {port} still answers after `comfy stop`\n{r.text()}")
