"""The families artists use, trained end to end on tiny models (issue #14, trainer side).

For each layout (Wan I2V with a CLIP image embedder, Wan2.2 TI2V-5B with a 48-channel 16× VAE, the Wan2.2 A14B pair)
a tiny diffusers folder is made, clips go through ``preprocess``, both stages run 2 steps, only the intended
parameters change and the export carries the family metadata. The conditioning arithmetic is checked against direct
calls of the diffusers transformer the way diffusers' Wan pipelines call it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcm_core.families import BASES, HIGH_NOISE, LOW_NOISE
from dcm_core.formats import inspect_file, read_header
from dcm_core.tiny import save_tiny_model_folder
from dcm_core.train.data import LatentDataset
from dcm_core.train.preprocess import preprocess
from dcm_core.train.video_io import synthetic_clip, write_mp4

#: kind -> (base id, clip side in pixels: 2 × the VAE's spatial factor × 2 tokens)
KINDS = {"i2v": ("wan2.1-i2v-14b", 32), "ti2v": ("wan2.2-ti2v-5b", 64), "a14b-t2v": ("wan2.2-t2v-a14b", 32),
         "a14b-i2v": ("wan2.2-i2v-a14b", 32)}  # fmt: skip


def _folder_and_data(tmp: Path, kind: str) -> tuple[Path, Path]:
    model = save_tiny_model_folder(tmp / "model", kind)
    side = KINDS[kind][1]
    vids = tmp / "videos"
    vids.mkdir()
    for i in range(2):
        write_mp4(vids / f"c{i}.mp4", synthetic_clip(12, side + 8, side + 16, seed=i), fps=16)
    (tmp / "caps.json").write_text(json.dumps({"c0.mp4": "a cat runs", "c1.mp4": "a red dog jumps"}))
    preprocess(model, vids, tmp / "caps.json", tmp / "data", frames=9, height=side, width=side, max_text_tokens=8,
               progress=False)  # fmt: skip
    return model, tmp / "data"


def _overrides(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    ov = [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}", "max_train_steps=2",
          "checkpoint.every_steps=0", "model.lora_rank=4", "model.lora_alpha=8", "disc.inner_channels=64",
          "logging.progress_bar=false", "optim.lr=1e-3"]  # fmt: skip
    return ov + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


def _snapshot(m: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if m is None else {k: v.detach().float().clone() for k, v in m.state_dict().items()}


def _changed(before: dict, m: torch.nn.Module) -> set[str]:
    after = m.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k].detach().float())}


@pytest.mark.parametrize("kind", ["i2v", "ti2v", "a14b-t2v", "a14b-i2v"])
def test_family_trains_both_stages_and_exports(kind, tmp_path):
    from dcm_core.train.config import load_config
    from dcm_core.train.trainer import DCMTrainer

    base_id, side = KINDS[kind]
    base = BASES[base_id]
    model, data = _folder_and_data(tmp_path, kind)
    # the dataset preprocess wrote
    ds = LatentDataset(data)
    it = ds[0]
    fmt = json.loads((data / "latent_format.json").read_text())
    assert fmt["channels"] == base.latent_channels and it.latent.shape[0] == base.latent_channels
    assert fmt["spatial"] == (16 if kind == "ti2v" else 8)
    assert it.latent.shape[1:] == (3, side // fmt["spatial"], side // fmt["spatial"])
    if kind == "ti2v":  # the first frame alone: equal to the clip's first latent frame (causal VAE)
        assert it.image_latent.shape == (48, 1, 4, 4)
        assert torch.allclose(it.image_latent, it.latent[:, :1], atol=1e-5)
    elif kind == "i2v":
        assert it.image_latent.shape == it.latent.shape and it.clip_feature.shape == (5, 1280)
    elif kind == "a14b-i2v":  # 36-channel pair: the image latent, no CLIP features (no image embedder)
        assert it.image_latent.shape == it.latent.shape and it.clip_feature is None
    else:
        assert it.image_latent is None
    two = base.two_transformers
    k0, b = {875.0: (14, "875"), 900.0: (17, "900")}.get(base.boundary_timestep, (35, None))

    # stage 1
    cfg = load_config(None, _overrides(model, data, tmp_path / "sem"), stage="semantic")
    tr = DCMTrainer(cfg)
    if two:
        assert tr.cfg.schedule.k0 == k0 and tr.cfg.schedule.boundary_timestep == base.boundary_timestep
        assert tr.models.teacher_other is None  # every semantic teacher call lies above the boundary
    assert tr.image_mode == {"i2v": "concat", "a14b-i2v": "concat", "ti2v": "first_frame"}.get(kind, "none")
    if tr.image_mode != "none":  # the CFG unconditional drops the text and keeps the image
        from dcm_core.train.data import collate

        one = collate([ds[0]])
        c, u = tr._cond(one), tr._uncond_batch(one)
        for part in ("image", "image_embeds", "first_frame"):
            assert (getattr(c, part) is None) == (getattr(u, part) is None)
            assert getattr(c, part) is None or torch.equal(getattr(c, part), getattr(u, part))
        assert not torch.equal(c.context, u.context)
    teacher0 = _snapshot(tr.models.teacher)
    student0 = _snapshot(tr.models.student)
    res = tr.train()
    assert res.global_step == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert not _changed(teacher0, tr.models.teacher)
    changed = _changed(student0, tr.models.student)
    assert changed, "the semantic student did not train"
    if kind == "i2v":  # the image path trains: the image embedder and the image cross-attention
        assert any("image_embedder" in k for k in changed) and any("add_k_proj" in k for k in changed)
    if two:
        from safetensors.torch import load_file

        stock_high = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(stock_high[k], student0[k]) for k in stock_high)  # the student started from transformer/
        sem_file = res.exported["semantic"]
        meta = read_header(sem_file).metadata
        assert inspect_file(sem_file).kind == "dcm_semantic"
        assert (meta["dcm.base"], meta["dcm.task"], meta["dcm.expert_base"], meta["dcm.boundary_timestep"]) == (
            base_id, base.task, HIGH_NOISE, b)
    else:
        assert set(res.exported) == {"transformer"}

    # stage 2
    extra = {} if two else {"model__semantic_expert": str(tmp_path / "sem")}
    cfg2 = load_config(None, _overrides(model, data, tmp_path / "det", **extra), stage="detail")
    tr2 = DCMTrainer(cfg2)
    teacher0 = _snapshot(tr2.models.teacher)
    student0 = _snapshot(tr2.models.student)
    if two:
        from safetensors.torch import load_file

        stock_low = load_file(str(model / "transformer_2" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(stock_low[k], teacher0[k]) for k in stock_low)  # the teacher is transformer_2/
        assert tr2.models.teacher_other is None and tr2.cfg.schedule.k0 == k0
    res2 = tr2.train()
    assert not _changed(teacher0, tr2.models.teacher)
    changed = _changed(student0, tr2.models.student)
    extras = ("condition_embedder_lora.", "norm_out_lora.", "proj_out_lora.")
    assert changed and all(".lora_A.lora1." in k or ".lora_B.lora1." in k or k.startswith(extras) for k in changed), sorted(changed)[:5]
    if kind == "i2v":  # the detail expert's copied embedder includes the image embedder, and it trains
        assert any(k.startswith("condition_embedder_lora.image_embedder.") for k in changed)
    files = res2.exported
    if two:
        assert set(files) == {"transformer", "detail_expert"}
    else:
        assert set(files) == {"transformer", "semantic", "detail_expert"}
    det_meta = read_header(files["detail_expert"]).metadata
    assert inspect_file(files["detail_expert"]).kind == "dcm_detail_expert"
    assert det_meta["dcm.base"] == base_id and det_meta["dcm.task"] == base.task
    if two:
        assert det_meta["dcm.expert_base"] == LOW_NOISE and det_meta["dcm.boundary_timestep"] == b
    else:
        assert "dcm.expert_base" not in det_meta
        assert read_header(files["semantic"]).metadata["dcm.base"] == base_id
    info = json.loads((tmp_path / "det" / "export" / "export_info.json").read_text())
    assert info["base"] == base_id
    # `python -m dcm_core export RUN` rebuilds the student from the run folder and writes the same files
    from dcm_core.formats import load_state_dict
    from dcm_core.train.export import export_run

    again = export_run(tmp_path / "det", out_dir=tmp_path / "again")
    assert set(again) == set(files)
    for what in files:
        a, b2 = load_state_dict(files[what]), load_state_dict(again[what])
        assert a.keys() == b2.keys() and all(torch.equal(a[k], b2[k]) for k in a), what


# ---------------------------------------------------------------------------- conditioning arithmetic


def _tiny(kind_cfg: dict, seed: int = 0):
    from dcm_core.tiny import build_transformer, wan_config

    return build_transformer("wan", wan_config(**kind_cfg), seed=seed)


def test_i2v_forward_is_the_pipeline_forward():
    """mask (1 on latent frame 0) + image latent after the noisy latent; CLIP features into the image embedder."""
    from dcm_core.train.models import IMAGE_CONCAT, Conditioning, call_velocity

    m = _tiny(dict(in_channels=36, out_channels=16, image_dim=64))
    g = torch.Generator().manual_seed(0)
    x, img = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    text, clip = torch.randn(2, 5, 4096, generator=g), torch.randn(2, 7, 64, generator=g)
    sigma = torch.tensor([0.9, 0.3])
    cond = Conditioning("wan", text, torch.ones(2, 5, dtype=torch.bool)).with_image(IMAGE_CONCAT, img, clip)
    v = call_velocity(m, m, x, sigma, cond)
    mask = torch.zeros(2, 4, 3, 4, 4)
    mask[:, :, 0] = 1
    text512 = torch.cat([text, torch.zeros(2, 507, 4096)], 1)  # the pipeline's text: 512 tokens, zeros after the end
    with torch.no_grad():
        ref = m(hidden_states=torch.cat([x, mask, img], 1), timestep=sigma * 1000, encoder_hidden_states=text512,
                encoder_hidden_states_image=clip, return_dict=False)[0]  # fmt: skip
    assert torch.allclose(v, ref, atol=1e-6)
    assert cond.context.shape[1] == 512 and cond.mask[:, 5:].sum() == 0


def test_ti2v_first_frame_and_per_token_timesteps():
    """Frame 0 is the clean image with timestep 0 on its tokens (diffusers expand_timesteps); its velocity is 0."""
    from dcm_core.train.discriminator import TeacherFeatures
    from dcm_core.train.models import IMAGE_FIRST_FRAME, Conditioning, call_velocity

    m = _tiny(dict(in_channels=48, out_channels=48))
    g = torch.Generator().manual_seed(1)
    x, img = torch.randn(1, 48, 3, 4, 4, generator=g), torch.randn(1, 48, 1, 4, 4, generator=g)
    text = torch.randn(1, 5, 4096, generator=g)
    cond = Conditioning("wan", text, torch.ones(1, 5, dtype=torch.bool)).with_image(IMAGE_FIRST_FRAME, img, None)
    sigma = torch.tensor([0.7])
    v = call_velocity(m, m, x, sigma, cond)
    mask = torch.ones(1, 1, 3, 4, 4)
    mask[:, :, 0] = 0
    ts = (mask[0, 0][:, ::2, ::2] * 700.0).flatten()[None]  # the pipeline's per-token timesteps
    h = (1 - mask) * img.expand(-1, -1, 3, -1, -1) + mask * x
    with torch.no_grad():
        ref = m(hidden_states=h, timestep=ts, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(v[:, :, 0], torch.zeros_like(v[:, :, 0]))
    assert torch.allclose(v[:, :, 1:], ref[:, :, 1:], atol=1e-6)
    # the discriminator's decode of the last block with the per-token temb is the model's own head
    feats = TeacherFeatures(m, "wan", stride=1)
    out = feats.run(lambda z: call_velocity(m, m, z, sigma, cond), x)
    assert torch.allclose(out.decoded[-1][:, :, 1:], ref[:, :, 1:], atol=1e-5)


def test_pair_teacher_is_routed_per_sample(tmp_path):
    """Above the boundary the high-noise transformer answers, at or below it the low-noise one, per sample."""
    from dcm_core.train.config import load_config
    from dcm_core.train.models import Conditioning, build_models, call_velocity
    from dcm_core.train.trainer import DCMTrainer

    model = save_tiny_model_folder(tmp_path / "m", "a14b-t2v")
    cfg = load_config(None, [f"model.pretrained={model}", "schedule.k0=10", "model.semantic_lora=true"], stage="semantic")
    models = build_models(cfg)
    assert models.teacher_other is not None  # k0 = 10 puts semantic calls below the boundary: both are loaded
    tr = DCMTrainer.__new__(DCMTrainer)
    tr.models, tr.student_unwrapped = models, models.student
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 5, 4096, generator=g)
    cond = Conditioning("wan", text, torch.ones(2, 5, dtype=torch.bool))
    sigma = torch.tensor([0.95, 0.5])  # 950 > 875: high; 500: low
    v = tr._teacher_velocity(x, sigma, cond)
    from dcm_core.train.models import adapters_disabled

    with adapters_disabled(models.student):
        v_high = call_velocity(models.student, models.student, x, sigma, cond)
    v_low = call_velocity(models.teacher_other, models.teacher_other, x, sigma, cond)
    assert torch.allclose(v[0], v_high[0], atol=1e-6) and torch.allclose(v[1], v_low[1], atol=1e-6)
    assert not torch.allclose(v_high[1], v_low[1], atol=1e-3)  # the two transformers differ


def test_boundary_grid_index():
    from dcm_core.schedule import pcm_grid
    from dcm_core.train.solver import boundary_k0

    g = pcm_grid(17, 50)
    for b, k0 in ((875.0, 14), (900.0, 17)):
        assert boundary_k0(b) == k0
        assert g.sigmas[k0] * 1000 > b >= g.sigmas[k0 - 1] * 1000 and g.sigmas_prev[k0] == g.sigmas[k0 - 1]


def test_latent_format_from_the_vae_config(tmp_path):
    from dcm_core.errors import DCMConfigError
    from dcm_core.latents import LatentFormat
    from dcm_core.tiny import save_tiny_wan_vae

    save_tiny_wan_vae(tmp_path / "vae", channels=48)
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    fmt = LatentFormat.from_vae_config(cfg, "wan")
    assert (fmt.channels, fmt.spatial, fmt.temporal) == (48, 16, 4) and fmt.mean == tuple(cfg["latents_mean"])
    x = torch.randn(1, 48, 2, 3, 3)
    assert torch.allclose(fmt.from_model_space(fmt.to_model_space(x)), x, atol=1e-5)
    assert fmt.latent_shape(81, 704, 1280) == (1, 48, 21, 44, 80)
    with pytest.raises(DCMConfigError, match="16 channels but the VAE's latent format has 48"):
        fmt.to_model_space(torch.randn(1, 16, 2, 3, 3))
    with pytest.raises(DCMConfigError, match="latents_mean / latents_std"):
        LatentFormat.from_vae_config({"z_dim": 48}, "wan", "x/vae/config.json")


def test_text_dropout_and_uncond_keep_the_image(tmp_path):
    """Caption dropout and the CFG unconditional replace the text and keep the image conditioning."""
    from dcm_core.train.data import Batch, apply_caption_dropout

    img, clip = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 5, 1280)
    b = Batch(torch.randn(2, 16, 3, 4, 4), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), torch.arange(2),
              ["a", "b"], img, clip)  # fmt: skip
    uncond = (torch.zeros(4, 8), torch.tensor([True, False, False, False]))
    out, drop = apply_caption_dropout(b, uncond, 1.0, None, u=torch.tensor([0.0, 0.0]))
    assert drop.all() and torch.equal(out.prompt_embeds, torch.zeros(2, 4, 8))
    assert out.image_latents is img and out.clip_features is clip


def test_what_stays_unsupported_is_refused_with_the_fix(tmp_path, th):
    """A dataset made for another model, a pair detail stage given a semantic expert, an adversarial range above a
    pair's boundary: each is refused before training, naming the file or key and the fix."""
    from dcm_core.errors import DCMConfigError
    from dcm_core.train.config import load_config
    from dcm_core.train.trainer import DCMTrainer

    t2v_data = th.make_dataset(tmp_path / "t2v_data", "wan", n=2)  # 16 channels, no image latents
    i2v = save_tiny_model_folder(tmp_path / "i2v", "i2v")
    with pytest.raises(DCMConfigError, match="no image latents. Re-run preprocess"):
        DCMTrainer(load_config(None, _overrides(i2v, t2v_data, tmp_path / "r1"), stage="semantic"))
    ti2v = save_tiny_model_folder(tmp_path / "ti2v", "ti2v")
    with pytest.raises(DCMConfigError, match="latents have 16 channels .* outputs 48"):
        DCMTrainer(load_config(None, _overrides(ti2v, t2v_data, tmp_path / "r2"), stage="semantic"))
    pair = save_tiny_model_folder(tmp_path / "a14b", "a14b-t2v")
    with pytest.raises(DCMConfigError, match="model.semantic_expert=.*leave model.semantic_expert empty"):
        DCMTrainer(load_config(None, _overrides(pair, t2v_data, tmp_path / "r3", model__semantic_expert=str(i2v)),
                               stage="detail"))  # fmt: skip
    with pytest.raises(DCMConfigError, match="schedule.k0=20: the detail stage's adversarial noise levels"):
        DCMTrainer(load_config(None, _overrides(pair, t2v_data, tmp_path / "r4", schedule__k0=20), stage="detail"))


@pytest.mark.parametrize("kind", ["ti2v", "a14b-i2v"])
def test_family_detail_run_resumes_bit_identically(kind, tmp_path):
    """3 detail steps straight == 2 steps, then ``--resume latest`` for the third (image conditioning, pair routing)."""
    from safetensors.torch import load_file

    from dcm_core.train.config import load_config
    from dcm_core.train.trainer import DCMTrainer

    model, data = _folder_and_data(tmp_path, kind)

    def run(out: Path, steps: int, resume: str | None = None) -> None:
        ov = _overrides(model, data, out, max_train_steps=steps, checkpoint__every_steps=1, export__at_end="false",
                        data__caption_dropout=0.5)  # fmt: skip
        DCMTrainer(load_config(None, ov, stage="detail"), resume=resume).train()

    run(tmp_path / "straight", 3)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 3, resume="latest")
    for name in ("trainable.safetensors", "discriminator.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "checkpoint-00000003" / name))
        b = load_file(str(tmp_path / "resumed" / "checkpoints" / "checkpoint-00000003" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
