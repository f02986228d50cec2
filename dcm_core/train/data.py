"""The precomputed latent dataset (FastVideo / DCM format, safetensors only) and its sampler.

Layout (dcm-method.md §7.1)::

    DATASET/videos2caption.json        [{"latent_path": "a.safetensors", "prompt_embed_path": "a.safetensors",
                                          "prompt_attention_mask": "a.safetensors", "length": 21,
                                          "caption": "..."}, ...]
    DATASET/latent/a.safetensors        raw VAE latent [16, T, H, W] (or [1, 16, T, H, W])
    DATASET/prompt_embed/a.safetensors  text embedding [L, 4096]  (HunyuanVideo: [1 + L, 4096], token 0 = CLIP pooled)
    DATASET/prompt_attention_mask/a.safetensors   mask [L]
    DATASET/uncond/prompt_embed.safetensors       the embedding of "" (+ uncond/prompt_attention_mask.safetensors)
    DATASET/latent_format.json          the VAE's latent format (channels, mean/std, compression; preprocess)

Image conditioning (image-to-video bases; optional item keys, written by preprocess):

    "image_latent_path": DATASET/image_latent/a.safetensors   raw VAE latent of the conditioning image: Wan I2V
                          [C, T, H, W] (the clip's first frame followed by black frames, encoded as the pipeline does);
                          Wan2.2 TI2V [C, 1, H, W] (the first frame alone)
    "clip_feature_path":  DATASET/clip_feature/a.safetensors  CLIP image features [N, D] (models with an image
                          embedder, Wan2.1 I2V: the penultimate hidden states of the image encoder)

Each safetensors file holds one tensor (any key; ``latent`` / ``prompt_embed`` /
``prompt_attention_mask`` by our preprocess). FastVideo's pickled ``.pt`` files are refused:
pickles can execute code when loaded, so they are never opened.

The sampler fixes an official defect (§9.1 #11, the order was never shuffled): a seeded
permutation per epoch, split across processes exactly like ``DistributedSampler``, with a
start offset so a resumed run continues at the very next sample.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import DCMConfigError, DCMFileNotFoundError, DCMFormatError
from ..formats.safetensors_io import atomic_output, save_state_dict

log = logging.getLogger("DCM.train")

DATA_JSON = "videos2caption.json"
LATENT_DIR = "latent"
EMBED_DIR = "prompt_embed"
MASK_DIR = "prompt_attention_mask"
UNCOND_DIR = "uncond"
IMAGE_LATENT_DIR = "image_latent"
CLIP_FEATURE_DIR = "clip_feature"
LATENT_FORMAT_JSON = "latent_format.json"


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        raise DCMFormatError(
            f"{path} is a pickled torch file. The DCM trainer reads safetensors only (loading a pickle can run "
            f"arbitrary code). Re-create the dataset with `python -m dcm_core preprocess`, or convert the files in an "
            f"environment you trust, e.g. save_file({{'latent': torch.load(p, weights_only=True)}}, p.with_suffix("
            f"'.safetensors')) and point the JSON at the new names."
        )


def load_single_tensor(path: str | Path) -> torch.Tensor:
    """The one tensor stored in a safetensors file (refuses pickles and multi-tensor files)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    _check_not_pickle(p)
    if not p.is_file():
        raise DCMFileNotFoundError(f"dataset file {p} does not exist; check videos2caption.json and the dataset folder.")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise DCMFormatError(f"{p} is a pickled torch file renamed to .safetensors; it is not read (see preprocess).")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            if len(keys) != 1:
                raise DCMFormatError(f"{p} holds {len(keys)} tensors {keys[:5]}; a dataset file must hold exactly one.")
            return f.get_tensor(keys[0])
    except SafetensorError as e:
        raise DCMFormatError(f"{p} is not a readable safetensors file ({e}). Re-run preprocess for this item.") from None


@dataclass
class LatentItem:
    """One dataset item, with tensors on the CPU."""

    latent: torch.Tensor  # raw VAE latent [C, T, H, W]
    prompt_embed: torch.Tensor  # [L(+1), D]
    prompt_mask: torch.Tensor  # [L] bool
    caption: str
    index: int
    image_latent: torch.Tensor | None = None  # raw VAE latent of the conditioning image [C, T or 1, H, W]
    clip_feature: torch.Tensor | None = None  # CLIP image features [N, D]


class LatentDataset(Dataset):
    """FastVideo-style precomputed latent dataset (safetensors).

    Args:
        path: the dataset folder (with ``videos2caption.json``) or the JSON file itself.
        num_latent_t: keep only the last N latent frames (0: all), as FastVideo's
            ``latents[:, -num_latent_t:]``.
    """

    def __init__(self, path: str | Path, num_latent_t: int = 0) -> None:
        p = Path(path)
        json_path = p / DATA_JSON if p.is_dir() else p
        if not json_path.is_file():
            raise DCMFileNotFoundError(
                f"no {DATA_JSON} at {p}. data.path must be a dataset folder written by `python -m dcm_core preprocess` "
                f"(or a FastVideo-style folder converted to safetensors)."
            )
        self.root = json_path.parent
        try:
            items = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DCMFormatError(f"{json_path} is not valid JSON: {e}") from None
        if not isinstance(items, list) or not items:
            raise DCMFormatError(f"{json_path} must be a non-empty JSON list of items.")
        for i, it in enumerate(items):
            for key in ("latent_path", "prompt_embed_path", "prompt_attention_mask"):
                if not isinstance(it, dict) or key not in it:
                    raise DCMFormatError(f"{json_path}: item #{i} lacks '{key}'.")
                _check_not_pickle(Path(it[key]))
        self.items: list[dict[str, Any]] = items
        self.num_latent_t = int(num_latent_t)
        n_img = sum("image_latent_path" in it for it in items)
        if n_img not in (0, len(items)):
            raise DCMFormatError(
                f"{json_path}: {n_img} of {len(items)} items have an image_latent_path; an image-conditioned dataset "
                f"needs it on every item. Re-run preprocess with --overwrite."
            )
        self.has_images = n_img > 0
        self.has_clip = self.has_images and all("clip_feature_path" in it for it in items)
        if self.has_images and self.num_latent_t:
            raise DCMConfigError(
                f"data.num_latent_t={self.num_latent_t} keeps the last latent frames, but {json_path} is image-conditioned "
                f"(its first frame is the conditioning image). Set data.num_latent_t = 0 and preprocess at the wanted "
                f"--frames instead."
            )

    def latent_format(self) -> dict | None:
        """The VAE latent format preprocess stored (``latent_format.json``), or None for older datasets."""
        p = self.root / LATENT_FORMAT_JSON
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DCMFormatError(f"{p} is not valid JSON: {e}. Re-run preprocess.") from None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LatentItem:
        it = self.items[index]
        latent = load_single_tensor(self.root / LATENT_DIR / it["latent_path"]).float()
        if latent.ndim == 5 and latent.shape[0] == 1:
            latent = latent[0]
        if latent.ndim != 4:
            raise DCMFormatError(
                f"latent {it['latent_path']} has shape {tuple(latent.shape)}; expected [C, T, H, W] (a raw VAE latent)."
            )
        if self.num_latent_t:
            if latent.shape[1] < self.num_latent_t:
                raise DCMFormatError(
                    f"latent {it['latent_path']} has {latent.shape[1]} latent frames, fewer than "
                    f"data.num_latent_t={self.num_latent_t}. Lower num_latent_t or re-encode longer clips."
                )
            latent = latent[:, -self.num_latent_t :]
        embed = load_single_tensor(self.root / EMBED_DIR / it["prompt_embed_path"])
        if embed.ndim == 3 and embed.shape[0] == 1:
            embed = embed[0]
        mask = load_single_tensor(self.root / MASK_DIR / it["prompt_attention_mask"])
        if mask.ndim == 2 and mask.shape[0] == 1:
            mask = mask[0]
        image = clip = None
        if self.has_images:
            image = load_single_tensor(self.root / IMAGE_LATENT_DIR / it["image_latent_path"]).float()
            if image.ndim == 5 and image.shape[0] == 1:
                image = image[0]
            if (image.ndim != 4 or image.shape[0] != latent.shape[0] or image.shape[2:] != latent.shape[2:]
                    or image.shape[1] not in (1, latent.shape[1])):  # fmt: skip
                raise DCMFormatError(
                    f"image latent {it['image_latent_path']} has shape {tuple(image.shape)}; the clip latent is "
                    f"{tuple(latent.shape)} (same channels and size expected). Re-run preprocess for this item."
                )
        if self.has_clip:
            clip = load_single_tensor(self.root / CLIP_FEATURE_DIR / it["clip_feature_path"])
            if clip.ndim == 3 and clip.shape[0] == 1:
                clip = clip[0]
        return LatentItem(latent, embed, mask.bool(), str(it.get("caption", "")), int(index), image, clip)


def load_uncond(dataset_root: str | Path | None, explicit: str = "") -> tuple[torch.Tensor, torch.Tensor] | None:
    """The embedding of ``""`` (and its mask): ``explicit`` file, else ``<dataset>/uncond/``; None if absent."""
    from safetensors.torch import load_file

    if explicit:
        p = Path(explicit)
        _check_not_pickle(p)
        if not p.is_file():
            raise DCMFileNotFoundError(f"data.uncond_embed={explicit!r} does not exist.")
        sd = load_file(str(p))
        if "prompt_embed" not in sd:
            raise DCMFormatError(f"{p} must hold a 'prompt_embed' tensor (and optionally 'prompt_attention_mask').")
        emb = sd["prompt_embed"]
        mask = sd.get("prompt_attention_mask")
    else:
        if dataset_root is None:
            return None
        d = Path(dataset_root) / UNCOND_DIR
        ep, mp = d / "prompt_embed.safetensors", d / "prompt_attention_mask.safetensors"
        if not ep.is_file():
            return None
        emb = load_single_tensor(ep)
        mask = load_single_tensor(mp) if mp.is_file() else None
    if emb.ndim == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if mask is None:
        mask = torch.zeros(emb.shape[0], dtype=torch.bool)
        mask[: 1] = True
    if mask.ndim == 2 and mask.shape[0] == 1:
        mask = mask[0]
    return emb, mask.bool()


@dataclass
class Batch:
    """A collated batch: raw latents [B, C, T, H, W], text [B, L, D], mask [B, L] (+ image conditioning)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_masks: torch.Tensor
    indices: torch.Tensor
    captions: list[str]
    image_latents: torch.Tensor | None = None  # raw [B, C, T or 1, H, W]
    clip_features: torch.Tensor | None = None  # [B, N, D]

    def to(self, device: torch.device | str) -> "Batch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            self.latents.to(device),
            self.prompt_embeds.to(device),
            self.prompt_masks.to(device),
            self.indices,
            self.captions,
            mv(self.image_latents),
            mv(self.clip_features),
        )

    def with_text(self, prompt_embeds: torch.Tensor, prompt_masks: torch.Tensor, captions: list[str] | None = None) -> "Batch":
        """The same batch (latents, image conditioning) with other text: caption dropout and the CFG unconditional
        drop the text and keep the image."""
        import dataclasses

        return dataclasses.replace(
            self, prompt_embeds=prompt_embeds, prompt_masks=prompt_masks,
            captions=self.captions if captions is None else captions,
        )  # fmt: skip


def collate(items: Sequence[LatentItem]) -> Batch:
    """Stack items; text is zero-padded to the longest sequence (mask False on padding).

    Latents must share one shape inside a batch (the official collate pads them, which feeds
    padding to the model as content); mixed shapes raise with a suggestion.
    """
    shapes = {tuple(it.latent.shape) for it in items}
    if len(shapes) > 1:
        raise DCMConfigError(
            f"a batch mixes latent shapes {sorted(shapes)}. Use data.batch_size=1, set data.num_latent_t, or "
            f"preprocess every clip at one --frames/--height/--width."
        )
    lat = torch.stack([it.latent for it in items])
    n = max(it.prompt_embed.shape[0] for it in items)
    m = max(it.prompt_mask.shape[0] for it in items)
    d = items[0].prompt_embed.shape[-1]
    emb = torch.zeros(len(items), n, d, dtype=items[0].prompt_embed.dtype)
    mask = torch.zeros(len(items), m, dtype=torch.bool)
    for i, it in enumerate(items):
        emb[i, : it.prompt_embed.shape[0]] = it.prompt_embed
        mask[i, : it.prompt_mask.shape[0]] = it.prompt_mask
    image = clip = None
    if items[0].image_latent is not None:
        image = torch.stack([it.image_latent for it in items])
    if items[0].clip_feature is not None:
        clip = torch.stack([it.clip_feature for it in items])
    return Batch(lat, emb, mask, torch.tensor([it.index for it in items]), [it.caption for it in items], image, clip)


def apply_caption_dropout(
    batch: Batch,
    uncond: tuple[torch.Tensor, torch.Tensor] | None,
    p: float,
    generator: torch.Generator | None,
    u: torch.Tensor | None = None,
) -> tuple[Batch, torch.Tensor]:
    """Replace each caption by the ``""`` embedding with probability ``p`` (official Wan: 10 %).

    The draw uses the trainer's generator (one uniform per sample, always drawn so the RNG
    stream does not depend on ``p``), or the given uniforms ``u`` [B] (the trainer draws one per
    sample from that sample's own generator). Returns the new batch and the boolean drop vector.
    """
    b = batch.prompt_embeds.shape[0]
    if u is None:
        u = torch.rand(b, generator=generator)
    drop = u < p
    if not bool(drop.any()):
        return batch, drop
    if uncond is None:
        raise DCMConfigError("caption dropout needs the embedding of \"\" (data.uncond_embed or <dataset>/uncond/).")
    emb, mask = batch.prompt_embeds.clone(), batch.prompt_masks.clone()
    ue, um = pad_uncond(uncond, emb.shape[1], mask.shape[1])
    for i in torch.nonzero(drop).flatten().tolist():
        emb[i] = ue.to(emb.dtype).to(emb.device)
        mask[i] = um.to(mask.device)
    return batch.with_text(emb, mask), drop


def pad_uncond(uncond: tuple[torch.Tensor, torch.Tensor], length: int, mask_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad / crop the ``""`` embedding to a batch's text length."""
    e, m = uncond
    out_e = torch.zeros(length, e.shape[-1], dtype=e.dtype)
    n = min(length, e.shape[0])
    out_e[:n] = e[:n]
    out_m = torch.zeros(mask_length, dtype=torch.bool)
    k = min(mask_length, m.shape[0])
    out_m[:k] = m[:k]
    return out_e, out_m


class ResumableDistributedSampler(Sampler[int]):
    """Seeded per-epoch shuffle, split across processes like ``DistributedSampler``, resumable.

    The permutation of epoch ``e`` is ``randperm(n, generator=Generator().manual_seed(seed + e))``
    (identical on every process); the list is padded (or truncated with ``drop_last``) to a
    multiple of ``num_replicas`` and process ``rank`` takes ``perm[rank::num_replicas]``.
    :meth:`set_start` skips the first ``start`` samples of this process in the current epoch,
    so a resumed run sees exactly the samples it has not seen yet.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if dataset_len < 1:
            raise DCMConfigError("the dataset is empty.")
        if not 0 <= rank < num_replicas:
            raise DCMConfigError(f"rank {rank} is outside [0, {num_replicas}).")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        if drop_last and dataset_len % num_replicas:
            self.num_samples = dataset_len // num_replicas
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)
        if self.num_samples == 0:
            raise DCMConfigError(f"{dataset_len} samples cannot be split over {num_replicas} processes with drop_last.")
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            idx = list(range(self.dataset_len))
        if self.drop_last:
            idx = idx[: self.total_size]
        else:
            pad = self.total_size - len(idx)
            while pad > 0:
                idx += idx[:pad]
                pad = self.total_size - len(idx)
        return idx[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class DataStream:
    """Endless batches over epochs with an exact, saveable position.

    ``state()`` returns ``{"epoch", "batch_in_epoch"}``; :meth:`load_state` makes the next
    batch the one that would have followed. Incomplete trailing batches are dropped (as the
    official ``drop_last=True``).
    """

    def __init__(
        self,
        dataset: LatentDataset,
        *,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = ResumableDistributedSampler(
            len(dataset), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
        self.batches_per_epoch = self.sampler.num_samples // batch_size
        if self.batches_per_epoch < 1:
            raise DCMConfigError(
                f"{len(dataset)} samples over {num_replicas} process(es) give fewer than one batch of "
                f"data.batch_size={batch_size}. Add samples or lower the batch size."
            )
        self.num_workers = num_workers
        self.epoch = 0
        self.batch_in_epoch = 0
        self._it: Iterator[Batch] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._it = None

    def _open(self) -> Iterator[Batch]:
        from torch.utils.data import DataLoader

        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batch_in_epoch * self.batch_size)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=True,
            # a private generator: opening an iterator must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.sampler.seed + self.epoch),
        )
        return iter(loader)

    def next(self) -> Batch:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._it = None
        if self._it is None:
            self._it = self._open()
        batch = next(self._it)
        self.batch_in_epoch += 1
        return batch


def write_item(
    root: str | Path,
    name: str,
    latent: torch.Tensor,
    prompt_embed: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    caption: str = "",
    image_latent: torch.Tensor | None = None,
    clip_feature: torch.Tensor | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write one sample's files (atomically) and return its ``videos2caption.json`` record."""
    root, fname = Path(root), f"{name}.safetensors"
    save_state_dict({"latent": latent.contiguous()}, root / LATENT_DIR / fname)
    save_state_dict({"prompt_embed": prompt_embed.contiguous()}, root / EMBED_DIR / fname)
    save_state_dict({"prompt_attention_mask": prompt_attention_mask.contiguous()}, root / MASK_DIR / fname)
    rec: dict[str, Any] = {
        "latent_path": fname,
        "prompt_embed_path": fname,
        "prompt_attention_mask": fname,
        "length": int(latent.shape[-3]),
        "caption": caption,
    }
    if image_latent is not None:
        save_state_dict({"image_latent": image_latent.contiguous()}, root / IMAGE_LATENT_DIR / fname)
        rec["image_latent_path"] = fname
    if clip_feature is not None:
        save_state_dict({"clip_feature": clip_feature.contiguous()}, root / CLIP_FEATURE_DIR / fname)
        rec["clip_feature_path"] = fname
    return {**rec, **extra}


def write_latent_dataset(
    root: str | Path,
    items: Sequence[dict[str, Any]],
    *,
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Write a whole dataset in the format above (the toy build, benchmarks and tests; preprocess writes item by item).

    Each item: ``{"name", "latent", "prompt_embed", "prompt_attention_mask", "caption", ...extra}``.
    Every file is written atomically (temporary name, fsync, rename); the JSON last.
    """
    root = Path(root)
    records = [write_item(root, **{"caption": "", **it}) for it in items]
    if uncond is not None:
        write_uncond(root, *uncond)
    write_json_atomic(root / DATA_JSON, records)
    return root


def write_uncond(root: str | Path, embed: torch.Tensor, mask: torch.Tensor) -> None:
    d = Path(root) / UNCOND_DIR
    save_state_dict({"prompt_embed": embed.contiguous()}, d / "prompt_embed.safetensors")
    save_state_dict({"prompt_attention_mask": mask.contiguous()}, d / "prompt_attention_mask.safetensors")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_output(path, "w") as fh:
        json.dump(obj, fh, indent=1)
