"""Teacher feature hooks, head decoding and the discriminator's token grid (dcm-method.md §6.3)."""

from __future__ import annotations

import pytest
import torch

from dcm_core.errors import DCMConfigError
from dcm_core.tiny import build_transformer, hunyuan_config, wan_config
from dcm_core.train.discriminator import Discriminator, TeacherFeatures, feature_layer_indices, token_grid
from dcm_core.train.models import Conditioning, call_velocity


def _model(family: str, **kw):
    cfg = wan_config(dim=128, num_layers=kw.pop("layers", 2), ffn_dim=256) if family == "wan" else hunyuan_config(
        hidden=128, num_single_layers=kw.pop("layers", 1)
    )
    return build_transformer(family, cfg, seed=3).requires_grad_(False)


def _cond(family: str, b: int = 1) -> Conditioning:
    g = torch.Generator().manual_seed(0)
    extra = 1 if family == "hunyuan_video" else 0
    emb = torch.randn(b, 8 + extra, 4096, generator=g) * 0.5
    return Conditioning.from_batch(family, emb, torch.ones(b, 8, dtype=torch.bool), guidance=6016.0)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_last_block_decoded_equals_the_model_output(family):
    """Decoding the LAST block's hidden states with the teacher head reproduces the model output."""
    model = _model(family, layers=3)
    feats = TeacherFeatures(model, family, stride=1)
    assert feats.layers == [0, 1, 2]
    x = torch.randn(1, 16, 3, 6, 10)  # non-square latent → 3×3×5 token grid
    sigma = torch.tensor([0.6])
    cond = _cond(family)
    out = feats.run(lambda z: call_velocity(model, model, z, sigma, cond), x)
    assert out.grid == (3, 3, 5)
    assert all(r.shape == (1, 45, 128) for r in out.raw)
    assert all(d.shape == x.shape for d in out.decoded)
    torch.testing.assert_close(out.decoded[-1], out.velocity, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.decoded[0], out.velocity)


def test_stride_two_picks_every_second_block():
    model = _model("wan", layers=5)
    assert feature_layer_indices(model, "wan", 2) == [0, 2, 4]
    hy = _model("hunyuan_video", layers=4)
    assert feature_layer_indices(hy, "hunyuan_video", 2) == [0, 2]


def test_hooks_are_removed_after_a_run():
    model = _model("wan")
    feats = TeacherFeatures(model, "wan", 2)
    cond = _cond("wan")
    feats.run(lambda z: call_velocity(model, model, z, torch.tensor([0.5]), cond), torch.randn(1, 16, 2, 4, 4))
    assert all(not b._forward_hooks for b in model.blocks)
    assert not model.condition_embedder._forward_hooks


def test_discriminator_heads_follow_the_latent_size():
    disc = Discriminator(num_heads=2, feature_dim=128, inner_channels=64)
    for t, h, w in ((2, 4, 4), (3, 15, 26), (1, 5, 7)):
        feats = [torch.randn(2, t * h * w, 128) for _ in range(2)]
        logits = disc(feats, (t, h, w))
        assert [tuple(l.shape) for l in logits] == [(2 * t, 1, h, w)] * 2
    with pytest.raises(DCMConfigError):
        disc([torch.randn(1, 10, 128)] * 2, (1, 3, 3))
    with pytest.raises(DCMConfigError):
        Discriminator(1, 128, inner_channels=40)


def test_token_grid_rejects_odd_latents():
    model = _model("wan")
    assert token_grid(model, "wan", (1, 16, 21, 60, 104)) == (21, 30, 52)  # the official Wan grid, derived
    assert token_grid(_model("hunyuan_video"), "hunyuan_video", (1, 16, 8, 90, 160)) == (8, 45, 80)  # HY 720p
    with pytest.raises(DCMConfigError):
        token_grid(model, "wan", (1, 16, 2, 5, 4))


def test_gradient_flows_through_the_frozen_teacher_to_the_input():
    model = _model("wan")
    feats = TeacherFeatures(model, "wan", 1)
    x = torch.randn(1, 16, 2, 4, 4, requires_grad=True)
    cond = _cond("wan")
    out = feats.run(lambda z: call_velocity(model, model, z, torch.tensor([0.4]), cond), x)
    (sum(d.square().mean() for d in out.decoded) + out.raw[0].mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
