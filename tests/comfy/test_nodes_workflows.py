"""The example workflows: every node exists with the widgets the file stores, and the API twins run.

``workflows/*.json`` are UI-format files (frontend 1.27.10). Each has an API-format twin in
``tests/comfy/workflows_api/`` with the same DCM nodes and widget values on tiny models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcm_core.latents import to_model_space
from dcm_core.schedule import build_sigmas

ROOT = Path(__file__).resolve().parents[2]
UI_DIR = ROOT / "workflows"
API_DIR = Path(__file__).resolve().parent / "workflows_api"
WORKFLOWS = sorted(p.name for p in UI_DIR.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}
SOCKET_FREE = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _widgets(node_type: str) -> tuple[list[str | None], list[str], list[str], list[str]]:
    """(widget names incl. None for control_after_generate, socket inputs, output names, output types)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    info = cls.INPUT_TYPES()
    widgets, sockets = [], []
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if (isinstance(typ, list) or typ in SOCKET_FREE) and not opts.get("forceInput"):
                widgets.append(name)
                if opts.get("control_after_generate"):
                    widgets.append(None)
            else:
                sockets.append(name)
    names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
    return widgets, sockets, names, list(cls.RETURN_TYPES)


def _named_widgets(node: dict) -> dict:
    names, _, _, _ = _widgets(node["type"])
    return {k: v for k, v in zip(names, node["widgets_values"]) if k is not None}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_nodes_exist_with_matching_widgets(comfy, name):
    import nodes

    wf = json.loads((UI_DIR / name).read_text())
    assert wf["version"] == 0.4 and wf["extra"]["frontendVersion"] == "1.27.10"
    for n in wf["nodes"]:
        t = n["type"]
        if t in FRONTEND_ONLY:
            continue
        assert t in nodes.NODE_CLASS_MAPPINGS, f"{name}: node type {t} is not registered"
        widgets, sockets, out_names, out_types = _widgets(t)
        assert len(n["widgets_values"]) == len(widgets), (name, t, n["widgets_values"], widgets)
        assert [i["name"] for i in n["inputs"]] == sockets, (name, t)
        assert [o["name"] for o in n["outputs"]] == out_names, (name, t)
        assert [o["type"] for o in n["outputs"]] == out_types, (name, t)
        for k, v in zip(widgets, n["widgets_values"]):
            if k is None:
                assert v in ("fixed", "randomize", "increment", "decrement"), (name, t, v)
        assert n["properties"]["Node name for S&R"] == t
    # combo values the pack defines must be valid choices
    for n in wf["nodes"]:
        if n["type"].startswith("DCM"):
            types = nodes.NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
            info = {**types["required"], **types.get("optional", {})}
            for k, v in _named_widgets(n).items():
                if isinstance(info[k][0], list) and not k.endswith("_name"):
                    assert v in info[k][0], (name, n["type"], k, v)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_twin_mirrors_ui_workflow(comfy, name):
    ui = json.loads((UI_DIR / name).read_text())
    api = json.loads((API_DIR / name).read_text())
    dcm_nodes = [n for n in ui["nodes"] if n["type"].startswith("DCM")]
    assert dcm_nodes
    for n in dcm_nodes:
        twin = api.get(str(n["id"]))
        assert twin is not None and twin["class_type"] == n["type"], (name, n["id"])
        for k, v in _named_widgets(n).items():
            if k.endswith("_name"):
                continue  # model files: tiny ones in the twin
            assert twin["inputs"][k] == v, (name, n["type"], k, twin["inputs"][k], v)
        # the same DCM wiring: every linked input of a DCM node is linked in the twin too
        for inp in n["inputs"]:
            assert (inp["link"] is not None) == isinstance(twin["inputs"].get(inp["name"]), list), (name, n["type"], inp["name"])


TINY_TWINS = [n for n in WORKFLOWS if n != "dcm_toy_world.json"]  # the toy twin runs the real toy model: test_toy_world.py


@pytest.mark.parametrize("name", TINY_TWINS)
def test_api_twin_runs(dcm, comfy, name):
    dcm.style_lora()  # the stock-nodes twin enables the style-LoRA slot
    prompt = json.loads((API_DIR / name).read_text())
    res = comfy.run(prompt)  # asserts node_errors is empty
    assert res.success, res.error_text()
    import nodes

    out = nodes.NODE_CLASS_MAPPINGS["DCMTestCapture"].STORE[Path(name).stem]["samples"]
    assert out.shape == (1, 16, 2, 4, 4) and bool(torch.isfinite(out).all())
    assert any(f.suffix == ".latent" for f in (comfy.output / "latents").glob(f"{Path(name).stem}*"))
    if name == "dcm_wan2.1_t2v_1.3b.json":
        smp = prompt["7"]["inputs"]
        ref = dcm.reference("wan", smp["seed"], build_sigmas(smp["preset"]), smp["boundary_timestep"])
        assert (to_model_space(out, "wan") - to_model_space(ref, "wan")).abs().max().item() <= 1e-4
    if name == "dcm_hunyuan_t2v.json":
        smp = next(v["inputs"] for v in prompt.values() if v["class_type"] == "DCMDualExpertSampler")
        ref = dcm.reference("hunyuan_video", smp["seed"], build_sigmas(smp["preset"]), smp["boundary_timestep"])
        assert (to_model_space(out, "hunyuan_video") - to_model_space(ref, "hunyuan_video")).abs().max().item() <= 1e-4
