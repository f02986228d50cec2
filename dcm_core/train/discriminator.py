"""Discriminator heads on the frozen teacher and teacher-head-decoded features (dcm-method.md §6.2–6.3).

* :class:`TeacherFeatures` runs the frozen teacher and captures, with forward hooks (no
  forward replacement), the hidden states after every ``stride``-th block (Wan: ``blocks``;
  HunyuanVideo: ``single_transformer_blocks``, video tokens only) and the conditioning vector
  ``temb`` at the input timestep. Each captured map is also *decoded* by the teacher's own
  output head at that timestep (Wan: ``scale_shift_table`` + ``norm_out`` + ``proj_out``;
  HunyuanVideo: ``norm_out(x, temb)`` + ``proj_out``) and unpatchified to a latent
  ``[B, C, T, H, W]``: those are the feature-matching features.
* :class:`Discriminator` holds one :class:`DiscriminatorHead` per captured map. A head reshapes
  the tokens ``[B, T'·h·w, D]`` to ``[B·T', D, h, w]`` on the token grid **computed from the
  actual latent** (the official heads hard-code 30×52 for Wan and 49×80 for HunyuanVideo,
  §9.1 #4 / issue #22), then applies ``1×1 conv D→C, GroupNorm(32), LeakyReLU`` → a residual
  ``1×1 conv C→C, GroupNorm(32), LeakyReLU`` → ``1×1 conv C→1``: one logit per latent frame
  and token.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..errors import DCMConfigError
from ..schedule import FAMILY_HUNYUAN, FAMILY_WAN

#: Official inner width of a head.
DEFAULT_INNER_CHANNELS = 1024


def feature_blocks(model: nn.Module, family: str) -> nn.ModuleList:
    """The block list the discriminator reads: Wan ``blocks``, HunyuanVideo ``single_transformer_blocks``."""
    if family == FAMILY_WAN:
        return model.blocks
    if family == FAMILY_HUNYUAN:
        return model.single_transformer_blocks
    raise DCMConfigError(f"no discriminator feature blocks for family {family!r}")


def feature_layer_indices(model: nn.Module, family: str, stride: int) -> list[int]:
    """Blocks 0, stride, 2·stride, … (official: stride 2 → Wan 15 heads, HunyuanVideo 20 heads)."""
    return list(range(0, len(feature_blocks(model, family)), stride))


def token_grid(model: nn.Module, family: str, latent_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(T', h, w)`` token grid of a ``[B, C, T, H, W]`` latent for the model's patch size."""
    _, _, t, h, w = latent_shape
    if family == FAMILY_WAN:
        pt, ph, pw = model.config.patch_size
    else:
        ph = pw = model.config.patch_size
        pt = model.config.patch_size_t
    if t % pt or h % ph or w % pw:
        raise DCMConfigError(
            f"latent {tuple(latent_shape)} is not divisible by the patch size ({pt}, {ph}, {pw}); "
            f"use latent heights/widths that are multiples of the patch size."
        )
    return t // pt, h // ph, w // pw


def unpatchify(x: torch.Tensor, model: nn.Module, family: str, grid: tuple[int, int, int]) -> torch.Tensor:
    """Head output tokens ``[B, T'·h·w, p·p·C]`` → latent ``[B, C, T, H, W]`` (the diffusers layouts)."""
    b = x.shape[0]
    t, h, w = grid
    if family == FAMILY_WAN:
        pt, ph, pw = model.config.patch_size
        x = x.reshape(b, t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    else:
        p, pt = model.config.patch_size, model.config.patch_size_t
        x = x.reshape(b, t, h, w, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def decode_features(
    model: nn.Module, family: str, feature: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]
) -> torch.Tensor:
    """Decode one hidden-state map with the model's own output head at the captured ``temb``.

    Wan: ``shift, scale = (scale_shift_table + temb)``, ``norm_out(x)·(1+scale)+shift``, ``proj_out`` (per token when
    ``temb`` is [B, tokens, D], Wan2.2 TI2V's per-token timesteps, as the model's own head does);
    HunyuanVideo: ``norm_out(x, temb)``, ``proj_out``. Then unpatchify (dcm-method.md §6.2 step 6).
    """
    if family == FAMILY_WAN and temb.ndim == 3:
        # per-token timesteps (Wan2.2 TI2V, clean first frame): temb [B, tokens, D], one shift / scale per token
        sst = model.scale_shift_table.to(temb.device)  # [1, 2, D]
        shift, scale = (sst.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        h = (model.norm_out(feature.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(feature)
        h = model.proj_out(h)
    elif family == FAMILY_WAN:
        shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        h = (model.norm_out(feature.float()) * (1 + scale) + shift).type_as(feature)
        h = model.proj_out(h)
    else:
        h = model.norm_out(feature, temb)
        h = model.proj_out(h)
    return unpatchify(h, model, family, grid)


@dataclass
class TeacherOutput:
    """Velocity, raw per-layer hidden states (discriminator input) and head-decoded features (FM)."""

    velocity: torch.Tensor
    raw: list[torch.Tensor]
    decoded: list[torch.Tensor]
    grid: tuple[int, int, int]


class TeacherFeatures:
    """Feature extraction from a frozen teacher through forward hooks.

    Args:
        teacher: the frozen diffusers transformer (never modified).
        family: ``"wan"`` or ``"hunyuan_video"``.
        stride: a feature map after every ``stride``-th block (official 2).
    """

    def __init__(self, teacher: nn.Module, family: str, stride: int = 2) -> None:
        self.teacher = teacher
        self.family = family
        self.stride = stride
        self.layers = feature_layer_indices(teacher, family, stride)
        if not self.layers:
            raise DCMConfigError(f"the teacher has no {family} feature blocks for the discriminator.")
        self.embedder = teacher.condition_embedder if family == FAMILY_WAN else teacher.time_text_embed

    @property
    def num_features(self) -> int:
        return len(self.layers)

    @property
    def feature_dim(self) -> int:
        return int(self.teacher.config.num_attention_heads * self.teacher.config.attention_head_dim)

    @contextmanager
    def capture(self) -> Iterator[dict[str, Any]]:
        """Register the hooks for one forward; yields the dict they fill (``feats``, ``temb``)."""
        store: dict[str, Any] = {"feats": {}, "temb": None}
        blocks = feature_blocks(self.teacher, self.family)
        handles = []

        def block_hook(i: int):
            def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
                store["feats"][i] = out[0] if isinstance(out, tuple) else out

            return hook

        def emb_hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            store["temb"] = out[0] if isinstance(out, tuple) else out

        try:
            for i in self.layers:
                handles.append(blocks[i].register_forward_hook(block_hook(i)))
            handles.append(self.embedder.register_forward_hook(emb_hook))
            yield store
        finally:
            for h in handles:
                h.remove()

    def run(self, forward: Any, x: torch.Tensor) -> TeacherOutput:
        """Call ``forward(x) -> velocity`` (a teacher forward) and collect raw + decoded features."""
        grid = token_grid(self.teacher, self.family, x.shape)
        with self.capture() as store:
            v = forward(x)
        missing = [i for i in self.layers if i not in store["feats"]]
        if missing or store["temb"] is None:
            raise RuntimeError(f"teacher feature hooks did not fire for blocks {missing}; is the teacher a diffusers model?")
        raw = [store["feats"][i] for i in self.layers]
        n_tokens = grid[0] * grid[1] * grid[2]
        for r in raw:
            if r.shape[1] != n_tokens:
                raise DCMConfigError(
                    f"teacher block output has {r.shape[1]} tokens but the latent {tuple(x.shape)} gives a "
                    f"{grid[0]}×{grid[1]}×{grid[2]} = {n_tokens} token grid."
                )
        decoded = [decode_features(self.teacher, self.family, r, store["temb"], grid) for r in raw]
        return TeacherOutput(v, raw, decoded, grid)


class DiscriminatorHead(nn.Module):
    """``1×1 conv D→C, GN(32), LeakyReLU`` → residual ``1×1 conv C→C, GN(32), LeakyReLU`` → ``1×1 conv C→1``."""

    def __init__(self, in_channels: int, inner_channels: int = DEFAULT_INNER_CHANNELS) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, inner_channels, 1, 1, 0),
            nn.GroupNorm(32, inner_channels),
            nn.LeakyReLU(0.01),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(inner_channels, inner_channels, 1, 1, 0),
            nn.GroupNorm(32, inner_channels),
            nn.LeakyReLU(0.01),
        )
        self.conv_out = nn.Conv2d(inner_channels, 1, 1, 1, 0)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, T'·h·w, D]`` tokens → ``[B·T', 1, h, w]`` logits."""
        b, n, d = tokens.shape
        t, h, w = grid
        if n != t * h * w:
            raise DCMConfigError(f"discriminator head got {n} tokens for a {t}×{h}×{w} grid ({t * h * w} tokens).")
        # features of a bf16 teacher meet fp32 heads when no autocast is active
        x = tokens.reshape(b, t, h, w, d).permute(0, 1, 4, 2, 3).reshape(b * t, d, h, w)
        if x.dtype != self.conv_out.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.conv_out.weight.dtype)
        x = self.conv1(x)
        x = self.conv2(x) + x
        return self.conv_out(x)


class Discriminator(nn.Module):
    """One head per teacher feature map (``num_heads = ceil(num_blocks / stride)``)."""

    def __init__(self, num_heads: int, feature_dim: int, inner_channels: int = DEFAULT_INNER_CHANNELS) -> None:
        super().__init__()
        if inner_channels % 32:
            raise DCMConfigError(f"disc.inner_channels={inner_channels} must be a multiple of 32 (GroupNorm(32)).")
        self.heads = nn.ModuleList([DiscriminatorHead(feature_dim, inner_channels) for _ in range(num_heads)])

    def forward(self, features: Sequence[torch.Tensor], grid: tuple[int, int, int]) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise DCMConfigError(f"discriminator has {len(self.heads)} heads but got {len(features)} feature maps.")
        return [head(f, grid) for head, f in zip(self.heads, features)]
