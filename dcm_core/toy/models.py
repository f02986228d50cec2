"""The bundled toy models and the four ways the demo samples them.

Bundle layout (``dcm_core/toy/weights/``, made by ``make toy-models``)::

    teacher/config.json, teacher/diffusion_pytorch_model.safetensors   the flow-matching teacher
    dcm_toy_wan.safetensors     DCM experts in the official combined layout (semantic + detail)
    vcm_toy_wan.safetensors     single-expert consistency baseline (plain diffusers keys)
    manifest.json               how every file was made (commands, configs, seeds, times, sha256)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import tiny
from ..errors import DCMFileNotFoundError
from ..modeling import add_detail_expert, velocity
from ..sampler import sample_dcm
from ..schedule import DCM_SHIFT, DEFAULT_BOUNDARY_TIMESTEP, FAMILY_WAN, SEMANTIC, flow_shift, inference_pcm_sigmas
from . import world

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEACHER_DIR = "teacher"
DCM_FILE = "dcm_toy_wan.safetensors"
VCM_FILE = "vcm_toy_wan.safetensors"
MANIFEST = "manifest.json"
BOUNDARY = DEFAULT_BOUNDARY_TIMESTEP[FAMILY_WAN]


@dataclass(frozen=True)
class ToySettings:
    """How a bundle's models are sampled, from its manifest's ``toy`` section (bundles made before it existed:
    world v1, the official shift-17 grid and Wan's boundary 978, no CFG)."""

    world: str = "v1"
    shift: float = DCM_SHIFT
    boundary_timestep: float = BOUNDARY
    teacher_cfg: float = 1.0
    recommended_steps: int = 6

    @property
    def world_module(self):
        from .world_v2 import get_world

        return get_world(self.world)

    def grid(self, steps: int) -> list[float]:
        """``steps`` flow-Euler steps on the toy grid: σ(1), σ((n−1)/n), …, σ(1/n), then 0 (shift ``shift``)."""
        return [float(flow_shift((steps - j) / steps, self.shift)) for j in range(steps)] + [0.0]


def toy_settings(weights_dir: str | Path = WEIGHTS_DIR) -> ToySettings:
    path = Path(weights_dir) / MANIFEST
    toy = json.loads(path.read_text()).get("toy") if path.exists() else None
    if not toy:
        return ToySettings()
    return ToySettings(str(toy["world"]), float(toy["shift"]), float(toy["boundary_timestep"]),
                       float(toy.get("teacher_cfg", 1.0)), int(toy.get("recommended_steps", 4)))


def teacher_sigmas(settings: ToySettings | None = None) -> list[float]:
    """The teacher's 50-step reference schedule: the 50-point grid of the bundle's shift (v1: 17), then 0."""
    if settings is None or settings.shift == DCM_SHIFT:
        return inference_pcm_sigmas() + [0.0]
    return settings.grid(50)


def _need(path: Path) -> Path:
    if not path.exists():
        raise DCMFileNotFoundError(
            f"toy model file {path} is missing. The toy weights ship with the repository; if you deleted them, "
            f"rebuild them with `make toy-models` (about 110 minutes on 2 cores; resumable)."
        )
    return path


def _read_config(weights_dir: Path, teacher_dir: Path | None = None) -> dict:
    cfg = json.loads(_need(Path(teacher_dir or weights_dir / TEACHER_DIR) / "config.json").read_text())
    keep = set(tiny.wan_config().keys())
    out = {k: v for k, v in cfg.items() if k in keep}
    for k in ("patch_size",):
        if k in out and isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def load_teacher(weights_dir: str | Path = WEIGHTS_DIR) -> nn.Module:
    from diffusers import WanTransformer3DModel

    d = Path(weights_dir) / TEACHER_DIR
    _need(d / "diffusion_pytorch_model.safetensors")
    return WanTransformer3DModel.from_pretrained(str(d), torch_dtype=torch.float32).float().eval()


def _load_sd(path: Path) -> dict[str, torch.Tensor]:
    from ..formats import load_state_dict

    # The bundle stores bf16 weights; every toy model computes in fp32.
    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_state_dict(str(_need(path))).items()}


def load_dcm(weights_dir: str | Path = WEIGHTS_DIR, file: str = DCM_FILE) -> nn.Module:
    """The DCM experts as one diffusers model (official layout; use with ``expert_mode``)."""
    weights_dir = Path(weights_dir)
    return _load_dcm_at(weights_dir / file, weights_dir)


def load_dcm_file(path: str | Path, weights_dir: str | Path = WEIGHTS_DIR,
                  teacher_dir: str | Path | None = None) -> nn.Module:
    """A DCM official-layout file with the toy architecture (e.g. an ablation run's export); the architecture
    is the teacher's (``teacher_dir``, default ``<weights_dir>/teacher``)."""
    return _load_dcm_at(Path(path), Path(weights_dir), teacher_dir)


def _load_dcm_at(path: Path, weights_dir: Path, teacher_dir: str | Path | None = None) -> nn.Module:
    from ..formats import inspect_file

    info = inspect_file(str(_need(path)))
    model = tiny.build_transformer(FAMILY_WAN, _read_config(weights_dir, teacher_dir))
    add_detail_expert(model, rank=int(info.lora_rank), alpha=float(info.lora_alpha))
    model.load_state_dict(_load_sd(path), strict=True)
    return model.eval()


def load_vcm(weights_dir: str | Path = WEIGHTS_DIR, file: str = VCM_FILE) -> nn.Module:
    weights_dir = Path(weights_dir)
    model = tiny.build_transformer(FAMILY_WAN, _read_config(weights_dir))
    model.load_state_dict(_load_sd(weights_dir / file), strict=True)
    return model.eval()


def load_vcm_file(path: str | Path, teacher_dir: str | Path) -> nn.Module:
    """A single-expert model file (plain diffusers keys) with the architecture of the teacher in ``teacher_dir``."""
    model = tiny.build_transformer(FAMILY_WAN, _read_config(Path(teacher_dir), Path(teacher_dir)))
    model.load_state_dict(_load_sd(Path(path)), strict=True)
    return model.eval()


@dataclass
class ToyModels:
    teacher: nn.Module
    dcm: nn.Module
    vcm: nn.Module | None
    settings: ToySettings = ToySettings()


def load_bundle(weights_dir: str | Path = WEIGHTS_DIR) -> ToyModels:
    weights_dir = Path(weights_dir)
    vcm = load_vcm(weights_dir) if (weights_dir / VCM_FILE).exists() else None
    return ToyModels(load_teacher(weights_dir), load_dcm(weights_dir), vcm, toy_settings(weights_dir))


# ----------------------------------------------------------------------------- samplers


def make_noise(seed: int, batch: int = 1) -> torch.Tensor:
    """Seeded CPU noise of the toy latent's shape (the same in every world: ComfyUI's KSampler draws it alike)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(world.latent_shape(batch), generator=g)


@torch.no_grad()
def sample_single(model: nn.Module, noise: torch.Tensor, context: torch.Tensor, sigmas,
                  cfg_scale: float = 1.0) -> torch.Tensor:
    """Flow-Euler over ``sigmas`` with one model (teacher or single-expert baseline), optionally with
    classifier-free guidance ``v_u + s·(v_c − v_u)`` against the empty prompt (all-zero embedding)."""
    if cfg_scale == 1.0:
        return sample_dcm(lambda x, s, e: velocity(model, x, s, context, SEMANTIC), noise, sigmas, BOUNDARY)
    uncond = torch.zeros_like(context)

    def guided(x, s, e):
        v = velocity(model, torch.cat([x, x]), s, torch.cat([context, uncond]), SEMANTIC)
        vc, vu = v.chunk(2)
        return vu + cfg_scale * (vc - vu)

    return sample_dcm(guided, noise, sigmas, BOUNDARY)


@torch.no_grad()
def sample_experts(model: nn.Module, noise: torch.Tensor, context: torch.Tensor, sigmas,
                   boundary: float = BOUNDARY) -> torch.Tensor:
    """DCM: each step routed to the semantic or the detail expert by the boundary rule."""
    return sample_dcm(lambda x, s, e: velocity(model, x, s, context, e), noise, sigmas, boundary)


def score(latent: torch.Tensor, reference: torch.Tensor, prompt: str, w=world) -> dict[str, float]:
    """How a sample compares with the teacher's: MSE of the model-space latents, the motion error (px) of its
    decoded frames against the prompt's motion law (in world ``w``), and its sharpness relative to the
    teacher's sample (HF energy ratio: 1 = as sharp, below 1 = blurred)."""
    from .world_v2 import hf_energy

    frames, ref = w.latent_to_frames(latent[0]), w.latent_to_frames(reference[0])
    return {
        "mse_to_teacher": float(((latent - reference) ** 2).mean()),
        "motion_error_px": w.motion_error(frames, prompt),
        "sharpness_vs_teacher": hf_energy(frames) / max(hf_energy(ref), 1e-12),
    }
