"""Real ComfyUI, in-process.

The session fixture ``comfy`` boots the ComfyUI work tree at $COMFYUI_PATH on the CPU
with a temporary base directory whose ``custom_nodes`` folder holds this pack (a
symlink to the repo), loads custom nodes through ComfyUI's own loader, and returns a
:class:`ComfyHarness` that can run API-format prompts through ``execution.PromptExecutor``.
"""

from __future__ import annotations

import asyncio
import copy
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tools.comfy_inprocess import StubServer, execution_error_text

ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "dcm-video"
TEST_NODES = Path(__file__).resolve().parent / "testing_nodes"


@dataclass
class RunResult:
    success: bool
    outputs: dict
    messages: list
    node_errors: dict = field(default_factory=dict)
    error: dict | None = None

    def error_text(self) -> str:
        return execution_error_text(self.messages)


class ComfyHarness:
    def __init__(self, base: Path):
        import execution
        import folder_paths

        self.base = base
        self.folder_paths = folder_paths
        self.execution = execution
        self.server = StubServer()
        self.models = base / "models"
        self.output = base / "output"
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)

    pack_dir_name = PACK_DIR_NAME

    @property
    def pack_module_name(self) -> str:
        """``sys.modules`` name ComfyUI gave the pack (its folder path with '.' → '_x_')."""
        return str(self.base / "custom_nodes" / PACK_DIR_NAME).replace(".", "_x_")

    def pack_module(self, sub: str):
        """A submodule of the pack *as ComfyUI loaded it* (its caches, its error classes)."""
        import importlib

        return importlib.import_module(f"{self.pack_module_name}.{sub}")

    def model_dir(self, kind: str) -> Path:
        """models/<kind> of the temporary base (diffusion_models, loras, ...)."""
        return self.models / kind

    def new_executor(self):
        """A fresh executor (empty node-output cache)."""
        self.executor = self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC)
        return self.executor

    def run(self, prompt: dict, *, executor=None, check_valid: bool = True) -> RunResult:
        """Validate and execute an API-format prompt. ``node_errors`` must be empty to run.

        Runs a deep copy, as a server gets a fresh dict per request: ComfyUI stores each node's fingerprint
        (``is_changed``) into the prompt it executes, and a reused dict would replay the old fingerprints."""
        prompt = copy.deepcopy(prompt)
        pid = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(pid, prompt, None))
        ok, err, outputs, node_errors = valid[0], valid[1], valid[2], valid[3]
        if not ok or node_errors:
            if check_valid:
                raise AssertionError(f"prompt failed validation: {err} {node_errors}")
            return RunResult(False, {}, [], node_errors=node_errors, error=err)
        ex = executor or self.executor
        self.server.last_prompt_id = pid
        ex.execute(prompt, pid, {}, outputs)
        return RunResult(ex.success, ex.history_result.get("outputs", {}), list(ex.status_messages))


def _boot(base: Path, comfy_path: Path) -> ComfyHarness:
    from tools.comfy_inprocess import boot_comfyui

    # Tiny models on shared CPU cores: intra-op threads only add contention (measured 14× slower
    # per sampling step with 2 threads on a loaded 2-core box).
    boot_comfyui(comfy_path, base, {PACK_DIR_NAME: ROOT, "dcm_testing_nodes": TEST_NODES}, threads=1)
    return ComfyHarness(base)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    from tools.comfy_inprocess import comfyui_path

    comfy_path = comfyui_path()
    base = tmp_path_factory.mktemp("comfy_base")
    h = _boot(base, comfy_path)
    import nodes

    missing = [n for n in ("DCMCheckpointLoader", "DCMDualExpertSampler") if n not in nodes.NODE_CLASS_MAPPINGS]
    h.pack_loaded = not missing
    return h


# --------------------------------------------------------------------------- DCM tiny world
#
# Tiny official-layout DCM checkpoints (dcm_core.tiny) for both families, written into the temporary
# ComfyUI model folders, plus the diffusers+peft reference and API-prompt builders. Session-scoped:
# built once (~1 s) and shared by the node tests.

LATENT_W = LATENT_H = 32  # → 4×4 latent
LATENT_FRAMES = 5  # → 2 latent frames
COND_SEED, NEG_SEED, COND_TOKENS = 5, 6, 8


@dataclass
class TinyFamily:
    family: str
    model: object  # diffusers transformer with the detail expert (reference)
    official: str  # file name in models/diffusion_models
    semantic: str  # converted semantic file (models/diffusion_models)
    detail: str  # converted detail-expert file (models/loras)
    boundary: float
    preset: str

    @property
    def hunyuan(self) -> bool:
        return self.family == "hunyuan_video"


class DCMWorld:
    """Tiny DCM files in the harness's model folders + reference sampler + prompt builders."""

    def __init__(self, harness: ComfyHarness, tmp: Path):
        import torch

        from dcm_core import tiny
        from dcm_core.formats import convert_official
        from dcm_core.schedule import DEFAULT_BOUNDARY_TIMESTEP, DEFAULT_PRESET

        self.h = harness
        self.families: dict[str, TinyFamily] = {}
        diff_dir, lora_dir = harness.model_dir("diffusion_models"), harness.model_dir("loras")
        for fam, cfg, short in (
            ("wan", tiny.wan_config(num_layers=2), "wan"),
            ("hunyuan_video", tiny.hunyuan_config(), "hy"),
        ):
            model = tiny.make_official_model(fam, cfg, rank=4, alpha=8.0, seed=3)
            official = f"dcm_tiny_{short}.safetensors"
            tiny.save_official_checkpoint(model, diff_dir / official, metadata={"lora_alpha": "8"})
            res = convert_official(diff_dir / official, tmp / f"conv_{short}", dtype="fp32", name=f"dcm_tiny_{short}", progress=False)
            sem = diff_dir / res.semantic_path.name
            det = lora_dir / res.detail_path.name
            os.replace(res.semantic_path, sem)
            os.replace(res.detail_path, det)
            self.families[fam] = TinyFamily(
                fam, model, official, sem.name, det.name, DEFAULT_BOUNDARY_TIMESTEP[fam], DEFAULT_PRESET[fam]
            )
        self.torch = torch

    # ---- references
    def cond(self, family: str, batch: int = 1, seed: int = COND_SEED):
        """What DCMTestConditioning(seed, COND_TOKENS, batch, 4096, hunyuan) produces."""
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn(batch, COND_TOKENS, 4096, generator=g)
        pooled = torch.randn(batch, 768, generator=g) if family == "hunyuan_video" else None
        return ctx, pooled

    def empty_latent(self, batch: int = 1):
        return self.torch.zeros(batch, 16, (LATENT_FRAMES - 1) // 4 + 1, LATENT_H // 8, LATENT_W // 8)

    def noise(self, seed: int, batch: int = 1):
        import comfy.sample

        return comfy.sample.prepare_noise(self.empty_latent(batch), seed)

    def reference(self, family: str, seed: int, sigmas, boundary: float, batch: int = 1, cond_batch: int = 1,
                  cfg: tuple[float, float] = (1.0, 1.0), only_expert: str | None = None):
        """dcm_core.sampler.sample_dcm over the diffusers+peft model → ComfyUI (raw VAE) latent space.

        ``cfg = (semantic, detail)``: each expert's own classifier-free guidance scale on its own steps,
        ``v = v_neg + scale·(v_pos − v_neg)`` with the negative prompt of :meth:`sampler_prompt` (NEG_SEED); a
        scale of 1 runs no negative pass. (ComfyUI mixes the x0 predictions ``x − σ·v``; for the flow-Euler step
        that is the same mix of velocities.) ``only_expert`` runs every step on that expert (a routing bug, for
        sizing tolerances)."""
        from dcm_core.latents import from_model_space
        from dcm_core.modeling import velocity
        from dcm_core.sampler import sample_dcm
        from dcm_core.schedule import SEMANTIC

        torch = self.torch
        fam = self.families[family]
        reps = batch // cond_batch

        def prompt(seed_: int):
            ctx, pooled = self.cond(family, cond_batch, seed=seed_)
            ctx = ctx.repeat(reps, 1, 1)
            kwargs = {}
            if fam.hunyuan:
                kwargs = dict(
                    encoder_attention_mask=torch.ones(ctx.shape[:2], dtype=torch.long),
                    pooled_projections=pooled.repeat(reps, 1),
                    guidance=torch.full((batch,), 6000.0),
                )
            return ctx, kwargs

        (ctx, kwargs), (neg_ctx, neg_kwargs) = prompt(COND_SEED), prompt(NEG_SEED)

        def model_fn(x, sigma, expert):
            expert = only_expert or expert
            v = velocity(fam.model, x, sigma, ctx, expert, **kwargs)
            scale = cfg[0] if expert == SEMANTIC else cfg[1]
            if scale == 1.0:
                return v
            v_neg = velocity(fam.model, x, sigma, neg_ctx, expert, **neg_kwargs)
            return v_neg + scale * (v - v_neg)

        with torch.no_grad():
            x = sample_dcm(model_fn, self.noise(seed, batch), sigmas, boundary)
        return from_model_space(x, family)

    # ---- prompts
    def sampler_prompt(
        self,
        family: str,
        *,
        seed: int = 42,
        preset: str | None = None,
        boundary: float | None = None,
        batch: int = 1,
        cond_batch: int = 1,
        key: str = "out",
        record: bool = False,
        cfg: tuple[float, float] = (1.0, 1.0),
        ckpt: str | None = None,
        schedule: dict | None = None,
    ) -> dict:
        """API prompt: DCMCheckpointLoader → (record) → DCMDualExpertSampler → DCMTestCapture."""
        fam = self.families[family]
        p: dict = {
            "1": {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": ckpt or fam.official, "weight_dtype": "default"}},
            "2": {"class_type": "DCMTestConditioning", "inputs": {"seed": COND_SEED, "tokens": COND_TOKENS, "batch": cond_batch, "dim": 4096, "hunyuan": fam.hunyuan, "guidance": 6.0}},
            "3": {"class_type": "DCMTestConditioning", "inputs": {"seed": NEG_SEED, "tokens": COND_TOKENS, "batch": cond_batch, "dim": 4096, "hunyuan": fam.hunyuan, "guidance": 6.0}},
            "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": LATENT_W, "height": LATENT_H, "length": LATENT_FRAMES, "batch_size": batch}},
            "5": {"class_type": "DCMDualExpertSampler", "inputs": {
                "semantic_model": ["1", 0], "detail_model": ["1", 1], "positive": ["2", 0], "negative": ["3", 0],
                "latent_image": ["4", 0], "seed": seed, "preset": preset or fam.preset,
                "boundary_timestep": fam.boundary if boundary is None else boundary,
                "cfg_semantic": cfg[0], "cfg_detail": cfg[1],
            }},
            "6": {"class_type": "DCMTestCapture", "inputs": {"samples": ["5", 0], "key": key}},
        }
        if record:
            p["7"] = {"class_type": "DCMTestRecordCalls", "inputs": {"model": ["1", 0], "tag": "semantic"}}
            p["8"] = {"class_type": "DCMTestRecordCalls", "inputs": {"model": ["1", 1], "tag": "detail"}}
            p["5"]["inputs"]["semantic_model"] = ["7", 0]
            p["5"]["inputs"]["detail_model"] = ["8", 0]
        if schedule is not None:
            p["9"] = {"class_type": "DCMSchedule", "inputs": schedule}
            p["5"]["inputs"]["sigmas"] = ["9", 0]
        return p

    def split_chain_prompt(self, family: str, seed: int, *, stock_loaders: bool = False) -> dict:
        """:meth:`sampler_prompt` with the sampler node replaced by the stock two-sampler chain: DCM Schedule →
        DCM Timestep Split → SamplerCustomAdvanced (RandomNoise) → SamplerCustomAdvanced (DisableNoise), one
        BasicGuider per expert. The experts come from DCM Checkpoint Loader, or with ``stock_loaders`` from the
        converted files through stock UNETLoader ("1") + LoraLoaderModelOnly ("20")."""
        fam = self.families[family]
        p = self.sampler_prompt(family, seed=seed)
        del p["5"]
        semantic, detail = ["1", 0], ["1", 1]
        if stock_loaders:
            p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": fam.semantic, "weight_dtype": "default"}}
            p["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["1", 0], "lora_name": fam.detail, "strength_model": 1.0}}
            detail = ["20", 0]
        p.update({
            "11": {"class_type": "DCMSchedule", "inputs": {
                "preset": fam.preset, "semantic_steps": 3, "detail_steps": 3, "steps": 6,
                "boundary_timestep": fam.boundary, "custom_sigmas": ""}},
            "12": {"class_type": "DCMTimestepSplit", "inputs": {"sigmas": ["11", 0], "boundary_timestep": fam.boundary}},
            "13": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "14": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "15": {"class_type": "DisableNoise", "inputs": {}},
            "16": {"class_type": "BasicGuider", "inputs": {"model": semantic, "conditioning": ["2", 0]}},
            "17": {"class_type": "BasicGuider", "inputs": {"model": detail, "conditioning": ["2", 0]}},
            "18": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["14", 0], "guider": ["16", 0], "sampler": ["13", 0], "sigmas": ["12", 0], "latent_image": ["4", 0]}},
            "19": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["15", 0], "guider": ["17", 0], "sampler": ["13", 0], "sigmas": ["12", 1], "latent_image": ["18", 0]}},
        })
        p["6"]["inputs"]["samples"] = ["19", 0]
        return p

    # ---- runs
    def run(self, prompt: dict, key: str = "out", *, executor=None):
        import nodes

        store = nodes.NODE_CLASS_MAPPINGS["DCMTestCapture"].STORE
        store.pop(key, None)
        res = self.h.run(prompt, executor=executor)
        assert res.success, res.error_text()
        return store[key]["samples"]

    def calls(self) -> list:
        import nodes

        return nodes.NODE_CLASS_MAPPINGS["DCMTestRecordCalls"].CALLS

    def passes(self) -> list:
        """(tag, timestep, cond_or_uncond) per recorded model call (0 = positive pass, 1 = negative pass)."""
        import nodes

        return nodes.NODE_CLASS_MAPPINGS["DCMTestRecordCalls"].PASSES

    def style_lora(self, rank: int = 4) -> str:
        """A ComfyUI-native Wan style LoRA (models/loras/style_wan.safetensors) for stacking tests."""
        from safetensors.torch import save_file

        torch = self.torch
        path = self.h.model_dir("loras") / "style_wan.safetensors"
        if not path.exists():
            g = torch.Generator().manual_seed(99)
            sd = {}
            for stem, (out_f, in_f) in {"blocks.0.ffn.0": (256, 128), "blocks.1.self_attn.q": (128, 128)}.items():
                sd[f"diffusion_model.{stem}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.5
                sd[f"diffusion_model.{stem}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.5
                sd[f"diffusion_model.{stem}.alpha"] = torch.tensor(float(rank))
            save_file(sd, str(path))
        return path.name

    def loading(self):
        return self.h.pack_module("dcm_core.comfy_adapter.loading")

    def sampling(self):
        return self.h.pack_module("dcm_core.comfy_adapter.sampling")


@pytest.fixture(scope="session")
def dcm(comfy, tmp_path_factory):
    """The tiny DCM world (requires the pack to be loaded)."""
    if not getattr(comfy, "pack_loaded", False):
        pytest.fail("the DCM pack did not load into ComfyUI (see the log for 'Cannot import')")
    return DCMWorld(comfy, tmp_path_factory.mktemp("dcm_world"))
