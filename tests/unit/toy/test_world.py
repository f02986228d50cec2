"""The toy world: deterministic clips, an invertible latent map, a fixed text encoder, a motion metric."""

from __future__ import annotations

import pytest
import torch

from dcm_core.errors import DCMConfigError, DCMError
from dcm_core.toy import comfy_io, world


def test_clips_are_deterministic_from_the_seed():
    a = world.make_clip("red circle moving right", 7)
    b = world.make_clip("red circle moving right", 7)
    c = world.make_clip("red circle moving right", 8)
    assert torch.equal(a.latent, b.latent)
    assert not torch.equal(a.latent, c.latent)
    assert a.latent.shape == world.latent_shape()[1:]


def test_latent_map_is_invertible_on_clips():
    clip = world.make_clip("magenta diamond growing", 3)
    back = world.latent_to_frames(clip.latent)
    assert (back - clip.frames).abs().max() < 1e-5
    # and the map is exactly linear with orthonormal columns (Qᵀ Q = I)
    assert torch.allclose(world.Q.T @ world.Q, torch.eye(12), atol=1e-6)


@pytest.mark.parametrize("motion", world.MOTIONS)
def test_every_motion_moves_and_the_metric_knows_it(motion):
    prompt = f"blue square {motion}"
    clip = world.make_clip(prompt, 11)
    assert (clip.frames[1:] - clip.frames[:-1]).abs().mean() > 1e-3  # the video changes over frames
    assert world.motion_error(clip.frames, prompt) < 0.5  # the world's own clip obeys its law
    other = "blue square moving left" if motion != "moving left" else "blue square moving right"
    assert world.motion_error(clip.frames, other) > 3.0  # ...and another motion law does not fit it
    static = clip.frames[:1].repeat(world.FRAMES, 1, 1, 1)
    if motion not in ("shrinking",):  # a frozen first frame is not the motion (shrinking clamps at 1 px late)
        assert world.motion_error(static, prompt) > 1.0


def test_text_encoder_is_fixed_and_checks_the_vocabulary():
    e1 = world.encode_text("red circle moving right")
    e2 = world.encode_text("red  circle moving RIGHT")
    assert e1.shape == (world.TEXT_TOKENS, world.TEXT_DIM)
    assert torch.equal(e1, e2)
    assert not torch.equal(e1, world.encode_text("red circle moving left"))
    assert torch.count_nonzero(world.encode_text("")) == 0
    with pytest.raises(DCMConfigError, match="unknown words: purple"):
        world.encode_text("purple circle moving right")
    with pytest.raises(DCMConfigError, match="colour"):
        world.encode_text("circle moving right")


def test_comfy_values():
    cond = comfy_io.encode_conditioning("green circle bouncing")
    assert cond[0][0].shape == (1, world.TEXT_TOKENS, world.TEXT_DIM)
    assert comfy_io.check_prompt("green circle bouncing") is True
    assert "not in the toy world" in comfy_io.check_prompt("green dog bouncing")
    from dcm_core.latents import from_model_space

    clip = world.make_clip("green circle bouncing", 1)
    raw = from_model_space(clip.latent[None], "wan")
    imgs = comfy_io.decode_images(raw)
    assert imgs.shape == (world.FRAMES, world.SIZE, world.SIZE, 3)
    assert torch.allclose(imgs, ((clip.frames.permute(0, 2, 3, 1) + 1) / 2), atol=1e-4)
    with pytest.raises(DCMError, match="expected a toy video latent"):
        comfy_io.decode_images(torch.zeros(1, 4, 8, 8))
