"""Loading the teacher / student transformers and calling them (diffusers + peft, no ComfyUI).

* :func:`load_transformer` reads a diffusers model folder, a single diffusers-keyed safetensors
  file (with a config.json), an official DCM combined checkpoint (its semantic expert is
  extracted) or builds a ``tiny:<family>`` random model.
* :func:`build_models` builds the student / teacher pair of a stage:

  - semantic, full fine-tune (official): student = the pretrained model (all parameters
    trainable), teacher = a frozen copy;
  - semantic, ``model.semantic_lora``: student = pretrained + a LoRA adapter ``semantic``;
    the teacher is the same module with the adapter switched off (no second copy);
  - detail: student = semantic expert + :func:`dcm_core.modeling.add_detail_expert`
    (LoRA ``lora1`` r128/α256 + ``*_lora`` embedder/head copies; everything else frozen);
    teacher = the original pretrained model, frozen.
* :class:`Conditioning` turns dataset text tensors into the keyword arguments of the family's
  forward (HunyuanVideo: CLIP pooled vector in token 0, attention mask, embedded guidance) and carries the image
  conditioning of image-to-video bases (Wan I2V: mask + image latent on the channel axis, CLIP features; Wan2.2
  TI2V: a clean first latent frame with per-token timesteps), which :func:`call_velocity` adds to every forward.
* :func:`load_pretrained` reads a Wan2.2 A14B folder's two transformers (``transformer/`` high noise,
  ``transformer_2/`` low noise) and ``boundary_ratio``; :class:`StageModels` routes the teacher per call
  (semantic stage: student = the high-noise transformer; detail stage: the detail expert on the low-noise one).
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import DCMCheckpointError, DCMConfigError, DCMFileNotFoundError
from ..formats.safetensors_io import DTYPE_NAMES
from ..modeling import (
    DETAIL_ADAPTER,
    EXPERT_MODULES,
    add_detail_expert,
    expert_mode,
    family_of_model,
    model_timesteps,
    tuner_layers,
)
from ..schedule import FAMILIES, FAMILY_HUNYUAN, FAMILY_WAN
from .config import STAGE_DETAIL, STAGE_SEMANTIC, TrainConfig

log = logging.getLogger("DCM.train")

#: PEFT adapter name of the optional semantic-stage LoRA (distinct from the detail expert's 'lora1').
SEMANTIC_ADAPTER = "semantic"
TINY_PREFIX = "tiny:"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"

#: Weight / storage dtypes the trainer, its export and preprocess accept (a subset of the formats' names).
DTYPES = {k: DTYPE_NAMES[k] for k in ("fp32", "bf16", "fp16")}


# ---------------------------------------------------------------------------- loading


def _class_for_config(config: dict) -> type:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    name = config.get("_class_name", "")
    if name.startswith("WanTransformer3D"):
        return WanTransformer3DModel
    if name.startswith("HunyuanVideoTransformer3D"):
        return HunyuanVideoTransformer3DModel
    raise DCMConfigError(
        f"transformer config has _class_name={name!r}; the DCM trainer supports WanTransformer3DModel and "
        f"HunyuanVideoTransformer3DModel."
    )


def resolve_transformer_dir(path: Path) -> Path | None:
    """The folder holding ``config.json`` of a transformer: ``path``, ``path/transformer``, a run's export."""
    for cand in (path, path / "transformer", path / "export" / "transformer"):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                name = str(json.loads(cfg.read_text()).get("_class_name", ""))
            except (json.JSONDecodeError, AttributeError):
                continue
            if "Transformer3D" in name:  # a run folder's own config.json is the training config: skip it
                return cand
    return None


SUPPORTED_MODELS = (
    "Wan2.1 T2V (1.3B / 14B), Wan2.1 I2V 14B, Wan2.2 TI2V 5B, Wan2.2 T2V / I2V A14B (transformer/ + transformer_2/) and "
    "HunyuanVideo T2V diffusers folders"
)
TRANSFORMER_2 = "transformer_2"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DCMConfigError(f"{path}: cannot read this JSON file ({e}).") from e
    if not isinstance(data, dict):
        raise DCMConfigError(f"{path}: expected a JSON object.")
    return data


def _declared(value: Any) -> bool:
    """A ``model_index.json`` component entry that names a class (``[null, null]`` means absent, e.g. TI2V-5B)."""
    if isinstance(value, (list, tuple)):
        return any(v is not None for v in value)
    return value is not None


def two_transformer_boundary(root: Path) -> float | None:
    """``boundary_ratio`` of a two-transformer folder (Wan2.2 A14B: ``transformer/`` high noise, ``transformer_2/`` low
    noise), ``None`` for a one-transformer folder; an inconsistent folder is refused naming the file."""
    index = root / "model_index.json"
    info = _read_json(index) if index.is_file() else {}
    has_dir = (root / TRANSFORMER_2 / "config.json").is_file()
    declared = _declared(info.get(TRANSFORMER_2))
    ratio = info.get("boundary_ratio")
    if not (has_dir or declared or ratio is not None):
        return None
    if not has_dir:
        raise DCMConfigError(
            f"{index}: declares a second transformer (transformer_2 / boundary_ratio={ratio}) but {root / TRANSFORMER_2} "
            f"holds no config.json. Download the complete model folder."
        )
    if ratio is None or not 0.0 < float(ratio) < 1.0:
        where = index if index.is_file() else root / TRANSFORMER_2
        raise DCMConfigError(
            f"{where}: a two-transformer folder (transformer/ for high noise, transformer_2/ for low noise) needs "
            f"boundary_ratio in (0, 1) in model_index.json (Wan2.2 T2V A14B 0.875, I2V A14B 0.9); found {ratio!r}."
        )
    return float(ratio)


def check_model_folder(root: Path) -> None:
    """Refuse a folder the trainer would otherwise get silently wrong, naming the file: an inconsistent
    two-transformer folder, or a VAE config whose latent statistics do not fit its channel count."""
    two_transformer_boundary(root)
    vae_cfg = root / "vae" / "config.json"
    if vae_cfg.is_file():
        check_vae_config(vae_cfg)


def check_vae_config(path: Path) -> None:
    """A VAE config.json must describe its latents completely (Wan: one mean / std per ``z_dim`` channel)."""
    from ..latents import LatentFormat

    cfg = _read_json(path)
    name = str(cfg.get("_class_name", ""))
    fam = FAMILY_HUNYUAN if "HunyuanVideo" in name else FAMILY_WAN
    LatentFormat.from_vae_config(cfg, fam, str(path))


def check_transformer_config(config: dict, where: Path) -> None:
    """``in_channels`` must be ``out_channels`` (text-to-video, TI2V) or ``2·out_channels + 4`` (image-to-video: noisy
    latent + 4 mask channels + image latent, Wan I2V); anything else needs conditioning the trainer does not provide."""
    cin, cout = config.get("in_channels"), config.get("out_channels")
    if cin is None or cout is None:
        return
    cin, cout = int(cin), int(cout)
    if cin != cout and cin != 2 * cout + 4:
        raise DCMConfigError(
            f"{where}: in_channels = {cin} but out_channels = {cout}: neither text-to-video (in = out) nor Wan "
            f"image-to-video (in = 2·out + 4: mask and image latent concatenated). The DCM trainer supports "
            f"{SUPPORTED_MODELS}."
        )


def base_for(
    family: str,
    in_channels: int,
    out_channels: int,
    *,
    image_embedder: bool = False,
    two_transformers: bool = False,
    dim: int | None = None,
):
    """The :class:`dcm_core.families.Base` whose transformer layout matches (channels, image embedder, one or two
    transformers), or ``None``. Several bases share a layout (Wan2.1 T2V 1.3B / 14B): the one whose ``dim`` equals
    ``dim`` is taken, else the first listed (a tiny test model of that layout is labelled with it)."""
    from ..families import BASES

    cands = [
        b
        for b in BASES.values()
        if b.family == family
        and b.in_channels == int(in_channels)
        and b.latent_channels == int(out_channels)
        and b.image_embedder == bool(image_embedder)
        and b.two_transformers == bool(two_transformers)
    ]
    if not cands:
        return None
    return next((b for b in cands if dim is not None and b.dim == int(dim)), cands[0])


def base_of(model: nn.Module, *, two_transformers: bool = False):
    """The :class:`dcm_core.families.Base` whose layout the transformer has (``None`` if no base matches)."""
    c = model.config
    dim = int(getattr(c, "num_attention_heads", 0) * getattr(c, "attention_head_dim", 0)) or None
    fam = family_of_model(model)
    image = getattr(c, "image_dim", None) is not None if fam == FAMILY_WAN else False
    return base_for(fam, c.in_channels, c.out_channels or c.in_channels, image_embedder=image,
                    two_transformers=two_transformers, dim=dim)  # fmt: skip


def _is_combined_official(keys: Any) -> bool:
    return any(".base_layer." in k for k in keys)


def semantic_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The semantic expert of a combined (official layout) state dict: base weights, plain key names.

    ``x.to_q.base_layer.weight`` → ``x.to_q.weight``; LoRA ``lora_A/lora_B`` and ``*_lora`` modules
    are dropped (dcm-method.md §4.3: the base weights ARE the semantic expert).
    """
    extras = {m for fam in EXPERT_MODULES.values() for m in fam.values()}
    out = {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k or k.split(".", 1)[0] in extras:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise DCMConfigError(
            f"{path}: only .safetensors weights are read (pickled .pt/.bin/.ckpt files can run code when loaded)."
        )
    return load_file(str(path))


def load_transformer(
    source: str,
    *,
    family: str | None = None,
    config_path: str = "",
    tiny_config: dict | None = None,
    tiny_seed: int = 0,
    subfolder: str | None = None,
) -> nn.Module:
    """Load a fp32 diffusers transformer from ``source`` (see the module docstring).

    A two-transformer folder (Wan2.2 A14B) needs ``subfolder`` = ``'transformer'`` (high noise) or
    ``'transformer_2'`` (low noise); :func:`load_pretrained` reads both.
    """
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: F401

    if not source:
        raise DCMConfigError("model.pretrained is empty. Point it at a diffusers model folder or use 'tiny:wan'.")
    if source.startswith(TINY_PREFIX):
        from ..tiny import build_transformer, hunyuan_config, wan_config

        fam = source[len(TINY_PREFIX) :]
        if fam not in FAMILIES:
            raise DCMConfigError(f"{source!r}: unknown tiny family; use 'tiny:wan' or 'tiny:hunyuan_video'.")
        cfg = (wan_config if fam == FAMILY_WAN else hunyuan_config)(**(tiny_config or {}))
        return build_transformer(fam, cfg, seed=tiny_seed).train()
    p = Path(source).expanduser()
    if p.is_dir():
        d = resolve_transformer_dir(p)
        if d is None:
            raise DCMFileNotFoundError(
                f"{p} holds no transformer config.json (looked in ., transformer/, export/transformer/). Give a diffusers "
                f"model folder, its transformer/ folder or a finished run folder."
            )
        for root in sorted({p, d.parent}):  # the model folder, also when its transformer/ was given
            check_model_folder(root)
        if d != p and two_transformer_boundary(p) is not None:
            if subfolder not in ("transformer", TRANSFORMER_2):
                raise DCMConfigError(
                    f"{p} is a two-transformer model (transformer/ high noise, transformer_2/ low noise); say which one "
                    f"to load (subfolder='transformer' or 'transformer_2'), or use load_pretrained for both."
                )
            d = p / subfolder
        elif d == p and two_transformer_boundary(p.parent) is not None:
            raise DCMConfigError(
                f"{p} is one half of the two-transformer model {p.parent}; give the model folder {p.parent} itself (the "
                f"teacher needs both transformer/ and transformer_2/)."
            )
        config = json.loads((d / "config.json").read_text())
        check_transformer_config(config, d / "config.json")
        cls = _class_for_config(config)
        weights = d / TRANSFORMER_WEIGHTS
        if weights.is_file():
            keys = _safetensors_keys(weights)
            if _is_combined_official(keys):
                return _from_state_dict(cls, config, semantic_state_dict(_read_safetensors(weights)), weights)
        if not (weights.is_file() or (d / f"{TRANSFORMER_WEIGHTS}.index.json").is_file()):
            raise DCMFileNotFoundError(
                f"{d} has no {TRANSFORMER_WEIGHTS} (or its .index.json for sharded weights); only safetensors weights "
                f"are read. Download the complete model folder."
            )
        model = cls.from_pretrained(str(d), torch_dtype=torch.float32, use_safetensors=True)
        return model.float().train()
    if p.is_file():
        cfg_file = Path(config_path) if config_path else p.with_name("config.json")
        if not cfg_file.is_file():
            raise DCMConfigError(
                f"{p} is a single weights file but no config.json was found beside it; set model.transformer_config "
                f"to the transformer's config.json."
            )
        config = json.loads(cfg_file.read_text())
        check_transformer_config(config, cfg_file)
        sd = _read_safetensors(p)
        if _is_combined_official(sd.keys()):
            sd = semantic_state_dict(sd)
        return _from_state_dict(_class_for_config(config), config, sd, p)
    raise DCMFileNotFoundError(f"model source {source!r} does not exist.")


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _from_state_dict(cls: type, config: dict, sd: dict[str, torch.Tensor], where: Path) -> nn.Module:
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    sd = {k: v.float() for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DCMCheckpointError(
            f"{where} does not fit the {cls.__name__} config: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})."
        )
    return model.float().train()


@dataclass
class Pretrained:
    """The base model a run distils: one transformer, or the Wan2.2 A14B pair with its boundary."""

    high: nn.Module | None  # transformer/ (the only transformer of a one-transformer base)
    low: nn.Module | None = None  # transformer_2/ (two-transformer bases)
    boundary_timestep: float | None = None  # 1000 · boundary_ratio (two-transformer bases)
    base: Any = None  # dcm_core.families.Base (None: a layout outside the table)
    latent_format: Any = None  # dcm_core.latents.LatentFormat of the folder's vae/config.json, when it has one

    @property
    def two_transformers(self) -> bool:
        return self.boundary_timestep is not None

    @property
    def any(self) -> nn.Module:
        return self.high if self.high is not None else self.low


def model_root(source: str) -> Path | None:
    """The diffusers model folder of ``model.pretrained`` (``None`` for ``tiny:`` models and single files)."""
    if not source or source.startswith(TINY_PREFIX):
        return None
    p = Path(source).expanduser()
    if not p.is_dir():
        return None
    d = resolve_transformer_dir(p)
    return d.parent if d is not None and d != p and d.parent == p else p


def pretrained_latent_format(m: Any) -> Any:
    """The latent format of ``model.pretrained``'s ``vae/config.json`` (``None`` without one); reads no weight."""
    from ..latents import LatentFormat

    root = model_root(m.pretrained)
    if root is None or not (root / "vae" / "config.json").is_file():
        return None
    vcfg = _read_json(root / "vae" / "config.json")
    fam = FAMILY_HUNYUAN if "HunyuanVideo" in str(vcfg.get("_class_name", "")) else FAMILY_WAN
    return LatentFormat.from_vae_config(vcfg, fam, str(root / "vae" / "config.json"))


def load_pretrained(m: Any, sides: tuple[str, ...] = ("high", "low")) -> Pretrained:
    """Load ``model.pretrained``: one transformer, or the two of a Wan2.2 A14B folder (only the ``sides`` asked for,
    ``high`` = ``transformer/``, ``low`` = ``transformer_2/``), its ``boundary_ratio`` and the VAE's latent format."""
    kw = dict(config_path=m.transformer_config, tiny_config=m.tiny_config, tiny_seed=m.tiny_seed)
    root = model_root(m.pretrained)
    ratio = two_transformer_boundary(root) if root is not None else None
    fmt = pretrained_latent_format(m)
    if ratio is None:
        model = load_transformer(m.pretrained, **kw)
        return Pretrained(model, None, None, base_of(model), fmt)
    high = load_transformer(str(root), subfolder="transformer", **kw) if "high" in sides else None
    low = load_transformer(str(root), subfolder=TRANSFORMER_2, **kw) if "low" in sides else None
    one = high if high is not None else low
    arch = lambda mod: {k: v for k, v in dict(mod.config).items() if not k.startswith("_")}  # noqa: E731
    if high is not None and low is not None and arch(high) != arch(low):
        raise DCMConfigError(f"{root}: transformer/ and transformer_2/ have different configs; they must be one architecture.")
    return Pretrained(high, low, 1000.0 * ratio, base_of(one, two_transformers=True), fmt)


def merged_semantic_state_dict(model: nn.Module, *, in_place: bool = False) -> dict[str, torch.Tensor]:
    """Plain diffusers state dict of a semantic student; a ``semantic`` LoRA is merged into the base — of a copy of
    the model, or with ``in_place`` of the model itself (a student rebuilt only to be exported: no second copy)."""
    m = model
    if getattr(model, "peft_config", None) and SEMANTIC_ADAPTER in model.peft_config:
        m = model if in_place else copy.deepcopy(model)
        for layer in tuner_layers(m):
            layer.merge(adapter_names=[SEMANTIC_ADAPTER])
    return {k: v.detach() for k, v in semantic_state_dict(m.state_dict()).items()}


# ---------------------------------------------------------------------------- adapters


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every PEFT adapter off (the semantic-LoRA student becomes the teacher) and back.

    ``requires_grad`` flags are preserved: peft's ``enable_adapters`` would otherwise flip them.
    """
    layers = tuner_layers(model)
    flags = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    states = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, was_disabled in zip(layers, states):
            layer.enable_adapters(not was_disabled)
        for p, rg in flags.items():
            p.requires_grad_(rg)


# ---------------------------------------------------------------------------- conditioning


#: How an image conditions the transformer: not at all, Wan I2V's channel concatenation (4 mask channels + the
#: image latent), or Wan2.2 TI2V's clean first latent frame with per-token timesteps (diffusers ``expand_timesteps``).
IMAGE_NONE, IMAGE_CONCAT, IMAGE_FIRST_FRAME = "none", "concat", "first_frame"
#: Text length a Wan model with an image embedder needs (diffusers splits its context at ``len − 512``).
WAN_I2V_TEXT_TOKENS = 512


@dataclass
class Conditioning:
    """Text (and image) conditioning in the form the family's forward wants.

    Wan: ``encoder_hidden_states`` [B, L, 4096] (the mask is not used by the Wan transformer,
    as in the official code). HunyuanVideo: the dataset stores ``[B, 1 + L, 4096]`` with the
    CLIP pooled vector zero-padded in token 0 (FastVideo ``hunyuan_hf`` layout), split here into
    ``pooled_projections`` [B, 768] and ``encoder_hidden_states`` [B, L, 4096] + mask [B, L];
    ``guidance`` is the embedded guidance value (official 6016).

    Image conditioning (Wan, exactly as diffusers' ``WanImageToVideoPipeline`` feeds the base model):

    * ``image`` [B, 4 + C, T, H, W] (I2V, ``in_channels = 2C + 4``): the mask (1 on the first latent frame) and the
      normalised image latent, concatenated after the noisy latent on the channel axis in every forward;
    * ``image_embeds`` [B, N, D]: CLIP image features for a model with an image embedder (Wan2.1 I2V); the text is
      then zero-padded to 512 tokens (:meth:`padded_text`);
    * ``first_frame`` [B, C, 1, H, W] (TI2V): the clean normalised first latent frame. It replaces frame 0 of the
      input, whose tokens get timestep 0; the velocity returned there is 0, so every flow step keeps it clean.

    Text dropout / the CFG unconditional replace the text only; the image parts are kept.
    """

    family: str
    context: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None
    guidance: float = 6016.0
    image: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    first_frame: torch.Tensor | None = None

    @classmethod
    def from_batch(
        cls, family: str, embeds: torch.Tensor, masks: torch.Tensor, *, guidance: float, pooled_dim: int = 768
    ) -> "Conditioning":
        if family == FAMILY_WAN:
            return cls(family, embeds, masks)
        if embeds.shape[1] != masks.shape[1] + 1:
            raise DCMConfigError(
                f"HunyuanVideo prompt embeddings must be [1 + L, 4096] with the CLIP pooled vector in token 0 and a "
                f"mask of length L (FastVideo hunyuan_hf layout); got embeddings {tuple(embeds.shape[1:])} and mask "
                f"length {masks.shape[1]}. Re-run preprocess with the HunyuanVideo model."
            )
        return cls(family, embeds[:, 1:], masks, embeds[:, 0, :pooled_dim], guidance)

    def with_image(self, mode: str, image_latent: torch.Tensor | None, image_embeds: torch.Tensor | None) -> "Conditioning":
        """Add the image parts (``image_latent``: the normalised conditioning latent, [B, C, T or 1, H, W])."""
        import dataclasses

        if mode == IMAGE_NONE:
            return self
        if image_embeds is not None:
            self = self.padded_text(WAN_I2V_TEXT_TOKENS)
        if mode == IMAGE_CONCAT:
            b, _, t, h, w = image_latent.shape
            mask = torch.zeros(b, 4, t, h, w, device=image_latent.device, dtype=image_latent.dtype)
            mask[:, :, 0] = 1.0  # the first pixel frame (4 sub-frames of latent frame 0) is given
            return dataclasses.replace(self, image=torch.cat([mask, image_latent], dim=1), image_embeds=image_embeds)
        if mode == IMAGE_FIRST_FRAME:
            return dataclasses.replace(self, first_frame=image_latent[:, :, :1], image_embeds=image_embeds)
        raise DCMConfigError(f"internal: unknown image mode {mode!r}")

    def padded_text(self, length: int) -> "Conditioning":
        """The text zero-padded to ``length`` tokens (mask False there), as the Wan pipelines pad it.

        diffusers' Wan attention with an image embedder takes the image tokens to be everything before the LAST 512
        context tokens (``encoder_hidden_states.shape[1] - 512``, hard-coded for the umT5 length): the text must be
        exactly 512 tokens, as ``WanImageToVideoPipeline`` always gives it (zeros after the true length).
        """
        import dataclasses

        n = self.context.shape[1]
        if n == length:
            return self
        if n > length:
            raise DCMConfigError(
                f"the text embeddings have {n} tokens; a Wan model with an image embedder takes exactly {length} "
                f"(re-run preprocess with --max-text-tokens {length} or less)."
            )
        ctx = torch.zeros(self.context.shape[0], length, self.context.shape[2], dtype=self.context.dtype, device=self.context.device)
        ctx[:, :n] = self.context
        mask = torch.zeros(self.mask.shape[0], length, dtype=self.mask.dtype, device=self.mask.device)
        mask[:, : self.mask.shape[1]] = self.mask
        return dataclasses.replace(self, context=ctx, mask=mask)

    def select(self, idx: torch.Tensor) -> "Conditioning":
        """The conditioning of the samples ``idx`` (per-call teacher routing splits a batch)."""
        import dataclasses

        pick = lambda t: None if t is None else t[idx.to(t.device)]  # noqa: E731
        return dataclasses.replace(
            self, context=pick(self.context), mask=pick(self.mask), pooled=pick(self.pooled), image=pick(self.image),
            image_embeds=pick(self.image_embeds), first_frame=pick(self.first_frame),
        )  # fmt: skip

    def kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": self.context.to(dtype)}
        if self.image_embeds is not None:
            kw["encoder_hidden_states_image"] = self.image_embeds.to(dtype)
        if self.family == FAMILY_HUNYUAN:
            b = self.context.shape[0]
            kw["encoder_attention_mask"] = self.mask
            kw["pooled_projections"] = self.pooled.to(dtype)
            kw["guidance"] = torch.full((b,), float(self.guidance), device=self.context.device, dtype=torch.float32)
        return kw


def clean_first_frame(x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """``x`` with latent frame 0 replaced by the clean first frame (TI2V image conditioning; unchanged otherwise)."""
    if cond.first_frame is None:
        return x
    return torch.cat([cond.first_frame.to(x.dtype), x[:, :, 1:]], dim=2)


def noisy_frames(x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The part of a latent the losses compare: all frames, or frames 1… when frame 0 is the clean image (TI2V)."""
    return x if cond.first_frame is None else x[:, :, 1:]


def token_timesteps(model: nn.Module, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-token timesteps [B, T'·h·w] with 0 on the first latent frame's tokens (diffusers ``expand_timesteps``)."""
    pt, ph, pw = model.config.patch_size
    _, _, nt, nh, nw = x.shape
    keep = torch.ones(nt // pt, nh // ph, nw // pw, device=t.device, dtype=t.dtype)
    keep[0] = 0.0  # Wan patches time by 1: token frame 0 is latent frame 0
    return t[:, None] * keep.flatten()[None, :]


def param_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype of a transformer: its output projection's (norms / time embedders may stay fp32)."""
    proj = getattr(model, "proj_out", None)
    weight = getattr(proj, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def call_velocity(
    call: nn.Module,
    model: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Conditioning,
    expert: str = STAGE_SEMANTIC,
) -> torch.Tensor:
    """One forward at per-sample noise levels ``sigma`` [B] (``t = 1000·σ``), returning v in fp32.

    ``call`` is what is invoked (the DDP wrapper of the student, or the plain module), ``model``
    the unwrapped module on which :func:`dcm_core.modeling.expert_mode` selects the expert.
    ``x`` is the noisy latent only; the image conditioning of ``cond`` is added here, the same way for every
    student, teacher, target and feature forward (see :class:`Conditioning`).
    """
    dtype = param_dtype(model)
    t = model_timesteps(sigma, x.shape[0], x.device)
    h = x
    if cond.first_frame is not None:
        h = clean_first_frame(x, cond)
        t = token_timesteps(model, t, x)
    if cond.image is not None:
        h = torch.cat([h, cond.image.to(h.dtype)], dim=1)
    with expert_mode(model, expert):
        out = call(hidden_states=h.to(dtype), timestep=t, return_dict=False, **cond.kwargs(dtype))[0]
    out = out.float()
    if cond.first_frame is not None:
        out = torch.cat([torch.zeros_like(out[:, :, :1]), out[:, :, 1:]], dim=2)
    return out


# ---------------------------------------------------------------------------- stage models


@dataclass
class StageModels:
    """The modules of one stage. ``teacher`` is None in semantic-LoRA mode (adapters off = teacher).

    Two-transformer bases (Wan2.2 A14B): ``teacher`` is the base transformer of the stage's own side (semantic: the
    high-noise ``transformer/``, detail: the low-noise ``transformer_2/``), ``teacher_other`` the other one (loaded
    only when the stage's grid calls cross ``boundary_timestep``); :meth:`teacher_for` routes per call.
    """

    family: str
    student: nn.Module
    teacher: nn.Module | None
    student_expert: str
    base: Any = None
    image_mode: str = IMAGE_NONE
    image_embedder: bool = False
    latent_format: Any = None
    boundary_timestep: float | None = None
    side: str = "high"  # the stage's side of a two-transformer base
    teacher_other: nn.Module | None = None

    def side_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per sample: True where the high-noise transformer answers (``1000·σ > boundary``; at or below it the
        low-noise one, ComfyUI's convention; diffusers switches at ``t ≥ boundary``, which no grid point hits)."""
        return sigma.float().reshape(-1) * 1000.0 > float(self.boundary_timestep)

    def teacher_for(self, high: bool) -> nn.Module | None:
        """The teacher of one side (``None``: the semantic-LoRA student with its adapter off)."""
        if (high and self.side == "high") or (not high and self.side == "low"):
            return self.teacher
        if self.teacher_other is None:
            raise DCMConfigError(
                f"internal: a {'high' if high else 'low'}-noise teacher call in a stage that did not load that transformer"
            )
        return self.teacher_other

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        """Per-block gradient checkpointing of the student AND the frozen teacher (diffusers' own switch).

        The detail stage's G step runs the teacher WITH gradient on the fake sample (the gradient flows
        through the frozen teacher into ŷ): unless checkpointed, every teacher block keeps all its
        activations for the backward (the official code checkpoints the teacher too, review C1). The
        discriminator's forward hooks on the teacher blocks and embedder still fire (a checkpointed block is
        called through its ``__call__``); they are removed before the backward recomputes the blocks.
        Forwards under ``no_grad`` (CFG, targets, the real sample) are not affected.
        """
        self.student.enable_gradient_checkpointing()
        for t in (self.teacher, self.teacher_other):
            if t is not None:
                t.enable_gradient_checkpointing()


def _dtype_of(name: str, mixed_precision: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    return DTYPES[name]


def _storage_dtype(model: nn.Module, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """``dtype`` for a floating tensor, except in diffusers' ``_keep_in_fp32_modules`` (norms, time embedder)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return dtype if t.is_floating_point() and not (keep & set(name.split("."))) else t.dtype


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a frozen model's floating tensors to ``dtype``, keeping diffusers' ``_keep_in_fp32_modules`` in fp32."""
    if dtype == torch.float32:
        return model
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t.data = t.data.to(_storage_dtype(model, name, t, dtype))
    return model


def frozen_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of ``model`` stored in ``dtype`` (``_keep_in_fp32_modules`` stay fp32), made WITHOUT a full
    fp32 copy first: every parameter / buffer is cast on its own and handed to ``copy.deepcopy`` through its memo
    (the public deepcopy protocol). Equal, tensor for tensor, to ``cast_frozen(freeze(copy.deepcopy(model)), dtype)``;
    peak memory = the model + the copy in ``dtype``."""
    memo: dict[int, Any] = {}
    for name, p in model.named_parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(_storage_dtype(model, name, p, dtype), copy=True), requires_grad=False)
    for name, b in model.named_buffers():
        memo[id(b)] = b.detach().to(_storage_dtype(model, name, b, dtype), copy=True)
    return freeze(copy.deepcopy(model, memo))


def cast_frozen_params(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the FROZEN parameters of a partly trainable model (the detail student's base) to ``dtype``, one tensor
    at a time (``_keep_in_fp32_modules`` stay fp32); trainable parameters and buffers are untouched."""
    if dtype == torch.float32:
        return model
    for name, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(_storage_dtype(model, name, p, dtype))
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def meta_transformer(cfg: TrainConfig) -> nn.Module:
    """``model.pretrained``'s architecture on PyTorch's ``meta`` device: no storage, no weight read (the processes
    of a sharded run other than process 0 build their models so; process 0 loads the weights and broadcasts them,
    :mod:`.parallel`)."""
    from .plan import _meta_model, transformer_config

    family, config = transformer_config(cfg)
    return _meta_model(family, config, torch.float32).train()


def _pair_side(cfg: TrainConfig) -> str:
    """Which transformer of a two-transformer base a stage trains: semantic ← high noise, detail ← low noise."""
    return "high" if cfg.stage == STAGE_SEMANTIC else "low"


def build_student(
    cfg: TrainConfig, *, pretrained: nn.Module | Pretrained | None = None, on_meta: bool = False
) -> nn.Module:
    """The stage's student (trainable parameters marked) — also used by export to rebuild it. ``on_meta``: built
    from ``pretrained``'s (meta) architecture, nothing read (the semantic expert has the same architecture).

    Two-transformer base (Wan2.2 A14B): the semantic student is the high-noise ``transformer/``, the detail student
    the stock low-noise ``transformer_2/`` + the detail expert (``model.semantic_expert`` does not apply).
    """
    m = cfg.model
    if pretrained is None:
        root = model_root(m.pretrained)
        if root is not None and two_transformer_boundary(root) is not None:
            pretrained = load_pretrained(m, sides=(_pair_side(cfg),))
    if isinstance(pretrained, Pretrained):
        if pretrained.two_transformers:
            if cfg.stage == STAGE_DETAIL and m.semantic_expert:
                raise DCMConfigError(
                    f"model.semantic_expert={m.semantic_expert!r}: with a two-transformer base ({m.pretrained}) the detail "
                    f"expert is trained on the stock low-noise transformer_2/, not on the semantic result; leave "
                    f"model.semantic_expert empty."
                )
            if cfg.stage == STAGE_DETAIL:
                student = copy.deepcopy(pretrained.low)  # the frozen low-noise teacher keeps the original
                student.requires_grad_(False)
                add_detail_expert(student, rank=m.lora_rank, alpha=m.lora_alpha)
                return student.train()
            pretrained = pretrained.high
        else:
            pretrained = pretrained.high
    if cfg.stage == STAGE_SEMANTIC:
        student = pretrained if pretrained is not None else load_transformer(
            m.pretrained, config_path=m.transformer_config, tiny_config=m.tiny_config, tiny_seed=m.tiny_seed
        )
        if m.semantic_lora:
            from ..modeling import lora_config

            student.add_adapter(lora_config(m.semantic_lora_rank, m.semantic_lora_alpha), adapter_name=SEMANTIC_ADAPTER)
        else:
            student.requires_grad_(True)
        return student.train()
    # detail stage
    if on_meta:
        student = copy.deepcopy(pretrained)  # (meta tensors: no storage)
    elif m.semantic_expert:
        student = load_transformer(
            m.semantic_expert, config_path=m.transformer_config, tiny_config=m.tiny_config, tiny_seed=m.tiny_seed
        )
    else:
        log.warning(
            "model.semantic_expert is empty: the detail expert is trained on top of the pretrained weights, not on a "
            "stage-1 semantic expert. Set model.semantic_expert to the semantic run for the real recipe."
        )
        student = copy.deepcopy(pretrained) if pretrained is not None else load_transformer(
            m.pretrained, config_path=m.transformer_config, tiny_config=m.tiny_config, tiny_seed=m.tiny_seed
        )
    student.requires_grad_(False)
    add_detail_expert(student, rank=m.lora_rank, alpha=m.lora_alpha)
    return student.train()


def image_mode_of(model: nn.Module, base: Any) -> tuple[str, bool]:
    """``(image mode, has an image embedder)`` of a transformer (see :class:`Conditioning`)."""
    from ..families import TASK_I2V, TASK_TI2V

    c = model.config
    embedder = family_of_model(model) == FAMILY_WAN and getattr(c, "image_dim", None) is not None
    cin, cout = int(c.in_channels), int(c.out_channels or c.in_channels)
    if (base is not None and base.task == TASK_I2V) or cin == 2 * cout + 4:
        return IMAGE_CONCAT, embedder
    if base is not None and base.task == TASK_TI2V:
        return IMAGE_FIRST_FRAME, embedder
    return IMAGE_NONE, embedder


def pair_sides(cfg: TrainConfig, boundary_timestep: float) -> tuple[str, ...]:
    """The transformers of a two-transformer base a stage calls (its own side, plus the other one only when its grid
    calls cross the boundary). The detail stage's discriminator reads ONE fixed feature teacher, the low-noise
    transformer: an adversarial range reaching above the boundary is refused."""
    from ..schedule import pcm_grid

    g = pcm_grid(cfg.schedule.shift, cfg.schedule.grid_steps)
    k0, b = int(cfg.schedule.k0), float(boundary_timestep)
    if cfg.stage == STAGE_SEMANTIC:
        return ("high", "low") if min(g.sigmas[k0:]) * 1000.0 <= b else ("high",)
    if cfg.loss.adv_weight > 0 and max(g.sigmas_prev[:k0]) * 1000.0 > b:
        raise DCMConfigError(
            f"schedule.k0={k0}: the detail stage's adversarial noise levels reach σ = {max(g.sigmas_prev[:k0]):.4f}, "
            f"above the model's boundary {b:g}/1000; the discriminator reads the low-noise transformer only. Leave "
            f"schedule.k0 empty (the boundary index) or lower it."
        )
    high = max(g.sigmas[:k0]) * 1000.0 > b or cfg.validation.every_steps > 0  # validation's semantic steps
    return ("high", "low") if high else ("low",)


def build_models(cfg: TrainConfig, *, on_meta: bool = False) -> StageModels:
    """Load the pretrained model once and build the stage's student and teacher (dcm-method.md §5.1, §6.1).

    ``on_meta``: the same modules on PyTorch's ``meta`` device (no storage, no weight read) — for the processes
    of an FSDP run that receive their weights from process 0 (:meth:`.parallel.FSDP2.build_models`); a
    two-transformer base is loaded in full (not built on ``meta``).

    Two-transformer bases: ``schedule.k0`` / ``schedule.boundary_timestep`` default to the model's own boundary
    (:func:`dcm_core.train.solver.boundary_k0`) and are written into ``cfg``.
    """
    from .solver import boundary_k0

    m = cfg.model
    root = model_root(m.pretrained)
    ratio = two_transformer_boundary(root) if root is not None else None
    side = _pair_side(cfg)
    if ratio is not None:
        b = 1000.0 * ratio
        if cfg.schedule.k0 is None:
            cfg.schedule.k0 = boundary_k0(b, cfg.schedule.shift, cfg.schedule.grid_steps)
        if cfg.schedule.boundary_timestep is None:
            cfg.schedule.boundary_timestep = b
        pre = load_pretrained(m, sides=pair_sides(cfg, b))
        log.info(
            "two-transformer base %s (boundary %g): the %s stage trains the %s-noise transformer, k0 = %d",
            pre.base.id if pre.base else "?", b, cfg.stage, side, cfg.schedule.k0,
        )  # fmt: skip
    elif on_meta:
        meta = meta_transformer(cfg)
        pre = Pretrained(meta, None, None, base_of(meta), pretrained_latent_format(m))
    else:
        pre = load_pretrained(m)
    pretrained = pre.any
    family = family_of_model(pretrained)
    if m.family is not None and m.family != family:
        raise DCMConfigError(f"model.family={m.family!r} but {m.pretrained!r} is a {family} transformer.")
    tdtype = _dtype_of(m.teacher_dtype, cfg.mixed_precision)
    # the teacher's own transformer (a pair: the side this stage trains) and, for a pair, the other one
    own, oth, source = pretrained, None, pretrained
    if pre.two_transformers:
        own, oth = (pre.high, pre.low) if side == "high" else (pre.low, pre.high)
        source = pre
    if cfg.stage == STAGE_SEMANTIC:
        teacher = None if m.semantic_lora else frozen_copy(own, tdtype)
        student = build_student(cfg, pretrained=source)
    else:
        student = build_student(cfg, pretrained=source, on_meta=on_meta and not pre.two_transformers)
        teacher = cast_frozen(freeze(own), tdtype)
    expert = STAGE_SEMANTIC if cfg.stage == STAGE_SEMANTIC else STAGE_DETAIL
    other = cast_frozen(freeze(oth), tdtype) if oth is not None else None
    if cfg.stage == STAGE_DETAIL:
        # the frozen base in bf16 is an explicit opt-in (model.detail_base_dtype): it moves the loss slightly
        cast_frozen_params(student, DTYPES[m.detail_base_dtype])
    if family_of_model(student) != family:
        raise DCMConfigError(f"the semantic expert is a {family_of_model(student)} model but the teacher is {family}.")
    if cfg.stage == STAGE_DETAIL and DETAIL_ADAPTER not in (student.peft_config or {}):
        raise DCMConfigError("internal: the detail student has no 'lora1' adapter")
    if teacher is not None and int(student.config.in_channels) != int(teacher.config.in_channels):
        raise DCMConfigError(
            f"the student takes {student.config.in_channels} input channels but the teacher {teacher.config.in_channels}: "
            f"model.semantic_expert is not a result of this base model ({m.pretrained})."
        )
    mode, embedder = image_mode_of(pretrained, pre.base)
    models = StageModels(
        family, student, teacher, expert, base=pre.base, image_mode=mode, image_embedder=embedder,
        latent_format=pre.latent_format, boundary_timestep=pre.boundary_timestep, side=side, teacher_other=other,
    )  # fmt: skip
    if m.gradient_checkpointing:
        models.enable_gradient_checkpointing()
    return models
