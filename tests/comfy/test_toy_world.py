"""The bundled toy experts in real ComfyUI: the toy workflow runs, and equals the demo's DCM sample."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dcm_core.latents import to_model_space
from dcm_core.toy import models as M
from dcm_core.toy import world
from dcm_core.toy.demo import schedule_sigmas

ROOT = Path(__file__).resolve().parents[2]
TWIN = ROOT / "tests" / "comfy" / "workflows_api" / "dcm_toy_world.json"
pytestmark = pytest.mark.skipif(not (M.WEIGHTS_DIR / M.DCM_FILE).exists(), reason="bundled toy weights missing")


@pytest.fixture(scope="module")
def toy_prompt(comfy):
    dst = comfy.model_dir("diffusion_models") / M.DCM_FILE
    if not dst.exists():
        os.symlink(M.WEIGHTS_DIR / M.DCM_FILE, dst)
    return json.loads(TWIN.read_text())


@pytest.mark.parametrize("text, seed", [("red circle moving right", 0), ("green diamond bouncing", 5)])
def test_toy_workflow_equals_the_demo_sampler(comfy, toy_prompt, text, seed):
    import nodes

    prompt = json.loads(json.dumps(toy_prompt))
    prompt["2"]["inputs"]["prompt"] = text
    prompt["5"]["inputs"]["seed"] = seed
    prompt["99"] = {"class_type": "DCMTestCapture", "inputs": {"samples": ["5", 0], "key": "toy"}}
    res = comfy.run(prompt)
    assert res.success, res.error_text()
    raw = nodes.NODE_CLASS_MAPPINGS["DCMTestCapture"].STORE["toy"]["samples"]
    assert raw.shape == world.latent_shape()
    # the demo's DCM path: same noise (seeded CPU randn, as KSampler), same conditioning, the demo's default
    # sigmas (the toy's recommended steps on its grid) and the bundle's boundary
    st = M.toy_settings()
    with torch.no_grad():
        ref = M.sample_experts(M.load_dcm(), M.make_noise(seed), world.encode_text(text)[None],
                               schedule_sigmas(st, "toy"), st.boundary_timestep)
    diff = (to_model_space(raw, "wan") - ref).abs().max().item()
    print(f"toy world ComfyUI vs demo ({text!r}, seed {seed}): max |diff| = {diff:.3e}")
    assert diff <= 1e-4
    webps = list((comfy.output).glob("DCM_toy*.webp"))
    assert webps and webps[0].stat().st_size > 0
