"""preprocess: tiny generated videos + a tiny diffusers Wan VAE / UMT5 / tokenizer → a trainable dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm_core.errors import DCMConfigError
from dcm_core.train.data import LatentDataset, load_uncond
from dcm_core.train.preprocess import preprocess, read_captions
from dcm_core.train.video_io import resize_cover_crop, select_frames, synthetic_clip, write_mp4

WORDS = "a cat dog runs jumps on the red blue grass in slow motion video of".split()


def _tiny_wan_folder(root: Path) -> Path:
    """model_index.json + vae/ (AutoencoderKLWan) + text_encoder/ (UMT5, d_model 4096) + tokenizer/ (word level)."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(root / "vae")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        root / "tokenizer"
    )
    cfg = UMT5Config(vocab_size=len(vocab), d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1)
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")
    return root


def test_frame_selection_and_crop():
    assert select_frames(81, 81) == list(range(81))
    assert select_frames(200, 81) == list(range(0, 162, 2))
    assert select_frames(50, 81) is None
    clip = synthetic_clip(3, 20, 40)
    out = resize_cover_crop(clip, 16, 16)
    assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1


def test_captions_formats(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"a.mp4": "one", "b.mp4": {"text": "two", "caption": "three"}}))
    assert read_captions(tmp_path / "c.json") == [("a.mp4", "one"), ("b.mp4", "two three")]
    (tmp_path / "c.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{"path": "b.mp4", "prompt": "y"}\n')
    assert read_captions(tmp_path / "c.jsonl") == [("a.mp4", "x"), ("b.mp4", "y")]
    (tmp_path / "c.tsv").write_text("a.mp4\tx y\n# comment\n")
    assert read_captions(tmp_path / "c.tsv") == [("a.mp4", "x y")]
    (tmp_path / "c.csv").write_text("video,caption\na.mp4,hello\n")
    assert read_captions(tmp_path / "c.csv") == [("a.mp4", "hello")]
    (tmp_path / "bad.txt").write_text("no tab here\n")
    with pytest.raises(DCMConfigError):
        read_captions(tmp_path / "bad.txt")


def test_preprocess_tiny_videos_then_train(tmp_path, th):
    model = _tiny_wan_folder(tmp_path / "model")
    vids = tmp_path / "videos"
    vids.mkdir()
    for i in range(2):
        write_mp4(vids / f"clip {i}.mp4", synthetic_clip(20, 40, 56, seed=i), fps=16)
    write_mp4(vids / "short.mp4", synthetic_clip(5, 40, 56), fps=16)
    (vids / "broken.mp4").write_bytes(b"this is not a video")
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({
        "clip 0.mp4": "a cat runs on the grass", "clip 1.mp4": "a red dog jumps",
        "short.mp4": "too short", "broken.mp4": "unreadable", "missing.mp4": "no file",
    }))
    out = tmp_path / "data"
    rep = preprocess(model, vids, caps, out, frames=17, height=32, width=32, max_text_tokens=8, progress=False)
    assert sorted(rep.written) == ["clip 0.mp4", "clip 1.mp4"]
    assert {s["video"] for s in rep.skipped} == {"short.mp4", "broken.mp4", "missing.mp4"}
    assert json.loads((out / "skipped.json").read_text())
    ds = LatentDataset(out)
    it = ds[0]
    assert it.latent.shape == (16, 5, 4, 4)  # 17 frames → 5 latent frames; 32 px → 4
    assert it.prompt_embed.shape == (8, 4096) and it.prompt_mask.tolist() == [True] * 7 + [False]
    assert torch.all(it.prompt_embed[7:] == 0)  # zero after the true length, as the official code
    assert it.caption == "a cat runs on the grass"
    ue, um = load_uncond(out)
    assert ue.shape == (8, 4096) and um.tolist() == [True] + [False] * 7
    # a second run keeps what is there
    rep2 = preprocess(model, vids, caps, out, frames=17, height=32, width=32, max_text_tokens=8, progress=False)
    assert sorted(rep2.kept) == ["clip 0.mp4", "clip 1.mp4"] and not rep2.written
    # the dataset trains (tiny Wan, 4×4 latent → 2×2 tokens)
    from dcm_core.train.trainer import DCMTrainer

    cfg = th.tiny_config(
        "wan", "semantic", out, tmp_path / "run", export__at_end="false", validation__every_steps=2,
        validation__vae=str(model),
    )
    res = DCMTrainer(cfg).train()
    assert res.global_step == 2 and np.isfinite(res.history[-1]["loss"])
    # validation latents were decoded with the configured VAE
    assert (tmp_path / "run" / "validation" / "step-00000002.safetensors").is_file()
    assert (tmp_path / "run" / "validation" / "step-00000002-0.mp4").stat().st_size > 0


def _word_tokenizer(path: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)


def test_preprocess_hunyuan_layout(tmp_path):
    """HunyuanVideo: [1 + L, D] embeddings with the CLIP pooled vector in token 0, mask [L]."""
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    model = tmp_path / "hy"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    torch.manual_seed(0)
    AutoencoderKLHunyuanVideo(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8).save_pretrained(
        model / "vae"
    )
    _word_tokenizer(model / "tokenizer", WORDS)
    _word_tokenizer(model / "tokenizer_2", WORDS)
    LlamaModel(LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).save_pretrained(model / "text_encoder")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, eos_token_id=1,
                                 bos_token_id=2)).save_pretrained(model / "text_encoder_2")
    vids = tmp_path / "videos"
    vids.mkdir()
    write_mp4(vids / "a.mp4", synthetic_clip(9, 32, 48), fps=24)
    (tmp_path / "caps.tsv").write_text("a.mp4\ta red cat\n")
    preprocess(model, vids, tmp_path / "caps.tsv", tmp_path / "out", frames=9, height=32, width=32, max_text_tokens=6,
               progress=False)
    it = LatentDataset(tmp_path / "out")[0]
    assert it.latent.shape == (16, 3, 4, 4)
    assert it.prompt_embed.shape == (1 + 6, 64) and it.prompt_mask.shape == (6,)
    assert torch.all(it.prompt_embed[0, 32:] == 0)  # CLIP pooled (32-dim here) zero-padded in token 0
    assert it.prompt_mask.tolist()[:3] == [True, True, True]
