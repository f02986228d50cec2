"""The live-server soak's own checks (tests/soak/soak.py), without a server: they must be able to fail."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tools.pathimport import load_path_module

ROOT = Path(__file__).resolve().parents[2]
soak = load_path_module("dcm_soak", ROOT / "tests" / "soak" / "soak.py")


def test_rss_growth_figure_flags_a_leak_and_passes_a_flat_curve():
    mb = 2**20
    flat = [(i, 550 * mb + (i % 3) * mb) for i in range(60)]
    assert abs(soak.rss_figures(flat, 20)["growth_pct"]) < 0.5
    leaking = [(i, int(500 * mb * (1 + 0.004 * i))) for i in range(60)]  # +0.4 % per run
    assert soak.rss_figures(leaking, 20)["growth_pct"] > 5.0
    assert soak.rss_figures(flat[:25], 20)["growth_pct"] is None  # too few runs after warm-up: no figure


@pytest.mark.parametrize(
    ("info", "where"),
    [
        ({"node_type": "DCMSoakPace", "last_step": None, "switch": 3}, "before sampling (DCMSoakPace)"),
        ({"node_type": "DCMDualExpertSampler", "last_step": None, "switch": 3}, "in the sampler, before its first step"),
        ({"node_type": "DCMDualExpertSampler", "last_step": 3, "switch": 3}, "at the expert switch"),
        ({"node_type": "SamplerCustomAdvanced", "last_step": 2, "switch": 3}, "between two sampler steps"),
    ],
)
def test_where_an_interrupt_landed(info, where):
    assert soak.where_landed(info) == where


def test_traceback_scan_separates_pack_frames(tmp_path):
    pack = f"/tmp/x/custom_nodes/{soak.cs.PACK_DIR_NAME}/dcm_core/comfy_adapter/loading.py"
    log = tmp_path / "server.log"
    log.write_text(
        "got prompt\n"
        "Traceback (most recent call last):\n"
        '  File "/root/ComfyUI/nodes.py", line 2131, in load_custom_node\n'
        "    module_spec.loader.exec_module(module)\n"
        "ModuleNotFoundError: No module named 'torchaudio'\n"
        "!!! Exception during processing !!!\n"
        "Traceback (most recent call last):\n"
        '  File "/root/ComfyUI/execution.py", line 496, in execute\n'
        "    output_data = get_output_data()\n"
        f'  File "{pack}", line 96, in resolve_file\n'
        "    raise DCMFileNotFoundError(\n"
        "x.dcm_core.errors.DCMFileNotFoundError: DCM Checkpoint Loader: 'a.safetensors' was not found\n"
        "Prompt executed in 0.03 seconds\n"
    )
    found = soak.scan_tracebacks(log)
    assert [t["last"] for t in found["other"]] == ["ModuleNotFoundError: No module named 'torchaudio'"]
    assert len(found["pack"]) == 1 and "DCMFileNotFoundError" in found["pack"][0]["last"]


@pytest.mark.parametrize("kind", soak.KINDS)
def test_generated_prompts_are_closed_graphs_with_a_saved_latent(kind):
    for seed in range(6):
        p = soak.make_variant(kind, random.Random(seed), pace_ms=8)
        assert p[soak.SAVE]["class_type"] == "SaveLatent"
        assert "DCMTestCapture" not in {n["class_type"] for n in p.values()}
        for nid, node in p.items():
            for name, val in node["inputs"].items():
                if isinstance(val, list) and len(val) == 2 and isinstance(val[0], str):
                    assert val[0] in p, f"{kind}: node {nid}.{name} links to missing node {val[0]}"
        assert soak.sampler_plan(p)["steps"] >= 1
    same = soak.make_variant(kind, random.Random(7), pace_ms=8)
    assert soak.make_variant(kind, random.Random(7), pace_ms=8) == same  # seeded


def test_prompt_key_ignores_only_the_output_prefix():
    p = soak.make_variant("wan_sampler", random.Random(1), pace_ms=8)
    q = soak.make_variant("wan_sampler", random.Random(1), pace_ms=8)
    q[soak.SAVE]["inputs"]["filename_prefix"] = "soak/other_0007"
    assert soak.prompt_key(p) == soak.prompt_key(q)
    q["7"]["inputs"]["seed"] += 1
    assert soak.prompt_key(p) != soak.prompt_key(q)
