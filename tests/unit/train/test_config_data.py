"""Config parsing / overrides / errors and the latent dataset + resumable sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcm_core.errors import DCMConfigError, DCMFileNotFoundError, DCMFormatError
from dcm_core.train.config import TrainConfig, describe_fields, from_dict, load_config
from dcm_core.train.data import (
    Batch,
    DataStream,
    LatentDataset,
    ResumableDistributedSampler,
    apply_caption_dropout,
    collate,
    load_uncond,
)

CONFIGS = Path(__file__).resolve().parents[3] / "dcm_core" / "train" / "configs"


def test_every_field_has_help_and_official_defaults():
    import dataclasses

    cfg = TrainConfig()
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        fields = dataclasses.fields(sub) if dataclasses.is_dataclass(sub) else [f]
        for sf in fields:
            assert sf.metadata.get("help"), f"{f.name}.{sf.name} has no help text"
    r = load_config(None, ["model.family=wan"], stage="semantic").resolved()
    assert (r.optim.lr, r.optim.weight_decay, r.optim.max_grad_norm, r.loss.huber_c) == (1e-6, 1e-3, 1.0, 0.001)
    assert (r.schedule.k0, r.guidance.cfg_scale, r.loss.fm_weight, r.data.caption_dropout) == (35, 5.0, 10.0, 0.1)
    h = load_config(None, ["model.family=hunyuan_video"], stage="detail").resolved()
    assert (h.optim.lr, h.schedule.k0, h.guidance.cfg_scale, h.loss.fm_weight) == (5e-6, 38, 0.0, 1.0)
    assert (h.disc.lr, h.disc.betas, h.loss.adv_weight, h.loss.gan_g_weight) == (1e-5, [0.0, 0.999], 0.1, 5.0)
    assert h.model.lora_rank == 128 and h.model.lora_alpha == 256
    assert "optim.lr" in describe_fields()


def test_overrides_are_typed_and_errors_name_the_key():
    cfg = load_config(None, ["optim.lr=2e-6", "disc.betas=[0.0, 0.99]", "data.batch_size=4", "model.semantic_lora=true"])
    assert cfg.optim.lr == 2e-6 and cfg.disc.betas == [0.0, 0.99] and cfg.data.batch_size == 4 and cfg.model.semantic_lora
    cases = {
        "optim.lr=fast": "optim.lr",
        "data.batch_size=1.5": "data.batch_size",
        "optim.lrr=1": "Did you mean 'lr'",
        "model.semantic_lora=yes": "true or false",
        "schedule.k0=60": "schedule.k0",
        "disc.inner_channels=100": "multiple of 32",
        "nosuchsection.x=1": "unknown section",
        "justtext": "key=value",
        "stage=third": "semantic",
    }
    for item, needle in cases.items():
        with pytest.raises(DCMConfigError, match=needle.replace("(", r"\(")):
            load_config(None, [item])
    with pytest.raises(DCMConfigError, match="contradicts"):
        load_config(None, ["stage=detail"], stage="semantic")


def test_config_files_parse(tmp_path):
    names = sorted(p.name for p in CONFIGS.glob("*.toml"))
    assert {"wan_semantic.toml", "wan_detail.toml", "hunyuan_semantic.toml", "hunyuan_detail.toml"} <= set(names)
    for p in CONFIGS.glob("*.toml"):
        cfg = load_config(p)
        assert cfg.model.pretrained
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"stage": "detail", "optim": {"lr": 1e-5}}))
    assert load_config(j).optim.lr == 1e-5
    bad = tmp_path / "bad.toml"
    bad.write_text("stage = ")
    with pytest.raises(DCMConfigError, match="not valid"):
        load_config(bad)
    assert from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_dataset_reads_safetensors_and_refuses_pickles(tmp_path, th):
    root = th.make_dataset(tmp_path / "d", "wan", n=2, t=5)
    ds = LatentDataset(root, num_latent_t=3)
    it = ds[1]
    assert it.latent.shape == (16, 3, 8, 8) and it.prompt_embed.shape == (8, 4096) and it.prompt_mask.dtype == torch.bool
    full = LatentDataset(root)[1].latent
    torch.testing.assert_close(it.latent, full[:, -3:])  # the LAST N latent frames
    with pytest.raises(DCMFormatError, match="fewer than"):
        LatentDataset(root, num_latent_t=9)[0]
    # a FastVideo-style .pt entry is refused without being opened
    items = json.loads((root / "videos2caption.json").read_text())
    items[0]["latent_path"] = "clip0.pt"
    (root / "latent" / "clip0.pt").write_bytes(b"\x80\x04 not really a pickle")
    (root / "videos2caption.json").write_text(json.dumps(items))
    with pytest.raises(DCMFormatError, match="pickle"):
        LatentDataset(root)
    # a pickle renamed to .safetensors is caught by its magic bytes
    items[0]["latent_path"] = "clip0.safetensors"
    (root / "videos2caption.json").write_text(json.dumps(items))
    (root / "latent" / "clip0.safetensors").write_bytes(b"PK\x03\x04zipped pickle")
    with pytest.raises(DCMFormatError):
        LatentDataset(root)[0]
    with pytest.raises(DCMFileNotFoundError):
        LatentDataset(tmp_path / "nowhere")


def test_sampler_shuffles_per_epoch_splits_and_resumes():
    s0 = ResumableDistributedSampler(10, num_replicas=2, rank=0, seed=5)
    s1 = ResumableDistributedSampler(10, num_replicas=2, rank=1, seed=5)
    a, b = s0.indices(), s1.indices()
    assert sorted(a + b) == list(range(10)) and len(a) == len(b) == 5
    s0.set_epoch(1)
    assert s0.indices() != a  # reshuffled
    s0.set_epoch(0)
    assert s0.indices() == a  # deterministic
    s0.set_start(3)
    assert list(iter(s0)) == a[3:] and len(s0) == 2
    odd = ResumableDistributedSampler(5, num_replicas=2, rank=1, seed=0)
    assert len(odd.indices()) == 3  # padded like DistributedSampler
    noshuf = ResumableDistributedSampler(4, shuffle=False)
    assert noshuf.indices() == [0, 1, 2, 3]
    # same order as torch's DistributedSampler for the same seed / epoch / rank
    from torch.utils.data import DistributedSampler

    for n, reps, rank, epoch in ((10, 2, 1, 0), (7, 3, 2, 4), (5, 1, 0, 9)):
        ref = DistributedSampler(range(n), num_replicas=reps, rank=rank, shuffle=True, seed=11)
        ref.set_epoch(epoch)
        ours = ResumableDistributedSampler(n, num_replicas=reps, rank=rank, seed=11)
        ours.set_epoch(epoch)
        assert ours.indices() == list(ref)


def test_data_stream_position_is_exact(tmp_path, th):
    root = th.make_dataset(tmp_path / "d", "wan", n=5)
    ds = LatentDataset(root)
    ref = DataStream(ds, batch_size=2, seed=3)
    seen = [ref.next().indices.tolist() for _ in range(7)]  # crosses two epoch boundaries
    resumed = DataStream(ds, batch_size=2, seed=3)
    for _ in range(4):
        resumed.next()
    state = resumed.state()
    fresh = DataStream(ds, batch_size=2, seed=3)
    fresh.load_state(state)
    assert [fresh.next().indices.tolist() for _ in range(3)] == seen[4:]
    assert ref.batches_per_epoch == 2  # drop_last: 5 samples → 2 batches of 2


def test_caption_dropout_uses_the_empty_embedding(tmp_path, th):
    root = th.make_dataset(tmp_path / "d", "wan", n=4)
    ds = LatentDataset(root)
    batch = collate([ds[i] for i in range(4)])
    uncond = load_uncond(root)
    assert uncond is not None
    g = torch.Generator().manual_seed(0)
    out, drop = apply_caption_dropout(batch, uncond, 1.0, g)
    assert drop.all()
    torch.testing.assert_close(out.prompt_embeds[2], uncond[0].to(out.prompt_embeds.dtype))
    assert out.prompt_masks[2].tolist() == uncond[1].tolist()
    same, none = apply_caption_dropout(batch, uncond, 0.0, g)
    assert not none.any() and same is batch
    with pytest.raises(DCMConfigError):
        apply_caption_dropout(batch, None, 1.0, g)
    mixed = [ds[0], ds[1]]
    mixed[1].latent = mixed[1].latent[:, :3]
    with pytest.raises(DCMConfigError, match="mixes latent shapes"):
        collate(mixed)
    assert isinstance(batch, Batch)
