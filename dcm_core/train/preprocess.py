"""``python -m dcm_core preprocess``: videos + captions → the latent dataset the trainer reads.

::

    python -m dcm_core preprocess --model /models/Wan2.1-T2V-1.3B-Diffusers --videos clips/ \\
        --captions captions.json --out data/latents [--frames 81 --height 480 --width 832]

For every (video, caption) pair: decode the video with PyAV, pick ``--frames`` (4k+1) frames
with the official rule (uniform stride ``N // frames``), resize to cover ``height×width`` and
center-crop, encode with the model folder's VAE (raw latent, un-normalised, as FastVideo
stores it), and encode the caption with its text encoder:

* Wan: UMT5 ``last_hidden_state``, 512 tokens, zeroed after the true length, + mask;
* HunyuanVideo: Llava-Llama with diffusers' prompt template (hidden state of the 3rd-last
  layer, template tokens cropped, 256 tokens) + the CLIP-L pooled vector zero-padded to 4096
  as token 0 → ``[257, 4096]`` + mask ``[256]`` (FastVideo ``hunyuan_hf`` layout).

The embedding of ``""`` is written to ``uncond/`` (the caption-dropout / CFG unconditional).
Everything is safetensors; each file is written atomically; unreadable or too-short videos are
skipped and listed (``skipped.json``). Re-running continues: items already on disk are kept.

Image-to-video bases (read from the model folder's transformer config): Wan I2V (36 input channels) also gets the
VAE latent of the clip's first frame followed by black frames (``image_latent/``, the conditioning diffusers'
``WanImageToVideoPipeline`` builds, encoded with the distribution's mode as it does) and, when the transformer has
an image embedder (Wan2.1 I2V), the CLIP features of that frame (``clip_feature/``: ``image_encoder/`` penultimate
hidden states after ``image_processor/``); Wan2.2 TI2V-5B gets the latent of the first frame alone (its clean first
latent frame; ``--no-image`` trains it text-to-video). The VAE's latent format (channels, statistics, compression)
is written to ``latent_format.json`` and sets the size rule: height / width multiples of 2 × the VAE's spatial
factor (Wan2.1 16, Wan2.2 TI2V-5B 32).

Deviation from the official Wan dataset (§7.2, §9.1 #11): the latent is the posterior MEAN by
default (deterministic); ``--sample-posterior`` reproduces the official posterior sample.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DCMConfigError, DCMFileNotFoundError
from ..schedule import FAMILY_HUNYUAN, FAMILY_WAN
from .data import (
    CLIP_FEATURE_DIR,
    DATA_JSON,
    EMBED_DIR,
    IMAGE_LATENT_DIR,
    LATENT_DIR,
    LATENT_FORMAT_JSON,
    MASK_DIR,
    write_item,
    write_json_atomic,
    write_uncond,
)
from .models import DTYPES
from .video_io import VideoReadError, largest_4k1, read_frames, resize_cover_crop, select_frames

log = logging.getLogger("DCM.train")

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
DEFAULT_TEXT_TOKENS = {FAMILY_WAN: 512, FAMILY_HUNYUAN: 256}
CLIP_TOKENS = 77
HY_HIDDEN_LAYERS_TO_SKIP = 2
# ---------------------------------------------------------------------------- captions


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """``(video, caption)`` pairs from a captions file.

    Accepted: JSON ``{"clip.mp4": "caption", ...}``; JSON / JSONL list of objects with a video key
    (``video``, ``path``, ``file``, ``name``) and a caption key (``caption``, ``text``, ``prompt``;
    ``text`` + ``caption`` are joined with a space, as the official Wan dataset does); CSV with a
    header naming those columns; TSV / TXT lines ``video<TAB>caption``.
    """
    p = Path(path)
    if not p.is_file():
        raise DCMFileNotFoundError(f"--captions {p} does not exist.")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()

    def from_obj(o: Any, i: int) -> tuple[str, str]:
        if not isinstance(o, dict):
            raise DCMConfigError(f"{p}: entry #{i} is not an object with a video and a caption.")
        vid = next((o[k] for k in ("video", "path", "file", "name", "video_path") if k in o), None)
        parts = [str(o[k]) for k in ("text", "caption", "prompt") if o.get(k)]
        if vid is None or not parts:
            raise DCMConfigError(f"{p}: entry #{i} needs a 'video' (or path/file/name) and a 'caption' (or text/prompt).")
        return str(vid), " ".join(parts)

    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            out = []
            for i, (k, v) in enumerate(data.items()):
                out.append((str(k), str(v)) if isinstance(v, str) else from_obj({"video": k, **v}, i))
            return out
        return [from_obj(o, i) for i, o in enumerate(data)]
    if suffix == ".jsonl":
        return [from_obj(json.loads(line), i) for i, line in enumerate(text.splitlines()) if line.strip()]
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        return [from_obj(r, i) for i, r in enumerate(rows)]
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise DCMConfigError(f"{p}: line {i + 1} is not 'video<TAB>caption'. Use TSV, CSV, JSON or JSONL.")
        vid, cap = line.split("\t", 1)
        out.append((vid.strip(), cap.strip()))
    return out


def _safe_name(video: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(video).stem).strip("._") or "clip"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


# ---------------------------------------------------------------------------- encoders


def _latent_format(model_dir: Path, family: str):
    """The VAE's latent format from ``vae/config.json`` (Wan2.1 / HunyuanVideo defaults when the folder has none)."""
    from ..latents import LatentFormat
    from .models import _read_json

    for d in (model_dir / "vae", model_dir):
        if (d / "config.json").is_file() and "Autoencoder" in str(_read_json(d / "config.json").get("_class_name", "")):
            return LatentFormat.from_vae_config(_read_json(d / "config.json"), family, str(d / "config.json"))
    return LatentFormat.default(family)


def detect_family(model_dir: Path) -> str:
    """``wan`` / ``hunyuan_video`` from model_index.json or the VAE config."""
    for cfg, key in ((model_dir / "model_index.json", "_class_name"), (model_dir / "vae" / "config.json", "_class_name")):
        if cfg.is_file():
            name = str(json.loads(cfg.read_text()).get(key, ""))
            if "HunyuanVideo" in name:
                return FAMILY_HUNYUAN
            if "Wan" in name:
                return FAMILY_WAN
    raise DCMConfigError(
        f"cannot tell the model family of {model_dir} (no model_index.json / vae/config.json naming Wan or "
        f"HunyuanVideo). Pass --family wan or --family hunyuan_video."
    )


class TextEncoder:
    """The family's text encoding, producing dataset-format ``(embed, mask)`` per caption."""

    def __init__(self, model_dir: Path, family: str, device: torch.device, dtype: torch.dtype, max_tokens: int) -> None:
        from transformers import AutoTokenizer

        self.family, self.device, self.max_tokens = family, device, max_tokens
        if family == FAMILY_WAN:
            from transformers import UMT5EncoderModel

            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
            self.encoder = UMT5EncoderModel.from_pretrained(str(model_dir / "text_encoder"), torch_dtype=dtype).to(device).eval()
        else:
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
            from transformers import AutoModel, CLIPTextModel

            for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
                if not (model_dir / sub).is_dir():
                    raise DCMFileNotFoundError(f"{model_dir} lacks {sub}/; a HunyuanVideo diffusers folder has all four text parts.")
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
            self.encoder = AutoModel.from_pretrained(str(model_dir / "text_encoder"), torch_dtype=dtype).to(device).eval()
            self.tokenizer_2 = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer_2"))
            self.encoder_2 = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder_2"), torch_dtype=dtype).to(device).eval()
            self.template = DEFAULT_PROMPT_TEMPLATE["template"]
            # template tokens before the prompt: diffusers' fixed 95 for the real Llava-Llama tokenizer (128k
            # vocabulary); for any other tokenizer counted the way diffusers does without a fixed value
            if len(self.tokenizer) >= 128000:
                self.crop_start = int(DEFAULT_PROMPT_TEMPLATE["crop_start"])
            else:
                self.crop_start = len(self.tokenizer(self.template, add_special_tokens=True)["input_ids"]) - 2

    @torch.no_grad()
    def __call__(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.family == FAMILY_WAN:
            tok = self.tokenizer(
                [caption], padding="max_length", max_length=self.max_tokens, truncation=True,
                add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
            )
            ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
            hs = self.encoder(ids, attention_mask=mask).last_hidden_state[0].float()
            n = int(mask.sum())
            hs[n:] = 0  # official: zero-padded after the true length
            return hs.cpu(), mask[0].bool().cpu()
        total = self.max_tokens + self.crop_start
        tok = self.tokenizer(
            [self.template.format(caption)], padding="max_length", max_length=total, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        out = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hs = out.hidden_states[-(HY_HIDDEN_LAYERS_TO_SKIP + 1)][0, self.crop_start :].float()
        mask = mask[0, self.crop_start :].bool()
        tok2 = self.tokenizer_2(
            [caption], padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt"
        )
        pooled = self.encoder_2(tok2.input_ids.to(self.device), output_hidden_states=False).pooler_output[0].float()
        token0 = torch.zeros(1, hs.shape[-1], dtype=hs.dtype, device=hs.device)
        token0[0, : pooled.shape[-1]] = pooled
        return torch.cat([token0, hs], dim=0).cpu(), mask.cpu()


def image_plan(model_dir: Path, family: str) -> tuple[str, bool]:
    """``(image mode, needs CLIP features)`` of a model folder, from its transformer config (no weights read)."""
    from ..families import TASK_TI2V
    from .models import IMAGE_CONCAT, IMAGE_FIRST_FRAME, IMAGE_NONE, _read_json, base_for, two_transformer_boundary

    cfg_path = model_dir / "transformer" / "config.json"
    if family != FAMILY_WAN or not cfg_path.is_file():
        return IMAGE_NONE, False
    c = _read_json(cfg_path)
    cin, cout = int(c.get("in_channels", 16)), int(c.get("out_channels") or c.get("in_channels", 16))
    embedder = c.get("image_dim") is not None
    if cin == 2 * cout + 4:
        return IMAGE_CONCAT, embedder
    two = two_transformer_boundary(model_dir) is not None
    base = base_for(family, cin, cout, image_embedder=embedder, two_transformers=two)
    if base is not None and base.task == TASK_TI2V:
        return IMAGE_FIRST_FRAME, embedder
    return IMAGE_NONE, embedder


class ClipImageEncoder:
    """CLIP image features as diffusers' Wan I2V pipeline makes them: ``image_processor/`` then ``image_encoder/``,
    penultimate hidden states ``[N, D]`` (Wan2.1 I2V: ViT-H/14, 257 × 1280)."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        for sub in ("image_encoder", "image_processor"):
            if not (model_dir / sub).is_dir():
                raise DCMFileNotFoundError(
                    f"{model_dir} lacks {sub}/: its transformer has a CLIP image embedder (Wan2.1 I2V), so preprocess needs "
                    f"the image encoder and its processor from the same diffusers folder."
                )
        self.device = device
        self.processor = CLIPImageProcessor.from_pretrained(str(model_dir / "image_processor"))
        self.encoder = CLIPVisionModel.from_pretrained(str(model_dir / "image_encoder"), torch_dtype=dtype).to(device).eval()

    @torch.no_grad()
    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        """``frame`` [3, H, W] in [-1, 1] → features [N, D] (fp32, CPU)."""
        img = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        px = self.processor(images=img, return_tensors="pt").pixel_values.to(self.device, self.encoder.dtype)
        return self.encoder(pixel_values=px, output_hidden_states=True).hidden_states[-2][0].float().cpu()


# ---------------------------------------------------------------------------- main routine


@dataclass
class PreprocessReport:
    """What :func:`preprocess` did."""

    out_dir: Path
    family: str
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def preprocess(
    model_dir: str | Path,
    videos_dir: str | Path,
    captions: str | Path,
    out_dir: str | Path,
    *,
    frames: int = 81,
    height: int = 480,
    width: int = 832,
    family: str | None = None,
    device: str | None = None,
    max_text_tokens: int | None = None,
    text_dtype: str | None = None,
    latent_dtype: str = "fp32",
    embed_dtype: str = "bf16",
    sample_posterior: bool = False,
    allow_shorter: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    no_image: bool = False,
) -> PreprocessReport:
    """Encode videos + captions into the latent dataset (see the module docstring)."""
    from tqdm.auto import tqdm

    model_dir, videos_dir, out = Path(model_dir), Path(videos_dir), Path(out_dir)
    if (frames - 1) % 4 or frames < 1:
        raise DCMConfigError(f"--frames {frames} must be 4k+1 (e.g. 81, 49, 17): the VAE compresses time 4× plus one frame.")
    if not model_dir.is_dir():
        raise DCMFileNotFoundError(f"--model {model_dir} is not a folder (a local diffusers model folder is needed).")
    if not videos_dir.is_dir():
        raise DCMFileNotFoundError(f"--videos {videos_dir} is not a folder.")
    fam = family or detect_family(model_dir)
    fmt = _latent_format(model_dir, fam)
    side = 2 * fmt.spatial  # the VAE's spatial factor × the transformer's 2×2 patch
    if height % side or width % side:
        raise DCMConfigError(
            f"--height {height} / --width {width} must be multiples of {side} for this model (its VAE compresses "
            f"{fmt.spatial}× spatially, the transformer patches 2×; Wan2.1 16, Wan2.2 TI2V-5B 32)."
        )
    img_mode, needs_clip = image_plan(model_dir, fam)
    if no_image:
        from .models import IMAGE_CONCAT, IMAGE_NONE

        if img_mode == IMAGE_CONCAT:
            raise DCMConfigError(f"--no-image: {model_dir} is an image-to-video model; it cannot train without images.")
        img_mode, needs_clip = IMAGE_NONE, False
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tdt = DTYPES[text_dtype] if text_dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    pairs = read_captions(captions)
    if not pairs:
        raise DCMConfigError(f"--captions {captions} holds no (video, caption) pairs.")
    for d in (LATENT_DIR, EMBED_DIR, MASK_DIR):
        (out / d).mkdir(parents=True, exist_ok=True)

    from .video_io import load_vae

    vae = load_vae(model_dir, fam, torch.float32).to(dev)
    text = TextEncoder(model_dir, fam, dev, tdt, max_text_tokens or DEFAULT_TEXT_TOKENS[fam])
    clip_enc = ClipImageEncoder(model_dir, dev, tdt) if needs_clip else None
    report = PreprocessReport(out, fam)
    write_json_atomic(out / LATENT_FORMAT_JSON, fmt.to_dict())
    gen = torch.Generator(device=dev).manual_seed(seed)

    # the unconditional ("") embedding
    ue, um = text("")
    write_uncond(out, ue.to(DTYPES[embed_dtype]), um)

    existing = {}
    json_path = out / DATA_JSON
    if json_path.is_file() and not overwrite:
        for rec in json.loads(json_path.read_text()):
            if "video" in rec:
                existing[rec["video"]] = rec
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    bar = tqdm(pairs, desc="preprocess", unit="video", disable=not progress)
    for video, caption in bar:
        name = _safe_name(video, used)
        rec = existing.get(video)
        wanted = [(LATENT_DIR, "latent_path"), (EMBED_DIR, "prompt_embed_path"), (MASK_DIR, "prompt_attention_mask")]
        wanted += [(IMAGE_LATENT_DIR, "image_latent_path")] if img_mode != "none" else []
        wanted += [(CLIP_FEATURE_DIR, "clip_feature_path")] if clip_enc is not None else []
        if rec is not None and all(k in rec and (out / d / rec[k]).is_file() for d, k in wanted):
            records.append(rec)
            report.kept.append(video)
            continue
        vpath = Path(video) if Path(video).is_absolute() else videos_dir / video
        try:
            all_frames, fps = read_frames(vpath)
        except VideoReadError as e:
            report.skipped.append({"video": video, "reason": f"unreadable ({e})"})
            log.warning("skipping %s: unreadable (%s)", video, e)
            continue
        idx = select_frames(len(all_frames), frames)
        if idx is None:
            if not allow_shorter or largest_4k1(len(all_frames)) < 1:
                report.skipped.append({"video": video, "reason": f"{len(all_frames)} frames < --frames {frames}"})
                log.warning("skipping %s: %d frames, fewer than --frames %d (use --allow-shorter)", video, len(all_frames), frames)
                continue
            idx = list(range(largest_4k1(len(all_frames))))
        clip = resize_cover_crop(all_frames[idx], height, width).unsqueeze(0).to(dev)  # 1, 3, F, H, W
        with torch.no_grad():
            dist = vae.encode(clip).latent_dist
            latent = dist.sample(generator=gen) if sample_posterior else dist.mode()
            image_latent = None
            if img_mode != "none":
                first = clip[:, :, :1]
                if img_mode == "concat":  # the first frame, then black frames (diffusers' video_condition)
                    first = torch.cat([first, first.new_zeros(first.shape[:2] + (clip.shape[2] - 1,) + first.shape[3:])], 2)
                image_latent = vae.encode(first).latent_dist.mode()[0].float().cpu()
        latent = latent[0].float().cpu()
        emb, mask = text(caption)
        feats = clip_enc(clip[0, :, 0]) if clip_enc is not None else None
        records.append(
            write_item(out, name, latent.to(DTYPES[latent_dtype]), emb.to(DTYPES[embed_dtype]), mask, caption,
                       image_latent=None if image_latent is None else image_latent.to(DTYPES[latent_dtype]),
                       clip_feature=None if feats is None else feats.to(DTYPES[embed_dtype]),
                       video=video, num_frames=len(idx), height=height, width=width, fps=fps)  # fmt: skip
        )
        report.written.append(video)
        if len(records) % 50 == 0:
            write_json_atomic(json_path, records)
    bar.close()
    if not records:
        raise DCMConfigError(
            f"no video could be encoded ({len(report.skipped)} skipped: e.g. {report.skipped[:2]}). Check --videos and --frames."
        )
    write_json_atomic(json_path, records)
    write_json_atomic(out / "skipped.json", report.skipped)
    log.info(
        "preprocess: %d encoded, %d kept from an earlier run, %d skipped -> %s", len(report.written), len(report.kept), len(report.skipped), out
    )
    return report


# ---------------------------------------------------------------------------- CLI


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preprocess",
        help="precompute latents / text embeddings for training",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", required=True, help="local diffusers model folder (vae/, text_encoder/, tokenizer/ ...)")
    p.add_argument("--videos", required=True, help="folder with the video files named in --captions")
    p.add_argument("--captions", required=True, help="captions file: JSON, JSONL, CSV or TSV (video<TAB>caption)")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--frames", type=int, default=81, help="frames per clip, 4k+1 (default 81)")
    p.add_argument("--height", type=int, default=480, help="clip height in pixels (default 480)")
    p.add_argument("--width", type=int, default=832, help="clip width in pixels (default 832)")
    p.add_argument("--family", choices=(FAMILY_WAN, FAMILY_HUNYUAN), default=None, help="model family (default: detected)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--max-text-tokens", type=int, default=None, help="text length (default Wan 512, HunyuanVideo 256)")
    p.add_argument("--text-dtype", choices=sorted(DTYPES), default=None, help="text encoder dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--latent-dtype", choices=sorted(DTYPES), default="fp32", help="stored latent dtype (default fp32)")
    p.add_argument("--embed-dtype", choices=sorted(DTYPES), default="bf16", help="stored text embedding dtype (default bf16)")
    p.add_argument("--sample-posterior", action="store_true", help="store a VAE posterior sample (official Wan) instead of the mean")
    p.add_argument("--allow-shorter", action="store_true", help="keep clips shorter than --frames (largest 4k+1 frames)")
    p.add_argument("--overwrite", action="store_true", help="re-encode items that already exist in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample-posterior")
    p.add_argument("--no-image", action="store_true",
                   help="Wan2.2 TI2V: write no first-frame image latents (the dataset then trains text-to-video)")
    p.set_defaults(_run=run)
    return p


def run(args: argparse.Namespace) -> int:
    rep = preprocess(
        args.model, args.videos, args.captions, args.out,
        frames=args.frames, height=args.height, width=args.width, family=args.family, device=args.device,
        max_text_tokens=args.max_text_tokens, text_dtype=args.text_dtype, latent_dtype=args.latent_dtype,
        embed_dtype=args.embed_dtype, sample_posterior=args.sample_posterior, allow_shorter=args.allow_shorter,
        overwrite=args.overwrite, seed=args.seed, no_image=args.no_image,
    )
    print(f"{len(rep.written)} encoded, {len(rep.kept)} kept, {len(rep.skipped)} skipped -> {rep.out_dir}")  # noqa: T201 (CLI output)
    for s in rep.skipped:
        print(f"  skipped {s['video']}: {s['reason']}")  # noqa: T201 (CLI output)
    return 0
