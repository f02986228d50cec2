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


# ---------------------------------------------------------------------------- tiny model folders (tests, dry runs)

#: Words of the tiny word-level tokenizer of :func:`save_tiny_text_parts`.
TINY_WORDS = "a cat dog runs jumps on the red blue grass in slow motion video of".split()
#: CLIP feature width of the tiny image encoder: ComfyUI's Wan image embedder takes 1280 (ViT-H) features.
TINY_CLIP_DIM = 1280
#: The model layouts :func:`save_tiny_model_folder` writes (the BASES of dcm_core.families, tiny).
TINY_FOLDER_KINDS = ("t2v", "i2v", "ti2v", "a14b-t2v", "a14b-i2v")


def save_tiny_text_parts(root: Path) -> None:
    """``tokenizer/`` (word level, ``</s>`` appended) + ``text_encoder/`` (UMT5, d_model 4096) of a tiny Wan folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        root / "tokenizer"
    )
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1)
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")


def save_tiny_wan_vae(path: Path, *, channels: int = 16) -> None:
    """A tiny ``AutoencoderKLWan``: 16 channels, 4×/8× (Wan2.1 layout, the published statistics), or 48 channels,
    4×/16× with the 2×2 pixel patchify and residual blocks (Wan2.2 TI2V-5B layout, its own statistics)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if channels == 16:
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    else:
        g = torch.Generator().manual_seed(1)
        mean = (torch.randn(channels, generator=g) * 0.3).tolist()
        std = (1.0 + torch.rand(channels, generator=g)).tolist()
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True, patch_size=2,
            in_channels=12, out_channels=12, scale_factor_spatial=16, latents_mean=mean, latents_std=std,
        )  # fmt: skip
    vae.save_pretrained(path)


def save_tiny_clip_vision(root: Path) -> None:
    """``image_encoder/`` (CLIPVisionModel, 1280-wide, 1 layer, 28 px → 5 tokens) + ``image_processor/``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=TINY_CLIP_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=32)  # fmt: skip
    CLIPVisionModel(cfg).save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(root / "image_processor")


def save_tiny_model_folder(root: str | Path, kind: str, *, seed: int = 0, **dims) -> Path:
    """A complete tiny diffusers Wan folder of one layout (``kind`` in :data:`TINY_FOLDER_KINDS`):

    * ``t2v`` — 16 → 16 channels (Wan2.1 T2V);
    * ``i2v`` — 36 → 16 channels + a CLIP image embedder, ``image_encoder/`` + ``image_processor/`` (Wan2.1 I2V);
    * ``ti2v`` — 48 → 48 channels, the 48-channel 16× VAE (Wan2.2 TI2V-5B);
    * ``a14b-t2v`` / ``a14b-i2v`` — ``transformer/`` (high noise) + ``transformer_2/`` (low noise, other weights),
      ``boundary_ratio`` 0.875 / 0.9 in ``model_index.json``; the I2V pair takes 36 channels, no image embedder.

    ``dims``: :func:`wan_config` sizes (default dim 128, 2 layers, ffn 256).
    """
    import json

    if kind not in TINY_FOLDER_KINDS:
        raise DCMConfigError(f"unknown tiny folder kind {kind!r}; one of {', '.join(TINY_FOLDER_KINDS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    size = {"dim": 128, "num_layers": 2, "ffn_dim": 256, **dims}
    index: dict = {"_class_name": "WanPipeline", "_diffusers_version": "0.35.0"}
    vae_ch = 48 if kind == "ti2v" else 16
    if kind == "i2v":
        cfg = wan_config(in_channels=36, out_channels=16, image_dim=TINY_CLIP_DIM, **size)
        index["_class_name"] = "WanImageToVideoPipeline"
        save_tiny_clip_vision(root)
    elif kind == "ti2v":
        cfg = wan_config(in_channels=48, out_channels=48, **size)
        index["expand_timesteps"] = True
        index["transformer_2"] = [None, None]
        index["boundary_ratio"] = None
    elif kind == "a14b-i2v":
        cfg = wan_config(in_channels=36, out_channels=16, **size)
        index["_class_name"] = "WanImageToVideoPipeline"
    else:
        cfg = wan_config(**size)
    build_transformer(FAMILY_WAN, cfg, seed=seed).save_pretrained(root / "transformer")
    if kind.startswith("a14b"):
        build_transformer(FAMILY_WAN, cfg, seed=seed + 100).save_pretrained(root / "transformer_2")
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
        index["boundary_ratio"] = 0.9 if kind == "a14b-i2v" else 0.875
    save_tiny_wan_vae(root / "vae", channels=vae_ch)
    save_tiny_text_parts(root)
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root
