"""Small and full-shape model builders (random weights) for tests, benchmarks and the toy world.

No weights can be downloaded in CI, so every model the tests and benchmarks use is built
here from a diffusers config. Shapes respect what ComfyUI's model detection needs
(``comfy/model_detection.py`` reads the architecture from weight shapes): Wan ``dim`` a multiple of 128 with
head_dim 128 and text_dim 4096; HunyuanVideo hidden a multiple of 128, head_dim 128,
2 refiner blocks, mlp_ratio 4.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import DCMConfigError
from .modeling import DETAIL_ADAPTER, EXPERT_MODULES, add_detail_expert, family_of_model
from .schedule import FAMILY_HUNYUAN, FAMILY_WAN


def wan_config(
    *,
    dim: int = 128,
    num_layers: int = 2,
    ffn_dim: int = 256,
    in_channels: int = 16,
    out_channels: int = 16,
    text_dim: int = 4096,
    image_dim: int | None = None,
) -> dict:
    """diffusers ``WanTransformer3DModel`` config with ComfyUI-compatible shapes (head_dim 128)."""
    if dim % 128:
        raise DCMConfigError(f"Wan dim={dim} must be a multiple of 128 (ComfyUI derives num_heads = dim // 128).")
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=dim // 128,
        attention_head_dim=128,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else dim,
        rope_max_seq_len=1024,
    )
    return cfg


#: Wan2.1-T2V-1.3B shape (dim 1536, 30 blocks, ffn 8960, 12 heads).
WAN_1_3B = dict(dim=1536, num_layers=30, ffn_dim=8960)
#: Wan2.1-T2V-14B shape (dim 5120, 40 blocks, ffn 13824, 40 heads).
WAN_14B = dict(dim=5120, num_layers=40, ffn_dim=13824)


def hunyuan_config(
    *,
    hidden: int = 128,
    num_layers: int = 1,
    num_single_layers: int = 1,
    text_embed_dim: int = 4096,
    in_channels: int = 16,
    out_channels: int = 16,
) -> dict:
    """diffusers ``HunyuanVideoTransformer3DModel`` config with ComfyUI-compatible shapes."""
    if hidden % 128:
        raise DCMConfigError(f"HunyuanVideo hidden={hidden} must be a multiple of 128 (head_dim 128).")
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        num_attention_heads=hidden // 128,
        attention_head_dim=128,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=2,
        mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=text_embed_dim,
        pooled_projection_dim=768,
        rope_theta=256.0,
        rope_axes_dim=(16, 56, 56),
    )


def build_transformer(family: str, config: dict | None = None, *, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """A diffusers transformer of ``family`` with deterministic random weights (see :func:`randomize_`)."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    if family == FAMILY_WAN:
        model = WanTransformer3DModel(**(config or wan_config()))
    elif family == FAMILY_HUNYUAN:
        model = HunyuanVideoTransformer3DModel(**(config or hunyuan_config()))
    else:
        raise DCMConfigError(f"unknown family {family!r}")
    randomize_(model, seed)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Deterministic init: weights N(0, std), biases N(0, std), norm scales 1 + N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        if "norm" in name and p.ndim == 1 and name.endswith("weight"):
            r = r + 1.0
        p.copy_(r.to(p.dtype))
    return module


@torch.no_grad()
def make_official_model(
    family: str,
    config: dict | None = None,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    perturb: float = 0.02,
) -> nn.Module:
    """A model in the official DCM combined layout with a *non-trivial* detail expert.

    LoRA A and B are random (B ≠ 0, so the detail expert differs from the semantic one)
    and every ``*_lora`` module is the base module plus N(0, perturb) noise.
    """
    model = build_transformer(family, config, seed=seed)
    add_detail_expert(model, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if f".lora_A.{DETAIL_ADAPTER}." in name or f".lora_B.{DETAIL_ADAPTER}." in name:
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5))
    for extra in EXPERT_MODULES[family_of_model(model)].values():
        for p in getattr(model, extra).parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb)
    return model.eval()


def save_official_checkpoint(model: nn.Module, path: str | Path, *, dtype=torch.float32, metadata=None) -> Path:
    """Write ``model.state_dict()`` (official combined layout) as one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata=metadata or {"format": "pt"})
    return path
