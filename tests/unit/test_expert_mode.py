"""Expert switching on the diffusers model (dcm_core.modeling.expert_mode), the path of the reference sampler,
the demo and the trainer's validation: a run cancelled in the middle of a detail-expert forward (Ctrl-C, an
error raised by a hook) leaves the model in the semantic state, and the next run equals an undisturbed one."""

from __future__ import annotations

import pytest
import torch

from dcm_core import tiny
from dcm_core.modeling import EXPERT_MODULES, adapters_enabled, velocity
from dcm_core.sampler import sample_dcm
from dcm_core.schedule import DETAIL, SEMANTIC, build_sigmas


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (tests/conftest.py: one_torch_thread)."""


def _setup():
    model = tiny.make_official_model("wan", tiny.wan_config(num_layers=2), rank=4, alpha=8.0, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    return model, x, ctx


def test_cancel_inside_a_detail_forward_restores_the_semantic_expert():
    model, noise, ctx = _setup()
    sigmas = build_sigmas("wan2.1-t2v-6step")
    modules = {name: model._modules[name] for pair in EXPERT_MODULES["wan"].items() for name in pair}
    enabled = adapters_enabled(model)  # the state outside expert_mode, to be restored

    def model_fn(x, sigma, expert):
        return velocity(model, x, sigma, ctx, expert)

    with torch.no_grad():
        v_sem, v_det = velocity(model, noise, 0.5, ctx, SEMANTIC), velocity(model, noise, 0.5, ctx, DETAIL)
        assert (v_det - v_sem).abs().max().item() > 1e-2  # the experts differ, so a stuck detail state shows
        clean = sample_dcm(model_fn, noise, sigmas, 978)

        def cancel_in_detail(module, args):
            if adapters_enabled(model):  # only inside a detail-expert forward
                raise KeyboardInterrupt("cancel")

        hook = model.blocks[1].register_forward_pre_hook(cancel_in_detail)
        try:
            with pytest.raises(KeyboardInterrupt):
                sample_dcm(model_fn, noise, sigmas, 978)
        finally:
            hook.remove()
        assert adapters_enabled(model) == enabled
        assert {name: model._modules[name] for name in modules} == modules  # embedder / head swapped back
        assert torch.equal(velocity(model, noise, 0.5, ctx, SEMANTIC), v_sem)
        assert torch.equal(sample_dcm(model_fn, noise, sigmas, 978), clean)
