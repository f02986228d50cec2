"""Dual-expert sampling inside ComfyUI: one code path for the sampler node and the guider node.

:class:`DualExpertGuider` is a ComfyUI GUIDER (a ``CFGGuider`` subclass) holding two ordinary
``CFGGuider``\\ s, one per expert. ``sample()`` splits the sigmas at the boundary
(:func:`dcm_core.schedule.split_sigmas`), runs the semantic segment with the noise, then the
detail segment with **zero** noise from the first segment's latent (and seed + 1, so stochastic
samplers do not replay segment 1's noise draws; euler ignores it). That hand-over is exact:
segment 1 returns ``x/(1−σ_k)`` (ComfyUI's ``process_latent_out`` of a flow model's noise scaling)
and segment 2 multiplies by ``(1−σ_k)`` again. With ComfyUI's ``euler`` sampler every step is the official flow-Euler step
``x + (σ_{i+1} − σ_i)·v``, so the result equals :func:`dcm_core.sampler.sample_dcm`.

Around the two runs the guider

* validates everything cheap first (sigmas, boundary, latent channels / NaN, batch sizes);
* reports one progress bar over all steps (segment 2's step index is offset);
* checks each step's prediction for NaN / Inf and names the step and the expert;
* honours Cancel at every step.

Switching experts is ComfyUI's own model management: each segment's ``CFGGuider`` loads its clone,
and ComfyUI restores the shared base weights from its backups before it applies the other clone's
patches. A run that fails or is cancelled mid-way therefore needs no cleanup of its own: the next
run of either expert starts from the right weights.

A schedule that gives one expert no step is not an error: a warning is logged and all steps run
on the other expert (documented in the node descriptions).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..errors import DCMSamplingError, DCMScheduleError, node_errors
from ..families import BOUNDARY_MANUAL, BOUNDARY_PRESETS, resolve_boundary
from ..sampler import check_finite
from ..schedule import (
    DETAIL,
    PRESET_CUSTOM,
    SEMANTIC,
    Expert,
    build_sigmas,
    split_sigmas,
    timestep_of,
    validate_boundary,
    validate_sigmas,
)
from .loading import family_label, family_of
from .names import GUIDER_NODE, SAMPLER_NODE

log = logging.getLogger("DCM.comfy")


@dataclass(frozen=True)
class Segment:
    """One expert's contiguous run of steps: ``sigmas[offset : offset + len(sigmas)]``."""

    expert: Expert
    offset: int
    sigmas: tuple[float, ...]

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


# --------------------------------------------------------------------------- validation


def sigma_list(sigmas: torch.Tensor | Sequence[float], *, node: str) -> list[float]:
    """A SIGMAS value (tensor or list) as floats, checked by :func:`dcm_core.schedule.validate_sigmas`."""
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().flatten().cpu().tolist()
    return validate_sigmas(sigmas, source=node, terminal_zero=False)


def plan_segments(sigmas: Sequence[float], boundary_timestep: float, *, node: str) -> list[Segment]:
    """The non-empty expert segments, in order; warns when one expert gets no step."""
    b = validate_boundary(boundary_timestep)
    sem, det = split_sigmas(sigmas, b)
    segments: list[Segment] = []
    if len(sem) > 1:
        segments.append(Segment(SEMANTIC, 0, tuple(sem)))
    if len(det) > 1:
        segments.append(Segment(DETAIL, len(sem) - 1, tuple(det)))
    total = len(sigmas) - 1
    if len(segments) == 1:
        only = segments[0].expert
        other = DETAIL if only == SEMANTIC else SEMANTIC
        t_first = timestep_of(sigmas[0])
        why = (
            f"every step has floor(1000·sigma) ≤ {b:g} (the first step is at t={t_first:.1f})"
            if only == DETAIL
            else f"no step has floor(1000·sigma) ≤ {b:g} (the last step starts at t={timestep_of(sigmas[-2]):.1f})"
        )
        log.warning(
            "%s: boundary_timestep=%g leaves the %s expert no steps: %s. All %d step(s) run on the %s expert. "
            "Use boundary 978 for Wan2.1 / 981 for HunyuanVideo, or a schedule that crosses the boundary.",
            node, b, other, why, total, only,
        )
    return segments


def _cond_batches(conditioning: Any) -> list[tuple[str, int]]:
    out = []
    for c in conditioning or []:
        if isinstance(c, (list, tuple)) and c and isinstance(c[0], torch.Tensor):
            out.append(("conditioning", int(c[0].shape[0])))
            extra = c[1] if len(c) > 1 and isinstance(c[1], dict) else {}
            pooled = extra.get("pooled_output")
            if isinstance(pooled, torch.Tensor):
                out.append(("pooled_output", int(pooled.shape[0])))
    return out


def check_batches(positive: Any, negative: Any, batch: int, *, node: str) -> None:
    """Conditioning batch must be 1, the latent batch, or a divisor of it (repeated evenly).

    ``negative`` may be None when no expert uses it (cfg 1.0 skips the negative pass).

    ComfyUI silently repeats or truncates conditioning to the latent batch; an uneven repeat
    (2 prompts for 3 latents) or truncation (3 prompts for 2 latents) is almost always a wiring
    mistake, so it is refused here with the numbers.
    """
    for label, conds in (("positive", positive), ("negative", negative)):
        for what, n in _cond_batches(conds):
            if n > batch or batch % n:
                raise DCMSamplingError(
                    f"{node}: the {label} {what} has batch {n} but the latent has batch {batch}; ComfyUI would "
                    f"{'drop' if n > batch else 'unevenly repeat'} prompts. Use one prompt, or as many prompts as "
                    f"latents (or a divisor of it)."
                )


def check_latent(model: Any, latent_image: torch.Tensor, *, node: str) -> None:
    """Channel count / rank against the model's latent format, and finite values."""
    fmt = model.get_model_object("latent_format")
    want = int(fmt.latent_channels)
    dims = int(getattr(fmt, "latent_dimensions", 2))
    if latent_image.ndim != dims + 2 or latent_image.shape[1] != want:
        shape = list(latent_image.shape)
        down = 16 if want == 48 else 8  # the Wan2.2 VAE (48 channels) compresses 16× in space
        expect = f"[batch, {want}, frames, height/{down}, width/{down}]" if dims == 3 else f"[batch, {want}, height/8, width/8]"
        maker = (
            "Wan22ImageToVideoLatent (the Wan2.2 TI2V 5B latent)" if want == 48
            else "EmptyHunyuanLatentVideo (or WanImageToVideo's latent, or the matching VAE's encoder)"
        )
        raise DCMSamplingError(
            f"{node}: latent_image has shape {shape} but the {family_label(family_of(model))} model expects "
            f"{expect}. Use {maker} to make the latent."
        )
    if not bool(torch.isfinite(latent_image).all()):
        n_bad = int((~torch.isfinite(latent_image)).sum())
        raise DCMSamplingError(
            f"{node}: latent_image contains {n_bad} NaN/Inf values. Recreate it (EmptyHunyuanLatentVideo) or check "
            f"the node that produced it."
        )


def check_models(semantic: Any, detail: Any, *, node: str) -> None:
    fs, fd = family_of(semantic), family_of(detail)
    if fs != fd:
        raise DCMSamplingError(
            f"{node}: semantic_model is {family_label(fs)} but detail_model is {family_label(fd)}. Connect both "
            f"outputs of the same DCM Checkpoint Loader (or a base model and its own detail expert)."
        )
    ls = semantic.get_model_object("latent_format")
    ld = detail.get_model_object("latent_format")
    if type(ls) is not type(ld):
        raise DCMSamplingError(
            f"{node}: semantic_model and detail_model use different latent formats ({type(ls).__name__} vs "
            f"{type(ld).__name__}); connect two experts of the same model."
        )


# --------------------------------------------------------------------------- guider


class DualExpertGuider(comfy.samplers.CFGGuider):
    """GUIDER for ``SamplerCustomAdvanced``: semantic expert above the boundary, detail below.

    ``model_patcher`` is the semantic expert (used by SamplerCustomAdvanced for the latent format,
    previews and ``process_latent_out``). Inputs are never modified: each expert gets its own
    stock ``CFGGuider``; ``cfg == 1`` skips the negative pass (ComfyUI's cfg-1 optimisation).
    """

    def __init__(
        self,
        semantic: Any,
        detail: Any,
        boundary_timestep: float,
        cfg_semantic: float = 1.0,
        cfg_detail: float = 1.0,
        *,
        node: str = GUIDER_NODE,
    ):
        super().__init__(semantic)
        self.node = node
        self.boundary_timestep = float(boundary_timestep)
        self.semantic_model = semantic
        self.detail_model = detail
        self.guiders: dict[Expert, comfy.samplers.CFGGuider] = {
            SEMANTIC: comfy.samplers.CFGGuider(semantic),
            DETAIL: comfy.samplers.CFGGuider(detail),
        }
        self.guiders[SEMANTIC].set_cfg(float(cfg_semantic))
        self.guiders[DETAIL].set_cfg(float(cfg_detail))
        self.cfg = float(cfg_semantic)
        self._positive: Any = None
        self._negative: Any = None

    # -- CFGGuider API
    def set_conds(self, positive: Any, negative: Any) -> None:
        super().set_conds(positive, negative)
        self._positive, self._negative = positive, negative
        for g in self.guiders.values():
            g.set_conds(positive, negative)

    def set_cfg(self, cfg: float) -> None:
        """One value for both experts (the per-expert values are set in the constructor)."""
        self.cfg = float(cfg)
        for g in self.guiders.values():
            g.set_cfg(float(cfg))

    def sample(
        self,
        noise: torch.Tensor,
        latent_image: torch.Tensor,
        sampler: Any,
        sigmas: torch.Tensor,
        denoise_mask: torch.Tensor | None = None,
        callback: Callable | None = None,
        disable_pbar: bool = False,
        seed: int | None = None,
    ) -> torch.Tensor:
        with node_errors(self.node):
            return self._sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def _sample(self, noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed) -> torch.Tensor:
        node = self.node
        values = sigma_list(sigmas, node=node)
        segments = plan_segments(values, self.boundary_timestep, node=node)
        check_models(self.semantic_model, self.detail_model, node=node)
        check_latent(self.semantic_model, latent_image, node=node)
        uses_negative = any(not math.isclose(g.cfg, 1.0) for g in self.guiders.values())
        check_batches(self._positive, self._negative if uses_negative else None, int(latent_image.shape[0]), node=node)
        total = len(values) - 1
        x = latent_image
        for n, seg in enumerate(segments):
            seg_noise = noise if n == 0 else torch.zeros_like(noise)
            if n and denoise_mask is not None:
                x = keep_unmasked(x, latent_image, denoise_mask)
            # stochastic samplers (lcm, ancestral) must not replay segment 1's noise draws
            seg_seed = seed if seed is None else seed + n
            seg_sigmas = torch.tensor(seg.sigmas, dtype=sigmas.dtype if isinstance(sigmas, torch.Tensor) else torch.float32)
            x = self.guiders[seg.expert].sample(
                seg_noise,
                x,
                sampler,
                seg_sigmas,
                denoise_mask=denoise_mask,
                callback=self._step_callback(callback, seg, total),
                disable_pbar=disable_pbar,
                seed=seg_seed,
            )
            check_finite(x, what="The latent", step=seg.offset + seg.steps - 1, expert=seg.expert, sigma=seg.sigmas[-2])
        return x

    @staticmethod
    def _step_callback(callback: Callable | None, seg: Segment, total: int) -> Callable:
        """Offset the step index, check the prediction for NaN/Inf and honour Cancel at every step."""

        def step(i: int, x0: torch.Tensor, x: torch.Tensor, _segment_total: int) -> None:
            k = seg.offset + i
            check_finite(x0, what="The model prediction", step=k, expert=seg.expert, sigma=seg.sigmas[i])
            if callback is not None:
                callback(k, x0, x, total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        return step


def keep_unmasked(x: torch.Tensor, latent_image: torch.Tensor, denoise_mask: torch.Tensor) -> torch.Tensor:
    """The next segment's start latent with the kept (mask 0) region put back to the input latent.

    ComfyUI's sampler uses its ``latent_image`` argument both as the starting point and as the content of the
    region the mask keeps (Wan22ImageToVideoLatent's clean first frame). Handing the first segment's output over
    as is would make the second segment keep ``x_k/(1−σ_k)`` there — the start frame plus noise — which is what a
    stock two-sampler chain does to a TI2V latent. Putting the input back keeps the frame clean (the flow-Euler
    step then leaves it on its noise-free line and it ends exactly at the input); the regions being generated
    are handed over unchanged.

    Applied when the mask has the latent's rank and broadcasts to it (Wan22ImageToVideoLatent's
    ``[batch, 1, frames, h, w]``); a mask of another shape (a pixel-space inpaint mask) is left to ComfyUI as a
    stock chain would, with a log line."""
    m = denoise_mask
    try:
        if m.ndim != x.ndim:
            raise RuntimeError
        torch.broadcast_shapes(tuple(m.shape), tuple(x.shape))
    except RuntimeError:
        log.info("%s: noise mask %s does not broadcast to the latent %s; handed over as is", SAMPLER_NODE,
                 list(m.shape), list(x.shape))
        return x
    m = m.to(device=x.device, dtype=x.dtype)
    return x * m + latent_image.to(x) * (1.0 - m)


# --------------------------------------------------------------------------- nodes


def boundary_preset_problem(boundary_preset: Any) -> str | None:
    """``validate_inputs`` helper for the optional ``boundary_preset`` combo: None when it is fine (or linked /
    absent), else the message the UI shows."""
    if boundary_preset is None or boundary_preset in BOUNDARY_PRESETS:
        return None
    return f"boundary_preset {boundary_preset!r} is unknown; choose one of: {', '.join(BOUNDARY_PRESETS)}."


def make_guider(
    semantic: Any,
    detail: Any,
    positive: Any,
    negative: Any,
    boundary_timestep: float,
    cfg_semantic: float,
    cfg_detail: float,
    boundary_preset: str = BOUNDARY_MANUAL,
) -> DualExpertGuider:
    """``DCM Dual-Expert Guider``; a ``boundary_preset`` other than ``manual`` replaces ``boundary_timestep``."""
    with node_errors(GUIDER_NODE):
        boundary_timestep = resolve_boundary(boundary_preset, boundary_timestep)
        validate_boundary(boundary_timestep)
        check_models(semantic, detail, node=GUIDER_NODE)
        guider = DualExpertGuider(semantic, detail, boundary_timestep, cfg_semantic, cfg_detail)
        guider.set_conds(positive, negative)
        return guider


def sampler_sigmas(preset: str, boundary_timestep: float, sigmas: Any = None) -> list[float]:
    """The sigma list of ``DCM Dual-Expert Sampler``: the ``sigmas`` input if connected, else the preset."""
    if sigmas is not None:
        return sigma_list(sigmas, node=SAMPLER_NODE)
    if preset == PRESET_CUSTOM:
        raise DCMScheduleError(
            f"{SAMPLER_NODE}: preset 'custom' needs the optional sigmas input. Connect DCM Schedule (preset "
            f"custom, your list in custom_sigmas) to it, or pick another preset."
        )
    with node_errors(SAMPLER_NODE):
        return build_sigmas(preset, boundary_timestep=boundary_timestep)


def sample_dual_expert(
    semantic: Any,
    detail: Any,
    positive: Any,
    negative: Any,
    latent: dict,
    seed: int,
    preset: str,
    boundary_timestep: float,
    cfg_semantic: float,
    cfg_detail: float,
    sigmas: Any = None,
    boundary_preset: str = BOUNDARY_MANUAL,
) -> dict:
    """``DCM Dual-Expert Sampler``: noise from ``seed`` as stock KSampler makes it, then the guider + euler.

    A ``boundary_preset`` other than ``manual`` replaces ``boundary_timestep`` for the routing and for the
    per-expert-uniform preset. The conditioning is passed to both experts unchanged: image-to-video conditioning
    (``concat_latent_image`` / ``concat_mask`` / ``clip_vision_output`` from WanImageToVideo) and a latent's
    ``noise_mask`` (Wan22ImageToVideoLatent's clean first frame) reach each expert as they reach a stock sampler."""
    node = SAMPLER_NODE
    with node_errors(node):
        boundary_timestep = resolve_boundary(boundary_preset, boundary_timestep)
    values = sampler_sigmas(preset, boundary_timestep, sigmas)
    latent_image = comfy.sample.fix_empty_latent_channels(semantic, latent["samples"])
    # the boundary, models, latent and batches are checked by DualExpertGuider.sample, before any model work
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    guider = DualExpertGuider(semantic, detail, boundary_timestep, cfg_semantic, cfg_detail, node=node)
    guider.set_conds(positive, negative)
    steps = len(values) - 1
    callback = latent_preview.prepare_callback(semantic, steps)
    samples = guider.sample(
        noise,
        latent_image,
        comfy.samplers.sampler_object("euler"),
        torch.tensor(values, dtype=torch.float32),
        denoise_mask=latent.get("noise_mask"),
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out
