"""The dual-expert parameterisation on diffusers transformers (dcm-method.md §4).

One diffusers ``WanTransformer3DModel`` / ``HunyuanVideoTransformer3DModel`` holds both
experts, exactly as the official checkpoint does:

* semantic expert = the base weights, adapters off, the original embedder and head;
* detail expert   = the same base + the PEFT LoRA adapter ``lora1`` (to_q/to_k/to_v/to_out.0,
  every matching module) + its own embedder and head, registered on the model as
  ``*_lora`` modules (Wan: ``condition_embedder_lora``, ``norm_out_lora``, ``proj_out_lora``;
  HunyuanVideo: ``time_text_embed_lora``, ``norm_out_lora``, ``proj_out_lora``).

So ``model.state_dict()`` *is* the official combined layout. :func:`expert_mode` selects an
expert for the duration of a forward without touching the class (the official code
replaces ``forward`` at class level; we swap instance attributes inside ``try/finally``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import DCMConfigError
from .schedule import DETAIL, FAMILY_HUNYUAN, FAMILY_WAN, NUM_TRAIN_TIMESTEPS, SEMANTIC, Expert

#: PEFT adapter name of the detail expert in the official checkpoint.
DETAIL_ADAPTER = "lora1"
#: PEFT target module names (every module whose name ends with one of these).
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
#: Official recipe: rank 128, alpha 256 (scale 2).
DEFAULT_LORA_RANK = 128
DEFAULT_LORA_ALPHA = 256.0

#: base module -> detail-expert copy, per family.
EXPERT_MODULES: dict[str, dict[str, str]] = {
    FAMILY_WAN: {
        "condition_embedder": "condition_embedder_lora",
        "norm_out": "norm_out_lora",
        "proj_out": "proj_out_lora",
    },
    FAMILY_HUNYUAN: {
        "time_text_embed": "time_text_embed_lora",
        "norm_out": "norm_out_lora",
        "proj_out": "proj_out_lora",
    },
}


def family_of_model(model: nn.Module) -> str:
    """``"wan"`` or ``"hunyuan_video"`` for a diffusers transformer (or raise)."""
    name = type(model).__name__
    if name.startswith("WanTransformer3D") or (hasattr(model, "condition_embedder") and hasattr(model, "blocks")):
        return FAMILY_WAN
    if name.startswith("HunyuanVideoTransformer3D") or hasattr(model, "time_text_embed"):
        return FAMILY_HUNYUAN
    raise DCMConfigError(
        f"{name} is not a supported transformer; DCM supports diffusers WanTransformer3DModel and "
        f"HunyuanVideoTransformer3DModel."
    )


def has_detail_expert(model: nn.Module) -> bool:
    fam = family_of_model(model)
    peft_cfg = getattr(model, "peft_config", None) or {}
    return DETAIL_ADAPTER in peft_cfg and all(hasattr(model, extra) for extra in EXPERT_MODULES[fam].values())


def lora_config(rank: int = DEFAULT_LORA_RANK, alpha: float = DEFAULT_LORA_ALPHA, init: bool | str = True):
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        init_lora_weights=init,
        target_modules=list(LORA_TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
    )


def add_detail_expert(
    model: nn.Module,
    *,
    rank: int = DEFAULT_LORA_RANK,
    alpha: float = DEFAULT_LORA_ALPHA,
    init_lora: bool | str = True,
) -> nn.Module:
    """Give a (semantic) transformer the detail expert's parameters, in place.

    Adds the PEFT adapter ``lora1`` (B = 0, so detail == semantic at init) and copies the
    embedder / head into the ``*_lora`` modules (official ``add_layer`` + ``init_layer``).
    PEFT freezes every non-adapter parameter; the ``*_lora`` copies stay trainable.
    """
    fam = family_of_model(model)
    if has_detail_expert(model):
        raise DCMConfigError("this model already carries a detail expert (adapter 'lora1' and *_lora modules).")
    model.add_adapter(lora_config(rank, alpha, init_lora), adapter_name=DETAIL_ADAPTER)
    for base, extra in EXPERT_MODULES[fam].items():
        module = copy.deepcopy(getattr(model, base))
        module.requires_grad_(True)
        model.add_module(extra, module)
    return model


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT tuner layers (LoRA-wrapped modules) of ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Enable/disable ``lora1`` without changing any parameter's ``requires_grad``.

    PEFT's ``enable_adapters`` flips ``requires_grad`` of adapter weights as a side effect,
    which would silently freeze the student when the same model also serves as the teacher.
    """
    layers = tuner_layers(model)
    flags = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        if enabled:
            layer.set_adapter(DETAIL_ADAPTER)
        layer.enable_adapters(enabled)
    for p, rg in flags.items():
        p.requires_grad_(rg)


def adapters_enabled(model: nn.Module) -> bool:
    layers = tuner_layers(model)
    return bool(layers) and not layers[0].disable_adapters


@contextmanager
def expert_mode(model: nn.Module, expert: Expert) -> Iterator[nn.Module]:
    """Route forwards inside the block to one expert; restores the previous state on exit.

    ``semantic``: adapters off, original embedder/head. ``detail``: ``lora1`` on, the
    ``*_lora`` embedder/head swapped in. A model without a detail expert only accepts
    ``semantic`` (it is a plain teacher / semantic model).
    """
    if expert not in (SEMANTIC, DETAIL):
        raise DCMConfigError(f"expert must be 'semantic' or 'detail', got {expert!r}")
    fam = family_of_model(model)
    has_detail = has_detail_expert(model)
    if expert == DETAIL and not has_detail:
        raise DCMConfigError("detail expert requested, but the model has no 'lora1' adapter and *_lora modules.")
    if not has_detail:
        yield model
        return
    was_enabled = adapters_enabled(model)
    swapped = False
    try:
        _set_adapters_enabled(model, expert == DETAIL)
        if expert == DETAIL:
            _swap(model, fam)
            swapped = True
        yield model
    finally:
        if swapped:
            _swap(model, fam)
        _set_adapters_enabled(model, was_enabled)


def _swap(model: nn.Module, fam: str) -> None:
    for base, extra in EXPERT_MODULES[fam].items():
        a, b = model._modules[base], model._modules[extra]
        model._modules[base], model._modules[extra] = b, a


def model_timesteps(sigma: float | torch.Tensor, batch: int, device: torch.device | str) -> torch.Tensor:
    """The network's timesteps ``t = 1000·σ`` in fp32, one per sample (a single σ is broadcast to ``batch``)."""
    sigma = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))
    t = sigma.to(device=device, dtype=torch.float32).reshape(-1) * float(NUM_TRAIN_TIMESTEPS)
    return t.expand(batch) if t.numel() == 1 and batch > 1 else t


def velocity(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    context: torch.Tensor,
    expert: Expert = SEMANTIC,
    **kwargs,
) -> torch.Tensor:
    """One forward of ``expert`` at noise level ``sigma`` (timestep ``1000·σ``), returning v."""
    t = model_timesteps(sigma, x.shape[0], x.device)
    with expert_mode(model, expert):
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
    return out
