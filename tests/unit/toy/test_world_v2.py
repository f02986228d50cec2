"""Toy world v2: textured clips in v1's language and latent map, and the analytic measurements of the toy VBench.

Each measurement is checked both ways: a clip the world renders itself scores (near) perfect, and a
degraded one (blurred, texture sliding, wrong law, wrong colour) scores worse.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dcm_core.toy import world
from dcm_core.toy import world_v2 as W


def _blur(frames: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
    x = frames.reshape(-1, 1, *frames.shape[-2:])
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k).view_as(frames)


def test_v2_clips_are_deterministic_textured_and_keep_the_v1_interfaces():
    a, b, c = W.make_clip("red circle moving right", 7), W.make_clip("red circle moving right", 7), W.make_clip(
        "red circle moving right", 8)
    assert torch.equal(a.latent, b.latent) and not torch.equal(a.latent, c.latent)
    assert a.latent.shape == world.latent_shape()[1:]
    assert (world.latent_to_frames(a.latent) - a.frames).abs().max() < 1e-5  # v1's invertible latent map
    assert torch.equal(W.encode_text("red circle moving right"), world.encode_text("red circle moving right"))
    assert 0.7 < float(a.latent.std()) < 1.4  # near unit scale, like v1
    # fine structure: far more high-frequency energy than the flat v1 clip of the same prompt and seed
    assert W.hf_energy(a.frames) > 2 * W.hf_energy(world.make_clip("red circle moving right", 7).frames)
    # the texture differs between seeds of one prompt (not fixed by the prompt)
    assert a.texture != c.texture
    assert W.get_world("v1") is world and W.get_world("v2") is W
    with pytest.raises(ValueError):
        W.get_world("v3")


@pytest.mark.parametrize("seed", range(12))
def test_rendered_clips_score_perfectly(seed):
    clip = W.random_clip(seed)
    s = W.score_clip(clip.frames, clip.prompt)
    assert s["colour_ok"] and s["shape_ok"] and s["motion_ok"], s
    assert s["motion_error_px"] < 0.8
    # objects move 1.5 px per frame: both frames are resampled bilinearly at sub-pixel offsets, which leaves a
    # floor (200 rendered clips: median 0.002, max 0.046) below a sliding texture's
    assert s["warp_error"] < 0.05


def test_texture_moves_rigidly_and_a_sliding_texture_is_caught():
    clip = W.make_clip("green square moving right", 5)
    good = W.warp_error(clip.frames)
    # the same clip whose texture phase drifts in image space between frames (texture not attached)
    frames = []
    for i in range(world.FRAMES):
        tex = replace(clip.texture, phase=(clip.texture.phase[0] + 0.3 * i, clip.texture.phase[1] + 0.2 * i))
        st = world.ClipState(clip.state.xs[i:i + 1], clip.state.ys[i:i + 1], clip.state.radii[i:i + 1])
        frames.append(W.render(clip.prompt, st, clip.background, tex)[0])
    sliding = torch.stack(frames)
    assert W.motion_error(sliding, clip.prompt) < 0.8  # the object still moves right...
    slide = W.warp_error(sliding)
    assert slide > 5 * good and slide > 0.04  # ...but its texture does not move with it


def test_blur_lowers_sharpness_and_shift_raises_motion_error():
    clip = W.make_clip("yellow diamond moving down", 2)
    assert W.hf_energy(_blur(clip.frames)) < 0.5 * W.hf_energy(clip.frames)
    shifted = clip.frames.clone()
    shifted[3:] = torch.roll(clip.frames[3:], shifts=3, dims=-1)  # the object jumps 3 px sideways mid-clip
    assert W.motion_error(shifted, clip.prompt) > W.motion_error(clip.frames, clip.prompt) + 1.0


def test_classifiers_reject_wrong_colour_shape_and_motion():
    clip = W.make_clip("magenta circle moving left", 4)
    assert W.classify_colour(clip.frames) == "magenta"
    other = W.make_clip("blue circle moving left", 4)
    assert W.classify_colour(other.frames) == "blue"
    assert W.classify_shape(W.make_clip("magenta diamond moving left", 4).frames) == "diamond"
    assert W.classify_shape(W.make_clip("magenta square moving left", 4).frames) == "square"
    assert W.classify_motion(clip.frames) == "moving left"
    s = W.score_clip(clip.frames, "magenta circle moving right")
    assert s["colour_ok"] and s["shape_ok"] and not s["motion_ok"] and s["motion_error_px"] > 3
    reversed_clip = clip.frames.flip(0)
    assert W.classify_motion(reversed_clip) == "moving right"


def test_empty_and_noise_frames_do_not_crash_and_score_badly():
    empty = torch.full((world.FRAMES, 3, world.SIZE, world.SIZE), -1.0)
    s = W.score_clip(empty, "red circle moving right")
    assert not s["all_ok"] and s["motion_error_px"] == world.SIZE and math.isnan(s["warp_error"])
    noise = torch.rand((world.FRAMES, 3, world.SIZE, world.SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert not W.score_clip(noise, "red circle moving right")["all_ok"]
