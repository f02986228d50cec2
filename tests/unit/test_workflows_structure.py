"""Structure of the example workflows (no ComfyUI needed).

Node types are pack nodes (found in nodes/*.py by their node_id) or the core nodes listed here; the
comfy tier (tests/comfy/test_nodes_workflows.py) checks them against the real registry and schemas.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from dcm_core.families import BOUNDARY_PRESETS, WAN22_BOUNDARY, resolve_boundary
from dcm_core.schedule import PRESET_NAMES, build_sigmas, parse_custom_sigmas, route
from dcm_core.toy.models import toy_settings

ROOT = Path(__file__).resolve().parents[2]
UI_DIR = ROOT / "workflows"
API_DIR = ROOT / "tests" / "comfy" / "workflows_api"
WORKFLOWS = sorted(p.name for p in UI_DIR.glob("*.json"))
CORE = {
    "CLIPLoader", "DualCLIPLoader", "CLIPTextEncode", "VAELoader", "EmptyHunyuanLatentVideo", "VAEDecode",
    "VAEDecodeTiled", "CreateVideo", "SaveVideo", "FluxGuidance", "UNETLoader", "LoraLoaderModelOnly",
    "KSamplerSelect", "RandomNoise", "SamplerCustomAdvanced", "PreviewImage", "SaveLatent", "SaveAnimatedWEBP", "ImageScale", "Note", "MarkdownNote",
    "LoadImage", "CLIPVisionLoader", "CLIPVisionEncode", "WanImageToVideo",
}
TEST_ONLY = {"DCMTestConditioning", "DCMTestCapture", "DCMTestRecordCalls"}


def pack_node_ids() -> set[str]:
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.add(node.value.value)
    return ids


def test_expected_files():
    assert WORKFLOWS == [
        "dcm_hunyuan_t2v.json", "dcm_toy_world.json", "dcm_wan2.1_i2v_trained.json", "dcm_wan2.1_stock_nodes.json",
        "dcm_wan2.1_t2v_1.3b.json", "dcm_wan2.2_i2v_a14b.json", "dcm_wan2.2_t2v_a14b.json",
    ]
    assert sorted(p.name for p in API_DIR.glob("*.json")) == WORKFLOWS


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_structure(name):
    wf = json.loads((UI_DIR / name).read_text())
    assert wf["version"] == 0.4
    for key in ("nodes", "links", "groups", "extra", "last_node_id", "last_link_id"):
        assert key in wf
    pack = pack_node_ids()
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] == max(ids)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties", "widgets_values"):
            assert key in n, (name, n.get("type"), key)
        assert n["type"] in pack or n["type"] in CORE, f"{name}: unknown node type {n['type']}"
        if n["type"] not in ("Note", "MarkdownNote"):
            assert n["properties"]["Node name for S&R"] == n["type"]
    # links are consistent on both ends, typed, and acyclic in the stored order
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and wf["last_link_id"] == max(link_ids)
    for lid, src, s_slot, dst, d_slot, typ in wf["links"]:
        out, inp = nodes[src]["outputs"][s_slot], nodes[dst]["inputs"][d_slot]
        assert lid in (out["links"] or []) and inp["link"] == lid, (name, lid)
        assert out["type"] == inp["type"] == typ, (name, lid)
        assert nodes[src]["order"] < nodes[dst]["order"], (name, lid)
    for n in wf["nodes"]:
        for inp in n["inputs"]:
            assert inp["link"] is None or inp["link"] in link_ids
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(ids)))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_dcm_settings_are_the_official_ones(name):
    wf = json.loads((UI_DIR / name).read_text())
    hunyuan = "hunyuan" in name
    toy = "toy" in name  # the toy world's 24x24x6 video is the latent of 96x96, 21 frames
    # Wan2.2 A14B: the high/low-noise pair switches at the base's own boundary (875 T2V, 900 I2V), picked with the
    # boundary preset; its preset spreads the steps inside each model's range
    a14b = {"dcm_wan2.2_t2v_a14b.json": "t2v", "dcm_wan2.2_i2v_a14b.json": "i2v"}.get(name)
    # the toy world: its own grid (shift 3) through DCM Schedule (custom) and its bundle's boundary
    boundary = WAN22_BOUNDARY[a14b] if a14b else 981.0 if hunyuan else toy_settings().boundary_timestep if toy else 978.0
    boundary_preset = next((k for k, v in BOUNDARY_PRESETS.items() if a14b and v == boundary and "wan2.2" in k), "manual")
    for n in wf["nodes"]:
        w = n["widgets_values"]
        if n["type"] == "DCMDualExpertSampler":
            seed, control, preset, b, cfg_s, cfg_d, bp = w
            assert control in ("fixed", "randomize") and preset in PRESET_NAMES
            assert preset == ("custom" if toy else "per-expert-uniform" if a14b else "hunyuan-t2v-4step" if hunyuan
                              else "wan2.1-t2v-6step")
            assert (b, cfg_s, cfg_d, bp) == (boundary, 1.0, 1.0, boundary_preset)
            assert resolve_boundary(bp, b) == boundary
            if toy:  # the sigmas come from DCM Schedule: the toy's recommended steps on its grid, as the demo's
                sched = next(x["widgets_values"] for x in wf["nodes"] if x["type"] == "DCMSchedule")
                st = toy_settings()
                assert parse_custom_sigmas(sched[5]) == pytest.approx(st.grid(st.recommended_steps), abs=1e-6)
                experts = route(parse_custom_sigmas(sched[5]), b)
            else:
                experts = route(build_sigmas(preset, boundary_timestep=b), b)
            assert "semantic" in experts and "detail" in experts
        if n["type"] in ("DCMDualExpertGuider",):
            assert w == [boundary, 1.0, 1.0, "manual"]
        if n["type"] == "DCMSchedule":
            assert w[0] in PRESET_NAMES and w[4] == boundary
        if n["type"] == "EmptyHunyuanLatentVideo":
            assert w == ([96, 96, 21, 1] if toy else [1280, 720, 29, 1] if hunyuan else [832, 480, 81, 1])
        if n["type"] == "CreateVideo":
            assert w == [24 if hunyuan else 16]
        if n["type"] == "FluxGuidance":
            assert w == [6.0]


def test_readme_lists_every_model_file():
    readme = (UI_DIR / "README.md").read_text()
    for name in WORKFLOWS:
        assert f"`{name}`" in readme
        wf = json.loads((UI_DIR / name).read_text())
        for n in wf["nodes"]:
            for v in n["widgets_values"]:
                if isinstance(v, str) and v.endswith(".safetensors") and not v.startswith("your_"):
                    assert f"`{v}`" in readme, f"{name}: {v} is not documented in workflows/README.md"
    assert "cszy98/DCM" in readme and "DCM_WAN/transformer" in readme and "DCM_HY/transformer" in readme
    assert re.search(r"models/diffusion_models", readme) and "models/loras" in readme
