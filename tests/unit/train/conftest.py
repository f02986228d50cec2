"""Fixtures of the trainer tests: tiny latent datasets, tiny configs, one CPU thread.

Two CPU threads on a shared 2-core machine make tiny matmuls ~20× slower than one, so every
test (and every subprocess, via OMP_NUM_THREADS) runs single-threaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dcm_core.train.config import TrainConfig, load_config
from dcm_core.train.data import write_latent_dataset

TEXT_TOKENS = 8
TINY = {"wan": "{dim = 128, num_layers = 2, ffn_dim = 256}", "hunyuan_video": "{hidden = 128}"}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py: one_torch_thread)."""


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps a process-wide singleton; a bf16 run would otherwise pin later runs to bf16."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_dataset(root: Path, family: str, *, n: int = 3, t: int = 5, h: int = 8, w: int = 8, seed: int = 0) -> Path:
    """A tiny latent dataset: raw latents [16, t, h, w], text [8 (+1 for HY), 4096], uncond."""
    g = torch.Generator().manual_seed(seed)
    extra = 1 if family == "hunyuan_video" else 0
    items = []
    for i in range(n):
        items.append(
            dict(
                name=f"clip{i}",
                latent=torch.randn(16, t, h, w, generator=g) * 2.0,
                prompt_embed=torch.randn(TEXT_TOKENS + extra, 4096, generator=g) * 0.5,
                prompt_attention_mask=torch.tensor([True] * (TEXT_TOKENS - 2) + [False] * 2),
                caption=f"caption {i}",
            )
        )
    uncond = (torch.randn(TEXT_TOKENS + extra, 4096, generator=g) * 0.5, torch.tensor([True] + [False] * (TEXT_TOKENS - 1)))
    return write_latent_dataset(root, items, uncond=uncond)


def tiny_overrides(family: str, data: Path, out: Path, **extra: object) -> list[str]:
    ov = [
        f"model.pretrained=tiny:{family}",
        f"model.tiny_config={TINY[family]}",
        f"data.path={data}",
        f"output_dir={out}",
        "max_train_steps=2",
        "checkpoint.every_steps=0",
        "model.lora_rank=4",
        "model.lora_alpha=8",
        "disc.inner_channels=64",
        "logging.progress_bar=false",
    ]
    for k, v in extra.items():
        ov.append(f"{k.replace('__', '.')}={v}")
    return ov


def tiny_config(family: str, stage: str, data: Path, out: Path, **extra: object) -> TrainConfig:
    return load_config(None, tiny_overrides(family, data, out, **extra), stage=stage)


@pytest.fixture
def wan_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data_wan", "wan")


@pytest.fixture
def hy_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data_hy", "hunyuan_video")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


class TrainHelpers:
    """Helpers handed to tests as the ``th`` fixture (importlib mode: tests cannot import conftest)."""

    make_dataset = staticmethod(make_dataset)
    tiny_overrides = staticmethod(tiny_overrides)
    tiny_config = staticmethod(tiny_config)
    subprocess_env = staticmethod(subprocess_env)
    TEXT_TOKENS = TEXT_TOKENS


@pytest.fixture
def th() -> type[TrainHelpers]:
    return TrainHelpers
