"""Video reading / writing with PyAV and the frame transforms of the official Wan dataset (§7.2).

* :func:`read_frames` decodes a video to RGB uint8 frames (``[N, H, W, 3]``);
* :func:`select_frames` picks ``frames`` of them with the official rule (all when there are
  exactly enough, else a uniform stride ``N // frames``, truncated to ``frames``);
* :func:`resize_cover_crop` resizes (bicubic, antialiased) so the clip covers ``height×width``
  and center-crops it, then scales to [-1, 1];
* :func:`write_mp4` / :func:`decode_latents_to_mp4` write validation videos.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("DCM.train")


class VideoReadError(Exception):
    """A video file cannot be opened or decoded (preprocess skips and reports it)."""


def read_frames(path: str | Path) -> tuple[np.ndarray, float]:
    """All frames of the first video stream as ``[N, H, W, 3]`` uint8 RGB, and the frame rate."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError("no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except VideoReadError:
        raise
    except Exception as e:  # av raises many error types (InvalidDataError, FileNotFoundError, ...)
        raise VideoReadError(f"{type(e).__name__}: {e}") from None
    if not frames:
        raise VideoReadError("no decodable frames")
    return np.stack(frames), fps


def select_frames(num_available: int, frames: int) -> list[int] | None:
    """Indices of ``frames`` frames (official rule), or None when the clip is too short."""
    if num_available < frames:
        return None
    stride = max(1, num_available // frames)
    return list(range(0, stride * frames, stride))[:frames]


def largest_4k1(n: int) -> int:
    """The largest ``4k + 1 ≤ n`` (the frame counts the Wan / HunyuanVideo VAEs accept)."""
    return ((n - 1) // 4) * 4 + 1 if n >= 1 else 0


def resize_cover_crop(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 → ``[3, N, height, width]`` float in [-1, 1] (cover resize + center crop)."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()  # N, 3, H, W
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    x = (x / 127.5 - 1.0).clamp(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 16.0) -> Path:
    """Write ``[N, H, W, 3]`` uint8 frames as an mp4 (libx264 when available, else mpeg4)."""
    import av

    path = Path(path)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    n, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: stream.height, : stream.width]), format="rgb24")
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def load_vae(model_dir: str | Path, family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The VAE of a diffusers model folder (``vae/``) or a VAE folder itself."""
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan

    from .models import check_vae_config

    p = Path(model_dir)
    d = p / "vae" if (p / "vae" / "config.json").is_file() else p
    if (d / "config.json").is_file():
        check_vae_config(d / "config.json")
    cls = AutoencoderKLWan if family == "wan" else AutoencoderKLHunyuanVideo
    return cls.from_pretrained(str(d), torch_dtype=dtype).eval()


@torch.no_grad()
def decode_latents_to_mp4(
    vae_dir: str | Path, family: str, raw_latents: torch.Tensor, out_stem: str | Path, *, fps: int = 16
) -> list[Path]:
    """Decode raw (un-normalised) latents ``[B, 16, T, H, W]`` and write ``<out_stem>-<i>.mp4``."""
    vae = load_vae(vae_dir, family)
    paths = []
    for i in range(raw_latents.shape[0]):
        video = vae.decode(raw_latents[i : i + 1].to(vae.dtype), return_dict=False)[0]  # 1, 3, F, H, W in [-1, 1]
        frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        paths.append(write_mp4(f"{out_stem}-{i}.mp4", frames, fps))
    return paths


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[3, N, H, W]`` in [-1, 1] → ``[N, H, W, 3]`` uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def synthetic_clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A small moving-gradient test clip ``[frames, height, width, 3]`` (tests, dry runs)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = g.uniform(0, 255, size=3)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        for c in range(3):
            out[t, :, :, c] = ((xx * (c + 1) + yy * (3 - c) + t * 7 + base[c]) % 256).astype(np.uint8)
    return out
