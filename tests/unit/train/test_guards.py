"""Model folders of the supported families load; what stays unsupported is refused up front, naming the file.

Wan2.2 A14B pairs, 48-channel VAEs (Wan2.2 TI2V-5B) and image-to-video transformers (in = 2·out + 4) are supported
now (tests/unit/train/test_families.py trains them); inconsistent folders and other layouts keep clear errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcm_core.errors import DCMError
from dcm_core.tiny import build_transformer, wan_config
from dcm_core.train.models import load_pretrained, load_transformer, two_transformer_boundary
from dcm_core.train.video_io import load_vae

WAN = {"_class_name": "WanTransformer3DModel", "in_channels": 16, "out_channels": 16, "num_layers": 2}


def _folder(root: Path, *, transformer: dict | None = None, index: dict | None = None, vae: dict | None = None,
            transformer_2: bool = False) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(transformer or WAN))
    if index is not None:
        (root / "model_index.json").write_text(json.dumps(index))
    if vae is not None:
        (root / "vae").mkdir()
        (root / "vae" / "config.json").write_text(json.dumps(vae))
    if transformer_2:
        (root / "transformer_2").mkdir()
        (root / "transformer_2" / "config.json").write_text(json.dumps(WAN))
    return root


def _refused(source: Path, *words: str, **kw) -> str:
    with pytest.raises(DCMError) as e:
        load_transformer(str(source), **kw)
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    return msg


def test_inconsistent_two_transformer_folders_are_refused(tmp_path):
    index = {"_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    m = _folder(tmp_path / "no_t2", index=index)  # declared, but no transformer_2/ folder
    _refused(m, str(m / "model_index.json"), "transformer_2", "no config.json")
    m2 = _folder(tmp_path / "no_ratio", transformer_2=True)  # a second transformer but no boundary_ratio
    _refused(m2, str(m2 / "transformer_2"), "boundary_ratio")
    # TI2V-5B's index names transformer_2 as [null, null] and boundary_ratio null: one transformer, not refused here
    m3 = _folder(tmp_path / "ti2v", index={"_class_name": "WanPipeline", "transformer_2": [None, None], "boundary_ratio": None})
    assert two_transformer_boundary(m3) is None
    _refused(m3, "no diffusion_pytorch_model.safetensors", "only safetensors")  # a stub without weights: named


def test_two_transformer_folder_loads_both_and_names_the_half(tmp_path):
    root = tmp_path / "a14b"
    cfg = wan_config()
    build_transformer("wan", cfg, seed=0).save_pretrained(root / "transformer")
    build_transformer("wan", cfg, seed=1).save_pretrained(root / "transformer_2")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer_2": ["diffusers", "WanTransformer3DModel"]}))

    class M:
        pretrained, transformer_config, tiny_config, tiny_seed = str(root), "", {}, 0

    pre = load_pretrained(M)
    assert pre.boundary_timestep == 875.0 and pre.base.id == "wan2.2-t2v-a14b"
    assert not all(
        (a == b).all() for a, b in zip(pre.high.state_dict().values(), pre.low.state_dict().values())
    )
    _refused(root, "two-transformer", "subfolder")  # load_transformer alone must be told which half
    _refused(root / "transformer", "one half", str(root))  # the transformer/ folder of a pair is not a model


def test_vae_config_must_describe_its_channels(tmp_path):
    m = _folder(tmp_path / "ti2v", index={"_class_name": "WanPipeline"}, vae={"_class_name": "AutoencoderKLWan", "z_dim": 48})
    _refused(m, str(m / "vae" / "config.json"), "z_dim = 48", "latents_mean / latents_std")
    with pytest.raises(DCMError, match="z_dim = 48"):
        load_vae(m, "wan")


def test_unsupported_channel_layout_is_refused(tmp_path):
    m = _folder(tmp_path / "odd", transformer=dict(WAN, in_channels=20))
    _refused(m, str(m / "transformer" / "config.json"), "in_channels = 20", "out_channels = 16", "supports")
