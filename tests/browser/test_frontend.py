"""The pack in the real ComfyUI frontend (headless chromium), the way artists meet it.

* every ``workflows/*.json`` loads from the template route with no missing node types, no dialog,
  and every DCM node shows its widgets with the saved values (read back from ``app.graph``);
* the frontend's own UI → API conversion of each workflow gives the DCM nodes the inputs their
  tiny-model API twin uses;
* every API twin in tests/comfy/workflows_api, loaded and queued from the UI (``app.queuePrompt``),
  finishes with success in the server's history and writes its output file;
* ``GET /workflow_templates`` lists the pack's workflows and serves them unchanged.

Every test runs for the frontend the pinned ComfyUI ships and for the newest one on PyPI (ids
``pinned`` / ``current``; see conftest.py).

Iterates over whatever is in workflows/ and tests/comfy/workflows_api/.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI = sorted((ROOT / "workflows").glob("*.json"))
API = sorted((ROOT / "tests" / "comfy" / "workflows_api").glob("*.json"))
FILE_INPUTS = {"ckpt_name", "unet_name", "lora_name", "vae_name", "clip_name"}
# Known harmless frontend noise on a bare server.
HARMLESS_PAGE_ERRORS = ("reading 'id'",)


def _is_pack_node(t: str) -> bool:
    return t.startswith("DCM") and not t.startswith("DCMTest")


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _why(result: dict, comfy_server) -> str:
    return f"(driver log {result['_log']}; screenshots in {result['_out']})\n{comfy_server.log_tail(30)}"


# --------------------------------------------------------------------------- server side
def test_templates_endpoint_lists_the_pack_workflows(comfy_server):
    import dcm_comfy_server as cs

    listing = comfy_server.get("/workflow_templates")
    assert cs.PACK_DIR_NAME in listing, f"/workflow_templates has no entry for {cs.PACK_DIR_NAME}: {listing}"
    assert sorted(listing[cs.PACK_DIR_NAME]) == sorted(p.stem for p in UI)
    for p in UI:  # the frontend's template browser fetches them from here
        served = comfy_server.get(f"/api/workflow_templates/{cs.PACK_DIR_NAME}/{p.name}")
        assert served == json.loads(p.read_text()), f"{p.name} is served changed"


def test_server_loaded_the_pack_without_import_errors(comfy_server):
    log = comfy_server.log_path.read_text(errors="replace")
    # (comfy_extras' audio nodes fail without torchaudio on this stack: not the pack's business)
    ours = str(comfy_server.base / "custom_nodes")
    bad = [ln for ln in log.splitlines() if ("Cannot import" in ln or "IMPORT FAILED" in ln) and ours in ln]
    assert not bad, "\n".join(bad) + "\n" + comfy_server.log_tail(80)
    info = comfy_server.get("/object_info")
    pack_nodes = sorted(t for t in info if _is_pack_node(t))
    assert pack_nodes, "no DCM node in /object_info"


# --------------------------------------------------------------------------- page
def test_ui_boots_offline_with_the_pack_registered(frontend, comfy_server):
    # pinned: the comfyui-frontend-package the pinned ComfyUI requires (1.27.10 at a125cd84), from the venv;
    # current: the newest one (tools/browser_setup.sh), served through --front-end-root.
    assert frontend["frontendVersion"] == frontend["_expected_version"]
    # (Only the negative control's missing-nodes dialog asks api.comfy.org about the unknown node.)
    blocked = [b for b in frontend["blocked"] if b["phase"] != "negative"]
    assert not blocked, f"the page tried to reach non-loopback hosts (blocked): {blocked[:10]}"
    pack_nodes = sorted(t for t in comfy_server.get("/object_info") if _is_pack_node(t))
    missing = sorted(set(pack_nodes) - set(frontend["registeredDCM"]))
    assert not missing, f"pack nodes in /object_info but not registered in LiteGraph: {missing}"
    pack_http = [
        e for e in frontend["httpErrors"] if "/workflow_templates" in e or "/extensions/" in e or "/object_info" in e
    ]
    assert not pack_http, f"failed requests for the pack's files: {pack_http}"
    errors = [e for e in frontend["pageErrors"] if not any(h in e for h in HARMLESS_PAGE_ERRORS)]
    assert not errors, "uncaught errors in the page:\n" + "\n---\n".join(errors) + _why(frontend, comfy_server)


def workflow_problems(name: str, saved: dict, r: dict) -> list[str]:
    """Everything wrong with a workflow as the frontend shows it, compared with the saved file."""
    p = []
    if r["unregistered"]:
        p.append(f"{name}: node types missing in the frontend: {r['unregistered']}")
    if r.get("missingHook"):
        p.append(f"{name}: the frontend reported missing node types {r['missingHook']}")
    for d in r["dialogs"]:
        p.append(f"{name}: a dialog opened on load (missing nodes/models?):\n{d}")
    # Workflow validation problems and repaired links show up as warn/error toasts.
    for t in r["toasts"]:
        if re.search(r"p-toast-message-(warn|error)", t["cls"]):
            p.append(f"{name}: the frontend warned on load: {t['text']}")
    loaded = {str(n["id"]): n for n in r["nodes"]}  # newer frontends give node ids as strings
    if len(loaded) != len(saved["nodes"]):
        p.append(f"{name}: {len(saved['nodes'])} nodes saved, {len(loaded)} loaded")
    for sn in saved["nodes"]:
        ln, what = loaded.get(str(sn["id"])), f"{name}: {sn['type']} #{sn['id']}"
        if ln is None or ln["type"] != sn["type"]:
            p.append(f"{what} not loaded")
            continue
        if not ln["registered"]:
            p.append(f"{what}: type not registered")
        if not _is_pack_node(sn["type"]):
            continue
        shown = [w for w in ln["widgets"] if w["serialize"]]
        want = sn.get("widgets_values") or []
        if len(shown) != len(want):
            p.append(
                f"{what} shows {len(shown)} widgets {[w['name'] for w in shown]}, the file saves {len(want)} {want}"
            )
        for w, v in zip(shown, want):
            if not _same(w["value"], v):
                p.append(f"{what} widget {w['name']} = {w['value']!r}, saved {v!r}")
            if w["hidden"]:
                p.append(f"{what} widget {w['name']} is hidden")
            if w["values"] is not None and w["value"] not in w["values"]:  # a combo the user could not pick
                p.append(f"{what} {w['name']} = {w['value']!r} is not among its options {w['values']}")
        got = ln["widgets_values"]
        if got is None and not want and not shown:  # newer frontends leave it out for a node without widgets
            got = []
        if got is None or not all(_same(a, b) for a, b in zip(got, want)):
            p.append(f"{what} serializes {got}, the file has {want}")
    return p


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_workflow_loads_with_saved_widget_values(frontend, comfy_server, path):
    r = frontend["workflows"].get(path.stem)
    assert r is not None, f"the driver did not reach {path.name}" + _why(frontend, comfy_server)
    assert not r["error"], f"{path.name}: {r['error']}" + _why(frontend, comfy_server)
    problems = workflow_problems(path.name, json.loads(path.read_text()), r)
    assert not problems, "\n".join(problems)
    shot = Path(r["screenshot"])
    assert shot.is_file() and shot.stat().st_size > 20_000, f"screenshot {shot} missing or blank"
    assert r["frame"]["scale"] >= 0.85


def test_the_checks_catch_a_broken_workflow(frontend):
    """Negative control: the driver loads the first workflow with an unknown node type added and the
    first DCM node's first widget changed (see driver.cjs); the same checks must object."""
    r = frontend.get("negative")
    if r is None:
        pytest.skip("no workflow in workflows/ to break")
    assert not r["error"], r["error"]
    saved = json.loads((ROOT / "workflows" / f"{r['name']}.json").read_text())
    problems = "\n".join(workflow_problems(r["name"], saved, r))
    assert "DCMNoSuchNode" in problems and "missing in the frontend" in problems, problems
    assert "a dialog opened on load" in problems, problems  # ComfyUI's missing-nodes dialog
    assert f"widget {r['changedWidget']}" in problems, problems


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_frontend_conversion_matches_the_api_twin(frontend, path):
    twin_path = ROOT / "tests" / "comfy" / "workflows_api" / path.name
    if not twin_path.is_file():
        pytest.skip(f"no API twin for {path.name}")
    r = frontend["workflows"][path.stem]
    assert "output" in r["prompt"], f"{path.name}: app.graphToPrompt failed: {r['prompt'].get('error')}"
    prompt, twin = r["prompt"]["output"], json.loads(twin_path.read_text())
    saved_types = {str(n["id"]): n["type"] for n in json.loads(path.read_text())["nodes"]}
    pack_ids = [i for i, t in saved_types.items() if _is_pack_node(t)]
    assert pack_ids, f"{path.name} has no DCM node"
    for i in pack_ids:
        assert i in prompt, f"{path.name}: DCM node {i} is missing from the frontend's API prompt"
        assert i in twin and twin[i]["class_type"] == prompt[i]["class_type"], f"twin has no {saved_types[i]} #{i}"
        got = {k: v for k, v in prompt[i]["inputs"].items() if not isinstance(v, list) and k not in FILE_INPUTS}
        want = {k: v for k, v in twin[i]["inputs"].items() if not isinstance(v, list) and k not in FILE_INPUTS}
        assert got.keys() == want.keys() and all(_same(got[k], want[k]) for k in got), (
            f"{path.name}: {saved_types[i]} #{i} inputs from the frontend {got} != twin {want}"
        )
        links_got = sorted(k for k, v in prompt[i]["inputs"].items() if isinstance(v, list))
        links_want = sorted(k for k, v in twin[i]["inputs"].items() if isinstance(v, list))
        assert links_got == links_want, (
            f"{path.name}: {saved_types[i]} #{i} linked inputs {links_got} != twin {links_want}"
        )


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_tiny_workflow_queued_from_the_ui_runs(frontend, comfy_server, path):
    import dcm_comfy_server as cs

    r = frontend["queued"].get(path.stem)
    assert r is not None, f"the driver did not queue {path.name}" + _why(frontend, comfy_server)
    assert not r["error"], f"{path.name}: {r['error']}" + _why(frontend, comfy_server)
    assert r["httpStatus"] == 200 and not (r["response"].get("node_errors") or {}), r["response"]
    entry = comfy_server.get(f"/history/{r['promptId']}")[r["promptId"]]  # the server's word, not the page's
    status = entry["status"]
    assert status.get("status_str") == "success" and status.get("completed"), (
        f"{path.name}: {cs.history_error(entry)}\n{comfy_server.log_tail(40)}"
    )
    files = cs.output_files(comfy_server.base, entry)
    assert files, f"{path.name}: the history lists no output files: {entry.get('outputs')}"
    for f in files:
        assert f.is_file() and f.stat().st_size > 0, f"{path.name}: output {f} missing or empty"
    assert Path(r["screenshot"]).is_file()
