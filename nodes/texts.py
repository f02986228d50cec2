"""Every user-facing string of the DCM nodes: categories, display names, descriptions, tooltips.

One source of truth, so shared inputs (the boundary, the experts, the cfg values) say the same
thing on every node. Error messages live with the code that raises them (dcm_core).
"""

from __future__ import annotations

from ..dcm_core.comfy_adapter import names as N

CATEGORY_SAMPLING = "sampling/DCM"
CATEGORY_LOADERS = "loaders/DCM"

NO_STEPS_NOTE = (
    "If the boundary leaves one expert without steps, a warning is logged and every step runs on the "
    "other expert."
)

# --------------------------------------------------------------------------- shared inputs

SEMANTIC_MODEL = (
    "The semantic expert (high-noise steps: layout and motion). Connect semantic_model of DCM Checkpoint "
    "Loader, or a model loaded with Load Diffusion Model from a converted *_semantic file."
)
DETAIL_MODEL = (
    "The detail expert (low-noise steps: texture and fine detail). Connect detail_model of DCM Checkpoint "
    "Loader, or the semantic model with the detail expert applied (DCM Expert LoRA Loader or LoraLoaderModelOnly)."
)
POSITIVE = "The prompt conditioning. For HunyuanVideo the embedded guidance comes from here (default 6.0; set it with FluxGuidance)."
NEGATIVE = "The negative prompt conditioning. Only used by an expert whose cfg is above 1.0 (DCM was distilled for cfg 1.0)."
BOUNDARY = (
    "Routing threshold on the timestep t = 1000·sigma: a step with floor(t) ≤ boundary runs on the detail expert, "
    "every other step on the semantic expert. 978 for Wan2.1, 981 for HunyuanVideo (the official values). "
    "Two-model bases (Wan2.2 A14B: high-noise model as semantic_model, low-noise model as detail_model): 875 for "
    "T2V, 900 for I2V, Wan2.2's own switch points."
)
BOUNDARY_PRESET = (
    "Optional boundary preset; anything but 'manual' replaces boundary_timestep (routing and the "
    "per-expert-uniform preset both use it). Wan2.2 A14B's own switch points, ComfyUI timestep convention "
    "t = 1000·sigma: 875 for T2V, 900 for I2V (Wan2.2's boundary_ratio 0.875 / 0.900); 978 / 981 are DCM's "
    "Wan2.1 / HunyuanVideo values. Schedule rule: a step whose floor(1000·sigma) ≤ boundary runs on detail_model "
    "(the low-noise model of a Wan2.2 pair), every other step on semantic_model (the high-noise model)."
)
CFG_SEMANTIC = "Classifier-free guidance for the semantic expert. 1.0 (the DCM default) skips the negative pass and is twice as fast."
CFG_DETAIL = "Classifier-free guidance for the detail expert. 1.0 (the DCM default) skips the negative pass and is twice as fast."
PRESET = (
    "Sigma schedule. wan2.1-t2v-6step and hunyuan-t2v-4step are the official lists; per-expert-uniform spreads "
    "steps evenly inside each expert's part of the training grid; pcm-default is the PCM spacing; custom takes "
    "your own list."
)

# --------------------------------------------------------------------------- DCMCheckpointLoader

CHECKPOINT_LOADER_NAME = N.CHECKPOINT_NODE
CHECKPOINT_LOADER_DESC = (
    "Loads a DCM transformer (the official DCM_WAN / DCM_HY diffusion_pytorch_model.safetensors, Wan2.x any size "
    "or HunyuanVideo, or a converted *_semantic file with its *_detail file in models/loras) and returns both "
    "experts. They share one set of base weights: the detail expert is a clone of the semantic one carrying its "
    "LoRA (applied at forward time, never merged, so switching experts costs no re-patching) and its own "
    "embedder/head as weight patches. Every patch must load, or the node stops with the list of keys that did not."
)
CKPT_NAME = "A DCM transformer file in models/diffusion_models."
WEIGHT_DTYPE = (
    "Weight precision. default keeps ComfyUI's choice for your GPU; fp8 variants halve memory (fp8_e4m3fn_fast "
    "also uses fp8 matmuls on GPUs that support them); bf16/fp16 cast the weights."
)
SEMANTIC_OUT = "The semantic expert (use it for the high-noise steps)."
DETAIL_OUT = "The detail expert (use it for the low-noise steps). Stack style LoRAs on it with LoraLoaderModelOnly."

# --------------------------------------------------------------------------- DCMExpertLoraLoader

EXPERT_LOADER_NAME = N.EXPERT_NODE
EXPERT_LOADER_DESC = (
    "Applies a DCM detail-expert file (written by 'dcm convert' or the DCM trainer, in models/loras) to a model, "
    "checking that every patch lands. For an official combined DCM checkpoint use DCM Checkpoint Loader; for an "
    "ordinary style LoRA use LoraLoaderModelOnly."
)
EXPERT_MODEL = "The semantic expert (or the base model the detail expert was trained on)."
EXPERT_LORA_NAME = "A DCM detail-expert file in models/loras (e.g. dcm_wan2.1_t2v_1.3b_detail_expert.safetensors)."
EXPERT_STRENGTH = "How strongly the detail expert is applied. 1.0 is the trained expert; 0 returns the model unchanged."
EXPERT_OUT = "The model with the detail expert applied."

# --------------------------------------------------------------------------- DCMSchedule

SCHEDULE_NAME = N.SCHEDULE_NODE
SCHEDULE_DESC = (
    "Builds a DCM sigma list (terminal 0 included) from a preset and draws it: the sigma curve, the boundary and "
    "which expert owns each step. Feed sigmas to DCM Dual-Expert Sampler or to SamplerCustomAdvanced with DCM "
    "Dual-Expert Guider."
)
SEMANTIC_STEPS = "per-expert-uniform only: number of steps for the semantic expert."
DETAIL_STEPS = "per-expert-uniform only: number of steps for the detail expert."
STEPS = "pcm-default only: total number of steps (1-50)."
CUSTOM_SIGMAS = (
    "custom only: descending sigmas in (0, 1] separated by commas, e.g. 1.0, 0.992, 0.982, 0.949, 0.905, 0.81. "
    "The terminal 0 is appended for you."
)
SIGMAS_OUT = "The sigma list, terminal 0 included."
PLOT_OUT = "A picture of the schedule: the sigma curve, the boundary, and each step coloured by its expert."

# --------------------------------------------------------------------------- DCMTimestepSplit

SPLIT_NAME = N.SPLIT_NODE
SPLIT_DESC = (
    "Splits a sigma list at the DCM boundary into the semantic and the detail part (they share the switch sigma), "
    "for two chained SamplerCustomAdvanced nodes: the second one needs DisableNoise. A part with a single sigma "
    "has no steps; a warning is logged."
)
SPLIT_SIGMAS = "The full sigma list (terminal 0 included)."
SEMANTIC_SIGMAS_OUT = "Sigmas of the semantic expert's steps (high noise)."
DETAIL_SIGMAS_OUT = "Sigmas of the detail expert's steps (low noise), starting at the switch sigma."

# --------------------------------------------------------------------------- DCMDualExpertSampler

SAMPLER_NAME = N.SAMPLER_NODE
SAMPLER_DESC = (
    "Few-step DCM sampling: the semantic expert on the high-noise steps, the detail expert on the rest, with the "
    "official flow-Euler step, one progress bar and previews. Noise comes from the seed exactly as in KSampler. "
    + NO_STEPS_NOTE
)
SAMPLER_LATENT = (
    "The latent to fill, e.g. EmptyHunyuanLatentVideo (832×480, 81 frames for Wan2.1); for image-to-video the "
    "latent of WanImageToVideo, for Wan2.2 TI2V 5B the one of Wan22ImageToVideoLatent (its start frame stays clean)."
)
SEED = "The random seed for the starting noise (same noise as KSampler for the same seed)."
SAMPLER_PRESET = PRESET + " Ignored when sigmas is connected; custom requires it."
SAMPLER_SIGMAS = "Optional: overrides the preset with your own sigma list (e.g. from DCM Schedule)."
LATENT_OUT = "The denoised latent; decode it with VAEDecode (or VAEDecodeTiled for HunyuanVideo)."

# --------------------------------------------------------------------------- DCMDualExpertGuider

GUIDER_NAME = N.GUIDER_NODE
GUIDER_DESC = (
    "A GUIDER for the stock SamplerCustomAdvanced: splits the sigmas at the boundary and runs the semantic "
    "expert, then the detail expert, in one progress bar. Use it with KSamplerSelect (euler), RandomNoise and "
    "DCM Schedule. " + NO_STEPS_NOTE
)
GUIDER_OUT = "The dual-expert guider, for SamplerCustomAdvanced."

# --------------------------------------------------------------------------- toy world (no downloads)

CATEGORY_TOY = "sampling/DCM/toy world"
TOY_TEXT_NAME = N.TOY_TEXT_NODE
TOY_TEXT_DESC = (
    "Text encoder of the pack's built-in toy world (no download needed): turns a prompt such as "
    "'red circle moving right' into conditioning for the bundled toy DCM experts (dcm_toy_wan.safetensors). "
    "Vocabulary: colours red, green, blue, yellow, white, magenta; shapes circle, square, diamond; motions moving "
    "left/right/up/down, bouncing, growing, shrinking. An empty prompt gives the unconditional embedding."
)
TOY_PROMPT = "'<colour> <shape> <motion>', e.g. 'blue square moving up'. Leave empty for the unconditional (negative) embedding."
TOY_CONDITIONING_OUT = "Conditioning for the toy DCM experts (8 tokens × 4096, like Wan's text width)."
TOY_DECODE_NAME = N.TOY_DECODE_NODE
TOY_DECODE_DESC = (
    "Decoder of the toy world: maps a toy latent (16 channels, 2×2 pixels per latent cell, one latent frame per "
    "video frame) back to RGB frames with the world's fixed linear map. Use it instead of a VAE for the toy experts."
)
TOY_SAMPLES = "A latent sampled with the toy DCM experts (make it with EmptyHunyuanLatentVideo 96×96, length 21)."
TOY_IMAGES_OUT = "The video frames (batch × frames images), ready for Save Animated WEBP / Preview Image."
