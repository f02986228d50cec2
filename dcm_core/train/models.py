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
  forward (HunyuanVideo: CLIP pooled vector in token 0, attention mask, embedded guidance).
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


#: Latent channels of the VAEs the trainer supports (Wan2.1 / HunyuanVideo), per VAE config key.
LATENT_CHANNELS = 16
_VAE_CHANNEL_KEYS = ("z_dim", "latent_channels")
SUPPORTED_MODELS = "Wan2.1 T2V (1.3B / 14B) and HunyuanVideo T2V diffusers folders"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DCMConfigError(f"{path}: cannot read this JSON file ({e}).") from e
    if not isinstance(data, dict):
        raise DCMConfigError(f"{path}: expected a JSON object.")
    return data


def check_model_folder(root: Path) -> None:
    """Refuse what the trainer would otherwise get silently wrong (review C3), naming the file and what is supported.

    * a two-transformer folder (Wan2.2 A14B: ``transformer_2/`` and ``boundary_ratio`` in ``model_index.json``):
      only ``transformer/`` — the high-noise expert — would be loaded, and the teacher would be wrong below
      the boundary;
    * a VAE whose latents are not 16-channel (Wan2.2 TI2V-5B: 48): the latent statistics and shapes are
      Wan2.1's.
    """
    index = root / "model_index.json"
    info = _read_json(index) if index.is_file() else {}
    if (root / "transformer_2").is_dir() or "transformer_2" in info or "boundary_ratio" in info:
        what = index if ("boundary_ratio" in info or "transformer_2" in info) else root / "transformer_2"
        raise DCMConfigError(
            f"{what}: this is a two-transformer model (Wan2.2 A14B style: transformer/ for high noise, transformer_2/ "
            f"below boundary_ratio={info.get('boundary_ratio', '?')}). The DCM trainer supports {SUPPORTED_MODELS} "
            f"with one transformer; loading only transformer/ would give a teacher that is wrong below the boundary."
        )
    vae_cfg = root / "vae" / "config.json"
    if vae_cfg.is_file():
        check_vae_config(vae_cfg)


def check_vae_config(path: Path) -> None:
    """A VAE config.json must describe 16-channel latents (Wan2.1 / HunyuanVideo)."""
    cfg = _read_json(path)
    for key in _VAE_CHANNEL_KEYS:
        if key in cfg and int(cfg[key]) != LATENT_CHANNELS:
            raise DCMConfigError(
                f"{path}: {key} = {cfg[key]}, a {cfg[key]}-channel VAE (e.g. the Wan2.2 TI2V-5B VAE). The DCM trainer "
                f"supports 16-channel latents only ({SUPPORTED_MODELS})."
            )


def check_transformer_config(config: dict, where: Path) -> None:
    """``in_channels`` must equal ``out_channels``: image-to-video transformers (36 in, 16 out) need conditioning
    the trainer does not provide."""
    cin, cout = config.get("in_channels"), config.get("out_channels")
    if cin is not None and cout is not None and int(cin) != int(cout):
        raise DCMConfigError(
            f"{where}: in_channels = {cin} but out_channels = {cout} (an image-to-video transformer: the image latent "
            f"and mask are concatenated to the input). The DCM trainer supports text-to-video transformers only "
            f"(in_channels = out_channels, {SUPPORTED_MODELS})."
        )


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
) -> nn.Module:
    """Load a fp32 diffusers transformer from ``source`` (see the module docstring)."""
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
        config = json.loads((d / "config.json").read_text())
        check_transformer_config(config, d / "config.json")
        cls = _class_for_config(config)
        weights = d / TRANSFORMER_WEIGHTS
        if weights.is_file():
            keys = _safetensors_keys(weights)
            if _is_combined_official(keys):
                return _from_state_dict(cls, config, semantic_state_dict(_read_safetensors(weights)), weights)
        model = cls.from_pretrained(str(d), torch_dtype=torch.float32)
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


@dataclass
class Conditioning:
    """Text conditioning in the form the family's forward wants.

    Wan: ``encoder_hidden_states`` [B, L, 4096] (the mask is not used by the Wan transformer,
    as in the official code). HunyuanVideo: the dataset stores ``[B, 1 + L, 4096]`` with the
    CLIP pooled vector zero-padded in token 0 (FastVideo ``hunyuan_hf`` layout), split here into
    ``pooled_projections`` [B, 768] and ``encoder_hidden_states`` [B, L, 4096] + mask [B, L];
    ``guidance`` is the embedded guidance value (official 6016).
    """

    family: str
    context: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None
    guidance: float = 6016.0

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

    def kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": self.context.to(dtype)}
        if self.family == FAMILY_HUNYUAN:
            b = self.context.shape[0]
            kw["encoder_attention_mask"] = self.mask
            kw["pooled_projections"] = self.pooled.to(dtype)
            kw["guidance"] = torch.full((b,), float(self.guidance), device=self.context.device, dtype=torch.float32)
        return kw


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
    """
    dtype = param_dtype(model)
    t = model_timesteps(sigma, x.shape[0], x.device)
    with expert_mode(model, expert):
        out = call(hidden_states=x.to(dtype), timestep=t, return_dict=False, **cond.kwargs(dtype))[0]
    return out.float()


# ---------------------------------------------------------------------------- stage models


@dataclass
class StageModels:
    """The modules of one stage. ``teacher`` is None in semantic-LoRA mode (adapters off = teacher)."""

    family: str
    student: nn.Module
    teacher: nn.Module | None
    student_expert: str

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
        if self.teacher is not None:
            self.teacher.enable_gradient_checkpointing()


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


def build_student(cfg: TrainConfig, *, pretrained: nn.Module | None = None, on_meta: bool = False) -> nn.Module:
    """The stage's student (trainable parameters marked) — also used by export to rebuild it. ``on_meta``: built
    from ``pretrained``'s (meta) architecture, nothing read (the semantic expert has the same architecture)."""
    m = cfg.model
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


def build_models(cfg: TrainConfig, *, on_meta: bool = False) -> StageModels:
    """Load the pretrained model once and build the stage's student and teacher (dcm-method.md §5.1, §6.1).

    ``on_meta``: the same modules on PyTorch's ``meta`` device (no storage, no weight read) — for the processes
    of an FSDP run that receive their weights from process 0 (:meth:`.parallel.FSDP2.build_models`)."""
    m = cfg.model
    if on_meta:
        pretrained = meta_transformer(cfg)
    else:
        pretrained = load_transformer(
            m.pretrained, config_path=m.transformer_config, tiny_config=m.tiny_config, tiny_seed=m.tiny_seed
        )
    family = family_of_model(pretrained)
    if m.family is not None and m.family != family:
        raise DCMConfigError(f"model.family={m.family!r} but {m.pretrained!r} is a {family} transformer.")
    tdtype = _dtype_of(m.teacher_dtype, cfg.mixed_precision)
    if cfg.stage == STAGE_SEMANTIC:
        teacher = None if m.semantic_lora else frozen_copy(pretrained, tdtype)
        student = build_student(cfg, pretrained=pretrained)
        expert = STAGE_SEMANTIC
    else:
        student = build_student(cfg, pretrained=pretrained, on_meta=on_meta)
        # the frozen base in bf16 is an explicit opt-in (model.detail_base_dtype): it moves the loss slightly
        cast_frozen_params(student, DTYPES[m.detail_base_dtype])
        teacher = cast_frozen(freeze(pretrained), tdtype)
        expert = STAGE_DETAIL
    if family_of_model(student) != family:
        raise DCMConfigError(f"the semantic expert is a {family_of_model(student)} model but the teacher is {family}.")
    if cfg.stage == STAGE_DETAIL and DETAIL_ADAPTER not in (student.peft_config or {}):
        raise DCMConfigError("internal: the detail student has no 'lora1' adapter")
    models = StageModels(family, student, teacher, expert)
    if m.gradient_checkpointing:
        models.enable_gradient_checkpointing()
    return models

