"""Runtime behaviour of the DCM nodes in real ComfyUI: cancel, caching, shared weights, stacking, loaders."""

from __future__ import annotations

import os

import pytest
import torch

from dcm_core.latents import to_model_space


def _semantic_reference_weights(dcm, family="wan"):
    from dcm_core.formats import load_experts

    fam = dcm.families[family]
    bundle = load_experts(dcm.h.model_dir("diffusion_models") / fam.official, dtype=torch.float32)
    return bundle.semantic_sd


def _assert_semantic_weights(dcm, family="wan"):
    """Once ComfyUI loads the semantic clone (as the next run does), the shared base model holds exactly
    the semantic expert (no detail patches applied)."""
    import comfy.model_management

    loading = dcm.loading()
    semantic, _ = loading.load_dcm_checkpoint(dcm.families[family].official, "default")
    comfy.model_management.load_models_gpu([semantic])
    base = semantic.model
    ref = _semantic_reference_weights(dcm, family)
    sd = base.diffusion_model.state_dict()
    assert set(sd) == set(ref)
    bad = [k for k in ref if not torch.equal(sd[k].float(), ref[k].float())]
    assert not bad, f"{len(bad)} weights differ from the semantic expert, e.g. {bad[:3]}"


@pytest.mark.parametrize("cancel_step", [1, 4])
def test_cancel_then_rerun_is_bit_identical_and_unpatched(dcm, comfy, cancel_step):
    from comfy import model_management as mm
    from comfy import utils as comfy_utils

    prompt = dcm.sampler_prompt("wan", seed=21)
    full = dcm.run(prompt)
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):  # like main.py's hijack_progress
        seen.append((value, total))
        if value == cancel_step + 1:
            mm.interrupt_current_processing()
        mm.throw_exception_if_processing_interrupted()

    comfy.new_executor()  # so the sampler really runs again
    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        res = comfy.run(dcm.sampler_prompt("wan", seed=21))
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert not res.success
    assert any(ev == "execution_interrupted" for ev, _ in res.messages)
    # one progress bar over all 6 steps, stopped at the cancel step
    assert seen == [(i + 1, 6) for i in range(cancel_step + 1)]
    _assert_semantic_weights(dcm)
    again = dcm.run(prompt)
    assert torch.equal(again, full)


def test_weights_are_semantic_after_a_normal_run(dcm):
    dcm.run(dcm.sampler_prompt("wan", seed=2))
    _assert_semantic_weights(dcm)


def test_second_run_does_not_reread_checkpoint(dcm, comfy, monkeypatch):
    formats = comfy.pack_module("dcm_core.formats")
    loading = dcm.loading()
    calls = []
    real = formats.load_experts

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(formats, "load_experts", counting)
    prompt = dcm.sampler_prompt("hunyuan_video", seed=1)
    loading.clear_cache()
    comfy.new_executor()
    first = dcm.run(prompt)
    assert len(calls) == 1
    comfy.new_executor()  # empty node cache: the loader node runs again
    assert torch.equal(dcm.run(prompt), first)
    comfy.new_executor()
    dcm.run(dcm.sampler_prompt("hunyuan_video", seed=2))  # changed seed
    assert len(calls) == 1
    # a changed file (mtime) is read again
    path = dcm.h.model_dir("diffusion_models") / dcm.families["hunyuan_video"].official
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    comfy.new_executor()
    assert torch.equal(dcm.run(prompt), first)
    assert len(calls) == 2


def test_checkpoint_loader_on_a_detail_file_rereads_when_its_semantic_partner_changes(dcm, comfy, monkeypatch):
    """Picking the *_detail_expert file in DCM Checkpoint Loader: the cache also watches the semantic partner."""
    fam = dcm.families["wan"]
    loading = dcm.loading()
    models = dcm.h.model_dir("diffusion_models")
    det = models / fam.detail
    if not det.exists():
        os.symlink(dcm.h.model_dir("loras") / fam.detail, det)
    prompt = dcm.sampler_prompt("wan", seed=5, ckpt=fam.detail)
    formats = dcm.h.pack_module("dcm_core.formats")
    calls = []
    real = formats.load_experts
    monkeypatch.setattr(formats, "load_experts", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    loading.clear_cache()
    comfy.new_executor()
    first = dcm.run(prompt)
    reads = len(calls)
    comfy.new_executor()
    assert torch.equal(dcm.run(prompt), first) and len(calls) == reads  # cached
    sem = os.path.realpath(models / fam.semantic)
    st = os.stat(sem)
    os.utime(sem, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    comfy.new_executor()
    assert torch.equal(dcm.run(prompt), first)
    assert len(calls) == reads + 1  # the changed partner was read again


def test_converted_files_with_pack_and_stock_loaders_equal_official(dcm, comfy):
    fam = dcm.families["wan"]
    official = dcm.run(dcm.sampler_prompt("wan", seed=13))
    # DCMCheckpointLoader on the converted semantic file (finds its detail expert in models/loras)
    converted = dcm.run(dcm.sampler_prompt("wan", seed=13, ckpt=fam.semantic))
    assert (to_model_space(converted, "wan") - to_model_space(official, "wan")).abs().max().item() < 1e-5
    # stock UNETLoader + DCMExpertLoraLoader / stock LoraLoaderModelOnly
    for loader in ("DCMExpertLoraLoader", "LoraLoaderModelOnly"):
        p = dcm.sampler_prompt("wan", seed=13)
        p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": fam.semantic, "weight_dtype": "default"}}
        strength = "strength" if loader == "DCMExpertLoraLoader" else "strength_model"
        p["20"] = {"class_type": loader, "inputs": {"model": ["1", 0], "lora_name": fam.detail, strength: 1.0}}
        p["5"]["inputs"]["detail_model"] = ["20", 0]
        out = dcm.run(p)
        assert (to_model_space(out, "wan") - to_model_space(official, "wan")).abs().max().item() < 1e-5, loader


@pytest.mark.parametrize("expert_output", [0, 1], ids=["on-semantic", "on-detail"])
def test_style_lora_stacks_on_the_chosen_expert_only(dcm, expert_output):
    """A stock LoraLoaderModelOnly on one output of the DCM loader styles that expert's steps and no other.

    Expected result built without the DCM loader: stock UNETLoader of the converted semantic file, the detail
    expert as LoraLoaderModelOnly, the style LoRA stacked on the chosen expert only (``expected``) or on both
    (``leaked``: what a style leaking through the shared base weights would give). Measured (fp32 max abs, model
    space): DCM vs expected 0 (bit-equal) for both experts; expected vs leaked 5.5e-2 (style on the semantic
    expert) / 8.1e-3 (on the detail expert); style vs no style 8.2e-3 / 5.5e-2. Tolerance 1e-4 (fp32), each effect
    must exceed 5e-3 (50x the tolerance)."""
    style = dcm.style_lora()
    fam = dcm.families["wan"]
    chosen = "semantic_model" if expert_output == 0 else "detail_model"

    def dcm_chain(strength: float) -> dict:
        p = dcm.sampler_prompt("wan", seed=17)
        p["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", expert_output], "lora_name": style, "strength_model": strength}}
        p["5"]["inputs"][chosen] = ["20", 0]
        return p

    def stock_chain(styled: tuple[str, ...]) -> dict:
        p = dcm.sampler_prompt("wan", seed=17)
        p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": fam.semantic, "weight_dtype": "default"}}
        p["21"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": fam.detail, "strength_model": 1.0}}
        models = {"semantic_model": ["1", 0], "detail_model": ["21", 0]}
        for i, name in enumerate(styled):
            p[f"3{i}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": models[name], "lora_name": style, "strength_model": 1.0}}
            models[name] = [f"3{i}", 0]
        p["5"]["inputs"].update(models)
        return p

    base = dcm.run(dcm.sampler_prompt("wan", seed=17))
    assert torch.equal(dcm.run(dcm_chain(0.0)), base)
    out = dcm.run(dcm_chain(1.0))
    expected = dcm.run(stock_chain((chosen,)))
    leaked = dcm.run(stock_chain(("semantic_model", "detail_model")))

    def gap(a, b) -> float:
        return (to_model_space(a, "wan") - to_model_space(b, "wan")).abs().max().item()

    print(f"[style] on {chosen}: DCM vs expected {gap(out, expected):.3e}; expected vs leaked {gap(expected, leaked):.3e}; "
          f"style effect {gap(out, base):.3e}")
    assert gap(out, expected) <= 1e-4
    assert gap(expected, leaked) > 5e-3 and gap(out, base) > 5e-3  # a leak and a dropped style would both be seen
    _assert_semantic_weights(dcm)


def test_input_models_are_not_mutated(dcm, comfy):
    loading, sampling = dcm.loading(), dcm.sampling()
    sem, det = loading.load_dcm_checkpoint(dcm.families["wan"].official, "default")

    def snapshot(m):
        return (m.patches_uuid, {k: len(v) for k, v in m.patches.items()}, repr(m.model_options), dict(m.object_patches))

    before = (snapshot(sem), snapshot(det))
    ctx, _ = dcm.cond("wan")
    latent = {"samples": dcm.empty_latent()}
    out = sampling.sample_dual_expert(sem, det, [[ctx, {}]], [[ctx * 0, {}]], latent, 4, "wan2.1-t2v-6step", 978.0, 1.0, 1.0)
    assert (snapshot(sem), snapshot(det)) == before
    assert out is not latent and torch.equal(latent["samples"], dcm.empty_latent())
