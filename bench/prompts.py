"""API prompts for the benchmark variants.

Every prompt of one :class:`Graph` carries the same *source* nodes (loaders, conditioning, latent, call
timers), so in one ``PromptExecutor`` their outputs stay cached (ComfyUI drops cached outputs of nodes
that are absent from the next prompt) and a run re-executes only its sampler nodes, whose seed changes
every round. Nodes a variant does not use are simply not executed.
"""

from __future__ import annotations

from dataclasses import dataclass

COND_SEED, NEG_SEED, COND_TOKENS = 5, 6, 8
PRESET, BOUNDARY, SEMANTIC_STEPS = "wan2.1-t2v-6step", 978.0, 3  # sigmas 1, .992, .982 | .949, .905, .81, 0
DCM_SIGMAS_TEXT = "1.0, 0.992, 0.982, 0.949, 0.905, 0.81"


@dataclass(frozen=True)
class Latent:
    width: int
    height: int
    length: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, 16, (self.length - 1) // 4 + 1, self.height // 8, self.width // 8)

    @property
    def tokens(self) -> int:
        _, _, t, h, w = self.shape
        return t * (h // 2) * (w // 2)


# node ids of the two expert sources: DCM loader → timers, stock loaders → timers
DCM_SRC = ("10", "11")
STOCK_SRC = ("62", "63")


class Graph:
    """Shared source nodes + per-variant prompt builders."""

    def __init__(self, ckpt: str, weight_dtype: str, latent: Latent, *, stock_files: tuple[str, str] | None = None):
        self.latent = latent
        self.stock_files = stock_files
        b = {
            "1": {"class_type": "DCMCheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": weight_dtype}},
            "2": {"class_type": "DCMBenchConditioning", "inputs": {"seed": COND_SEED, "tokens": COND_TOKENS, "batch": 1}},
            "3": {"class_type": "DCMBenchConditioning", "inputs": {"seed": NEG_SEED, "tokens": COND_TOKENS, "batch": 1}},
            "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": latent.width, "height": latent.height, "length": latent.length, "batch_size": 1}},
            "10": {"class_type": "DCMBenchCallTimer", "inputs": {"model": ["1", 0], "tag": "semantic"}},
            "11": {"class_type": "DCMBenchCallTimer", "inputs": {"model": ["1", 1], "tag": "detail"}},
            "21": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "22": {"class_type": "DCMSchedule", "inputs": {
                "preset": PRESET, "semantic_steps": 3, "detail_steps": 3, "steps": 6, "boundary_timestep": BOUNDARY,
                "custom_sigmas": DCM_SIGMAS_TEXT}},
            "30": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["22", 0], "step": SEMANTIC_STEPS}},
            "34": {"class_type": "DisableNoise", "inputs": {}},
        }
        if stock_files is not None:  # stock loaders on the converted files: UNETLoader + LoraLoaderModelOnly
            sem, det = stock_files
            b["60"] = {"class_type": "UNETLoader", "inputs": {"unet_name": sem, "weight_dtype": weight_dtype}}
            b["61"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["60", 0], "lora_name": det, "strength_model": 1.0}}
            b["62"] = {"class_type": "DCMBenchCallTimer", "inputs": {"model": ["60", 0], "tag": "semantic"}}
            b["63"] = {"class_type": "DCMBenchCallTimer", "inputs": {"model": ["61", 0], "tag": "detail"}}
        self.base = b

    def _p(self, nodes: dict, out: list, key: str) -> dict:
        p = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.base.items()}
        p.update(nodes)
        p["99"] = {"class_type": "DCMBenchCapture", "inputs": {"samples": out, "key": key}}
        return p

    def load_only(self) -> dict:
        """Just the DCM loader (both outputs into sinks): the loading scenario."""
        return {
            "1": self.base["1"],
            "90": {"class_type": "DCMBenchModelSink", "inputs": {"model": ["1", 0], "key": "semantic"}},
            "91": {"class_type": "DCMBenchModelSink", "inputs": {"model": ["1", 1], "key": "detail"}},
        }

    def stock_load_only(self) -> dict:
        """Just the stock loaders (into sinks): loads them once before the timed runs."""
        p = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.base.items()}
        p["92"] = {"class_type": "DCMBenchModelSink", "inputs": {"model": ["60", 0], "key": "stock_semantic"}}
        p["93"] = {"class_type": "DCMBenchModelSink", "inputs": {"model": ["61", 0], "key": "stock_detail"}}
        return p

    # ---- the dual-expert variants (same experts, noise and sigmas; ksampler_advanced_chain: same NFE)
    def dcm_sampler(self, seed: int) -> dict:
        """Ours: DCMDualExpertSampler (preset sigmas, euler inside)."""
        s, d = DCM_SRC
        return self._p({"5": {"class_type": "DCMDualExpertSampler", "inputs": {
            "semantic_model": [s, 0], "detail_model": [d, 0], "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "seed": seed, "preset": PRESET, "boundary_timestep": BOUNDARY,
            "cfg_semantic": 1.0, "cfg_detail": 1.0}}}, ["5", 0], "dcm_sampler")

    def dcm_guider(self, seed: int) -> dict:
        """SamplerCustomAdvanced + DCMDualExpertGuider (DCMSchedule sigmas, euler)."""
        s, d = DCM_SRC
        return self._p({
            "20": {"class_type": "DCMDualExpertGuider", "inputs": {
                "semantic_model": [s, 0], "detail_model": [d, 0], "positive": ["2", 0], "negative": ["3", 0],
                "boundary_timestep": BOUNDARY, "cfg_semantic": 1.0, "cfg_detail": 1.0}},
            "23": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "24": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["23", 0], "guider": ["20", 0], "sampler": ["21", 0], "sigmas": ["22", 0], "latent_image": ["4", 0]}},
        }, ["24", 0], "dcm_guider")

    def stock_split_chain(self, seed: int, *, source: tuple[str, str] = DCM_SRC, key: str = "stock_split_chain") -> dict:
        """The exact stock equivalent of the two-KSamplerAdvanced chain with our sigmas: SplitSigmas at the
        boundary step + two CFGGuider (cfg 1) + two SamplerCustomAdvanced (RandomNoise, then DisableNoise
        on the first one's leftover-noise output)."""
        s, d = source
        return self._p({
            "23": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "31": {"class_type": "CFGGuider", "inputs": {"model": [s, 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 1.0}},
            "32": {"class_type": "CFGGuider", "inputs": {"model": [d, 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 1.0}},
            "33": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["23", 0], "guider": ["31", 0], "sampler": ["21", 0], "sigmas": ["30", 0], "latent_image": ["4", 0]}},
            "35": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["34", 0], "guider": ["32", 0], "sampler": ["21", 0], "sigmas": ["30", 1], "latent_image": ["33", 0]}},
        }, ["35", 0], key)

    def stock_loaders_chain(self, seed: int) -> dict:
        """Stock everything: UNETLoader(semantic file) + LoraLoaderModelOnly(detail file) + the split chain."""
        return self.stock_split_chain(seed, source=STOCK_SRC, key="stock_loaders_chain")

    def ksampler_advanced_chain(self, seed: int) -> dict:
        """Two stock KSamplerAdvanced (euler, scheduler 'simple', 6 steps, 0→3 with leftover noise, 3→end).

        KSamplerAdvanced only takes a scheduler name, so its sigmas are the 'simple' schedule at the model's
        shift, not DCM's list: same experts, noise, NFE and shapes, other sigma values (timing only)."""
        s, d = DCM_SRC
        common = {"noise_seed": seed, "steps": 6, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                  "positive": ["2", 0], "negative": ["3", 0]}
        return self._p({
            "40": {"class_type": "KSamplerAdvanced", "inputs": {
                **common, "model": [s, 0], "add_noise": "enable", "latent_image": ["4", 0],
                "start_at_step": 0, "end_at_step": SEMANTIC_STEPS, "return_with_leftover_noise": "enable"}},
            "41": {"class_type": "KSamplerAdvanced", "inputs": {
                **common, "model": [d, 0], "add_noise": "disable", "latent_image": ["40", 0],
                "start_at_step": SEMANTIC_STEPS, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        }, ["41", 0], "ksampler_advanced_chain")

    def standard_wan(self, seed: int, *, steps: int = 50, cfg: float = 5.0, sampler: str = "euler",
                     end_at_step: int | None = None) -> dict:
        """The base (semantic) model sampled the standard Wan way: ``steps`` steps, CFG ``cfg`` (cond and
        uncond batched by ComfyUI), scheduler 'simple' at the model's shift. ``end_at_step`` < ``steps`` runs
        only the first steps of that schedule, for a measured per-step projection."""
        s, _ = DCM_SRC
        return self._p({"50": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": [s, 0], "add_noise": "enable", "noise_seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler, "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": steps if end_at_step is None else end_at_step,
            "return_with_leftover_noise": "disable"}}}, ["50", 0], "standard_wan")


DUAL_VARIANTS = ("dcm_sampler", "dcm_guider", "stock_split_chain", "ksampler_advanced_chain")
