"""The pack loads through ComfyUI's own custom-node loader and every node schema is sound."""

from __future__ import annotations

import pytest

EXPECTED = {
    "DCMCheckpointLoader": (["ckpt_name", "weight_dtype"], ["semantic_model", "detail_model"]),
    "DCMExpertLoraLoader": (["model", "lora_name", "strength"], ["model"]),
    "DCMSchedule": (
        ["preset", "semantic_steps", "detail_steps", "steps", "boundary_timestep", "custom_sigmas"],
        ["sigmas", "plot"],
    ),
    "DCMTimestepSplit": (["sigmas", "boundary_timestep"], ["semantic_sigmas", "detail_sigmas"]),
    "DCMDualExpertSampler": (
        ["semantic_model", "detail_model", "positive", "negative", "latent_image", "seed", "preset",
         "boundary_timestep", "cfg_semantic", "cfg_detail", "sigmas", "boundary_preset"],
        ["latent"],
    ),
    "DCMDualExpertGuider": (
        ["semantic_model", "detail_model", "positive", "negative", "boundary_timestep", "cfg_semantic", "cfg_detail",
         "boundary_preset"],
        ["guider"],
    ),
    "DCMToyTextEncode": (["prompt"], ["conditioning"]),
    "DCMToyDecode": (["samples"], ["images"]),
}


def _pack_nodes(comfy):
    import nodes

    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(comfy.pack_dir_name)}


def test_pack_registers_exactly_the_contract_nodes(comfy):
    pack = _pack_nodes(comfy)
    assert sorted(pack) == sorted(EXPECTED)
    import nodes

    for node_id in EXPECTED:
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("DCM ")


@pytest.mark.parametrize("node_id", sorted(EXPECTED))
def test_schema_contract_and_tooltips(comfy, node_id):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    schema = cls.GET_SCHEMA()
    schema.validate()
    assert schema.node_id == node_id and node_id.startswith("DCM")
    assert schema.description, f"{node_id} has no description"
    assert schema.category in ("sampling/DCM", "loaders/DCM", "sampling/DCM/toy world")
    inputs, outputs = EXPECTED[node_id]
    assert [i.id for i in schema.inputs] == inputs
    assert [o.display_name for o in schema.outputs] == outputs
    for i in schema.inputs:
        assert i.tooltip, f"{node_id}.{i.id} has no tooltip"
    for o in schema.outputs:
        assert o.tooltip, f"{node_id} output {o.display_name} has no tooltip"
    info = cls.GET_NODE_INFO_V1()
    assert info["name"] == node_id
    assert info["output_name"] == outputs


def test_contract_details(comfy):
    import nodes
    from dcm_core import schedule

    sampler = nodes.NODE_CLASS_MAPPINGS["DCMDualExpertSampler"].GET_SCHEMA()
    by_id = {i.id: i for i in sampler.inputs}
    assert by_id["seed"].control_after_generate is True
    assert by_id["preset"].options == list(schedule.PRESET_NAMES)
    assert by_id["boundary_timestep"].default == 978.0
    assert by_id["cfg_semantic"].default == 1.0 and by_id["cfg_detail"].default == 1.0
    assert by_id["sigmas"].optional is True
    loader = nodes.NODE_CLASS_MAPPINGS["DCMCheckpointLoader"].GET_SCHEMA()
    assert {i.id: i for i in loader.inputs}["weight_dtype"].options == [
        "default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "bf16", "fp16",
    ]
    split = nodes.NODE_CLASS_MAPPINGS["DCMTimestepSplit"].GET_SCHEMA()
    assert {i.id: i for i in split.inputs}["boundary_timestep"].default == 978.0
    expert = nodes.NODE_CLASS_MAPPINGS["DCMExpertLoraLoader"].GET_SCHEMA()
    assert {i.id: i for i in expert.inputs}["strength"].default == 1.0


def test_texts_are_single_sourced(comfy):
    """Descriptions and tooltips come from nodes/texts.py (no literal strings in node modules)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "nodes"
    for path in root.glob("*_nodes.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg in ("tooltip", "description", "category", "display_name"):
                if isinstance(node.value, ast.Constant) and node.arg != "display_name":
                    raise AssertionError(f"{path.name}: literal {node.arg}= string; put it in nodes/texts.py")


def test_only_the_adapter_imports_comfy():
    """nodes/ imports only comfy_api.latest + dcm_core; in dcm_core only comfy_adapter touches ComfyUI."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    forbidden = ("comfy", "folder_paths", "latent_preview", "node_helpers", "nodes", "server", "execution")
    for path in list((root / "nodes").rglob("*.py")) + list((root / "dcm_core").rglob("*.py")):
        in_adapter = "comfy_adapter" in path.parts
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if path.parent.name == "nodes":
                    assert top in ("__future__", "typing", "comfy_api"), f"{path}: nodes/ imports {name}"

                if top == "comfy_api":
                    assert path.parts[-2] == "nodes" or path.parent.name == "nodes", f"{path}: comfy_api outside nodes/"
                    assert name == "comfy_api.v0_0_2", f"{path}: import {name} (pin the versioned API)"
                elif top in forbidden:
                    assert in_adapter, f"{path}: imports {name}; only dcm_core/comfy_adapter may"
