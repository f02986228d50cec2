"""The DCM experts compose with the stock nodes artists stack for speed and length.

Each test runs a workflow (API prompt) twice: DCM Checkpoint Loader → <stock node on both outputs> → DCM
Dual-Expert Sampler, and the same experts without the DCM mechanism (converted files through stock
UNETLoader + LoraLoaderModelOnly, DCM Timestep Split, two SamplerCustomAdvanced) with the same stock node.
Where the stock chain defines the answer, the two must agree; every test also checks that the stock node
changed the result, so a node silently dropped by the DCM path cannot pass.
"""

from __future__ import annotations

import pytest

from dcm_core.latents import to_model_space

TOL = 1e-4  # fp32; measured ~1e-6 (see each test)


def _max_abs(a, b) -> float:
    return (to_model_space(a, "wan") - to_model_space(b, "wan")).abs().max().item()


def _dcm_prompt(dcm, seed: int, *, length: int | None = None) -> dict:
    p = dcm.sampler_prompt("wan", seed=seed)
    if length is not None:
        p["4"]["inputs"]["length"] = length
    return p


def _stock_prompt(dcm, seed: int, *, length: int | None = None) -> dict:
    """The same run with no DCM loader / sampler: UNETLoader + LoraLoaderModelOnly, split, two stock samplers."""
    p = dcm.split_chain_prompt("wan", seed, stock_loaders=True)
    if length is not None:
        p["4"]["inputs"]["length"] = length
    return p


def _wrap_models(p: dict, node: str, inputs: dict, *, stock: bool) -> dict:
    """Put ``node`` (one instance per expert) between the experts and whatever samples with them."""
    sem_src, det_src = (["1", 0], ["20", 0]) if stock else (["1", 0], ["1", 1])
    p["30"] = {"class_type": node, "inputs": {"model": sem_src, **inputs}}
    p["31"] = {"class_type": node, "inputs": {"model": det_src, **inputs}}
    if stock:
        p["16"]["inputs"]["model"] = ["30", 0]
        p["17"]["inputs"]["model"] = ["31", 0]
    else:
        p["5"]["inputs"]["semantic_model"] = ["30", 0]
        p["5"]["inputs"]["detail_model"] = ["31", 0]
    return p


@pytest.mark.slow
def test_torch_compile_on_both_experts_equals_eager_and_does_not_recompile_per_switch(dcm):
    """Stock TorchCompileModel (inductor) on both outputs of DCM Checkpoint Loader.

    With the pack's old forward-hook bypass the compiled result was 0.24 max-abs off (the hooks were gated on
    patch uuids that dynamo does not guard). Now the detail expert is ordinary weight patches, which compiled
    graphs read as inputs. After warm-up (one run), another run with both experts compiles nothing new.
    Measured: compiled vs eager 4.8e-7 max abs (model space); 4 min on 2 CPU cores (inductor)."""
    torch = dcm.torch
    from torch._dynamo.utils import counters

    eager = dcm.run(_dcm_prompt(dcm, 21))
    compiled_prompt = lambda seed: _wrap_models(_dcm_prompt(dcm, seed), "TorchCompileModel", {"backend": "inductor"}, stock=False)  # noqa: E731
    compiled = dcm.run(compiled_prompt(21))
    diff = _max_abs(compiled, eager)
    print(f"[compose] torch.compile vs eager: {diff:.3e}")
    assert diff <= TOL
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # dynamo did compile the diffusion model
    again = dcm.run(compiled_prompt(22))  # a new seed: the same graphs, both experts, two switches
    assert counters["stats"]["unique_graphs"] == graphs, "an expert switch recompiled after warm-up"
    assert not torch.equal(again, compiled)
    assert _max_abs(again, dcm.run(_dcm_prompt(dcm, 22))) <= TOL


@pytest.mark.slow
def test_context_windows_on_both_experts_equal_the_stock_chain(dcm):
    """Stock WanContextWindowsManual on both experts: DCM sampler == the stock chain with the same windows.

    17 frames → 5 latent frames, windows of 9 → 3 latent frames: several windows per step. Measured
    max abs 0 (bit-equal); the windows change the output by 0.11, so a dropped context handler fails."""
    windows = {"context_length": 9, "context_overlap": 4, "context_schedule": "standard_static", "context_stride": 1,
               "closed_loop": False, "fuse_method": "pyramid"}
    dcm_out = dcm.run(_wrap_models(_dcm_prompt(dcm, 23, length=17), "WanContextWindowsManual", windows, stock=False))
    stock_out = dcm.run(_wrap_models(_stock_prompt(dcm, 23, length=17), "WanContextWindowsManual", windows, stock=True))
    plain = dcm.run(_dcm_prompt(dcm, 23, length=17))
    diff, effect = _max_abs(dcm_out, stock_out), _max_abs(dcm_out, plain)
    print(f"[compose] context windows: DCM vs stock {diff:.3e}; effect of the windows {effect:.3e}")
    assert diff <= TOL
    assert effect > 100 * TOL


def test_hook_lora_on_the_conditioning_equals_the_stock_chain(dcm):
    """Stock hook LoRA (CreateHookLoraModelOnly → ConditioningSetProperties) on the prompt both experts sample.

    ComfyUI applies the hook's weights for the conditioning that carries it, on whichever expert runs it.
    Measured: DCM vs stock chain 0 (bit-equal); the hook changes the output by 0.072."""
    lora = dcm.style_lora()

    def hooked(p: dict) -> dict:
        p["40"] = {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": lora, "strength_model": 1.0}}
        p["41"] = {"class_type": "ConditioningSetProperties", "inputs": {
            "cond_NEW": ["2", 0], "strength": 1.0, "set_cond_area": "default", "hooks": ["40", 0]}}
        for node in p.values():
            for name in ("positive", "conditioning"):
                if node["inputs"].get(name) == ["2", 0]:
                    node["inputs"][name] = ["41", 0]
        return p

    dcm_out = dcm.run(hooked(_dcm_prompt(dcm, 24)))
    stock_out = dcm.run(hooked(_stock_prompt(dcm, 24)))
    plain = dcm.run(_dcm_prompt(dcm, 24))
    diff, effect = _max_abs(dcm_out, stock_out), _max_abs(dcm_out, plain)
    print(f"[compose] hook LoRA: DCM vs stock {diff:.3e}; effect of the hook {effect:.3e}")
    assert diff <= TOL
    assert effect > 100 * TOL
    # and the next plain run is not affected by the hook (ComfyUI removed its weights)
    assert _max_abs(dcm.run(_dcm_prompt(dcm, 24)), plain) == 0.0


def test_model_save_of_the_detail_output_holds_the_detail_expert(dcm):
    """Stock ModelSave on detail_model writes the detail expert's weights (LoRA merged, own embedder/head).

    With the old bypass the LoRA lived in forward hooks, and on newer ComfyUI (which saves lazily from the
    patch list) a saved detail model would have lacked it. Checked through the user's path: the saved file,
    loaded by stock UNETLoader as the detail expert, samples like DCM Checkpoint Loader's detail output.
    Measured 0 (bit-equal); the semantic file in its place differs by 1.2."""
    import shutil
    from pathlib import Path

    import folder_paths

    fam = dcm.families["wan"]
    prefix = "dcm_saved/detail"
    dcm.h.run({
        "1": {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": fam.official, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSave", "inputs": {"model": ["1", 1], "filename_prefix": prefix}},
    })
    saved = sorted((Path(folder_paths.get_output_directory()) / "dcm_saved").glob("detail_*.safetensors"))
    assert saved, "ModelSave wrote no file"
    target = dcm.h.model_dir("diffusion_models") / "dcm_saved_detail.safetensors"
    shutil.copyfile(saved[-1], target)
    try:
        p = _dcm_prompt(dcm, 25)
        p["50"] = {"class_type": "UNETLoader", "inputs": {"unet_name": target.name, "weight_dtype": "default"}}
        p["5"]["inputs"]["detail_model"] = ["50", 0]
        from_saved = dcm.run(p)
        p["50"]["inputs"]["unet_name"] = fam.semantic  # what a save without the expert would hold
        without = dcm.run(p)
    finally:
        target.unlink()
    reference = dcm.run(_dcm_prompt(dcm, 25))
    diff, effect = _max_abs(from_saved, reference), _max_abs(without, reference)
    print(f"[compose] ModelSave detail: {diff:.3e}; without the expert {effect:.3e}")
    assert diff <= TOL
    assert effect > 100 * TOL
