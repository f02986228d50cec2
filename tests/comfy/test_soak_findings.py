"""Regression tests for what the live-server soak (tests/soak, issue 15) found, in-process and fast.

* A model file replaced or deleted on disk between two runs of the *same* prompt: ComfyUI's node
  cache hands back the loader's previous output unless the loader's fingerprint changes with the
  file, so the run silently uses the old model (or "succeeds" after the file was deleted).
* ComfyUI 0.3.64 checks V1 list combos against their options at ``/prompt``, but not V3
  ``io.Combo`` inputs (execution.py only checks ``isinstance(input_type, list)``): an unknown
  preset / weight_dtype or a missing model file passes validation and fails only at run time,
  with a traceback in the server log. The pack's nodes have to refuse them in ``validate_inputs``.
"""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def swap_file(dcm, tmp_path):
    """models/diffusion_models/soak_swap.safetensors (tiny Wan, seed 11) + a same-size replacement (seed 12)."""
    from dcm_core import tiny

    paths = []
    for seed in (11, 12):
        model = tiny.make_official_model("wan", tiny.wan_config(num_layers=2), rank=4, alpha=8.0, seed=seed)
        paths.append(tiny.save_official_checkpoint(model, tmp_path / f"swap_{seed}.safetensors", metadata={"lora_alpha": "8"}))
    assert paths[0].stat().st_size == paths[1].stat().st_size
    dst = dcm.h.model_dir("diffusion_models") / "soak_swap.safetensors"
    shutil.copyfile(paths[0], dst)
    yield dst, paths[0], paths[1]
    dst.unlink(missing_ok=True)


def _replace(dst, src):
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def test_checkpoint_replaced_on_disk_is_used_by_the_next_run_of_the_same_prompt(dcm, comfy, swap_file):
    dst, _a, b = swap_file

    def prompt(key):  # only the capture key differs: the capture node re-runs, everything upstream may be cached
        return dcm.sampler_prompt("wan", ckpt=dst.name, key=key)

    ex = comfy.new_executor()  # one server: the node cache lives across the two runs
    out_a = dcm.run(prompt("swap_1"), "swap_1", executor=ex).clone()
    _replace(dst, b)
    out_after = dcm.run(prompt("swap_2"), "swap_2", executor=ex).clone()
    out_b_fresh = dcm.run(prompt("swap_fresh"), "swap_fresh", executor=comfy.new_executor()).clone()
    assert not out_a.equal(out_b_fresh), "the two checkpoints must give different outputs for this test to mean anything"
    assert out_after.equal(out_b_fresh), (
        "DCM Checkpoint Loader: after 'soak_swap.safetensors' was replaced on disk (same name, same size, new "
        "content), the next run of the same prompt still used the old model: ComfyUI's node cache returned the "
        "loader's previous output (the loader's fingerprint does not follow the file)"
    )


def test_checkpoint_deleted_on_disk_fails_the_next_run_naming_the_file(dcm, comfy, swap_file):
    dst, _a, _b = swap_file
    prompt = dcm.sampler_prompt("wan", ckpt=dst.name)
    ex = comfy.new_executor()
    dcm.run(prompt, executor=ex)
    dst.unlink()
    res = comfy.run(prompt, executor=ex, check_valid=False)
    text = res.error_text() + str(res.node_errors)
    assert not res.success and dst.name in text, (
        f"after '{dst.name}' was deleted, the next run of the same prompt did not fail naming it "
        f"(success={res.success}): the node cache served the deleted model. {text[:500]}"
    )


@pytest.mark.parametrize(
    ("what", "node", "change", "fragment"),
    [
        ("unknown preset", "5", {"preset": "wan9-99step"}, "wan9-99step"),
        ("missing checkpoint file", "1", {"ckpt_name": "dcm_missing.safetensors"}, "dcm_missing.safetensors"),
        ("unknown weight_dtype", "1", {"weight_dtype": "fp4"}, "fp4"),
    ],
)
def test_v3_combo_values_are_refused_by_validation(dcm, comfy, what, node, change, fragment):
    prompt = dcm.sampler_prompt("wan")
    prompt[node]["inputs"].update(change)
    res = comfy.run(prompt, check_valid=False)
    assert res.node_errors and fragment in str(res.node_errors), (
        f"{what}: /prompt validation accepted {change} (ComfyUI 0.3.64 does not check V3 Combo values against "
        f"their options); the run then fails with a traceback in the server log. Refuse it in the node's "
        f"validate_inputs with the pack's message. Run result: success={res.success} {res.error_text()[:300]}"
    )


def test_missing_expert_file_is_refused_by_validation(dcm, comfy):
    prompt = dcm.sampler_prompt("wan")
    prompt["10"] = {"class_type": "DCMExpertLoraLoader",
                    "inputs": {"model": ["1", 0], "lora_name": "missing_expert.safetensors", "strength": 1.0}}  # fmt: skip
    prompt["5"]["inputs"]["detail_model"] = ["10", 0]
    res = comfy.run(prompt, check_valid=False)
    assert res.node_errors and "missing_expert.safetensors" in str(res.node_errors), (
        "DCM Expert LoRA Loader: a lora_name that is not in models/loras passed /prompt validation (V3 Combo "
        f"values are not checked by ComfyUI 0.3.64). Run result: success={res.success} {res.error_text()[:300]}"
    )
