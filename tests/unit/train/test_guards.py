"""Model folders the trainer does not support are refused up front, naming the file and what is supported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcm_core.errors import DCMError
from dcm_core.train.models import load_transformer
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


def _refused(source: Path, *words: str) -> str:
    with pytest.raises(DCMError) as e:
        load_transformer(str(source))
    msg = str(e.value)
    assert "supports" in msg and all(w in msg for w in words), msg
    return msg


def test_wan22_two_transformer_folder_is_refused(tmp_path):
    index = {"_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    m = _folder(tmp_path / "a14b", index=index, transformer_2=True)
    _refused(m, str(m / "model_index.json"), "boundary_ratio=0.875", "transformer_2")
    _refused(m / "transformer", str(m / "model_index.json"))  # also when its transformer/ is given
    m2 = _folder(tmp_path / "no_index", transformer_2=True)
    _refused(m2, str(m2 / "transformer_2"))


def test_non_16_channel_vae_is_refused(tmp_path):
    m = _folder(tmp_path / "ti2v", index={"_class_name": "WanPipeline"}, vae={"_class_name": "AutoencoderKLWan", "z_dim": 48})
    _refused(m, str(m / "vae" / "config.json"), "z_dim = 48", "16-channel")
    with pytest.raises(DCMError, match="z_dim = 48"):
        load_vae(m, "wan")


def test_image_to_video_transformer_is_refused(tmp_path):
    m = _folder(tmp_path / "i2v", transformer=dict(WAN, in_channels=36))
    _refused(m, str(m / "transformer" / "config.json"), "in_channels = 36", "out_channels = 16", "text-to-video")
