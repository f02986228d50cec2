"""Export: official combined layout (strict reload), pack-native files, export CLI, stage chaining, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dcm_core.modeling import add_detail_expert
from dcm_core.tiny import build_transformer, hunyuan_config, wan_config
from dcm_core.train.export import export_run
from dcm_core.train.models import semantic_state_dict
from dcm_core.train.trainer import DCMTrainer


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_detail_export_round_trip(family, tmp_path, th):
    data = th.make_dataset(tmp_path / "data", family)
    run = tmp_path / "run"
    tr = DCMTrainer(th.tiny_config(family, "detail", data, run, optim__lr=1e-3))
    res = tr.train()
    official = load_file(res.exported["transformer"])
    # 1. official layout: base_layer / lora_A.lora1 / lora_B.lora1 / *_lora, strict reload into a fresh model
    assert any(".base_layer." in k for k in official) and any(".lora_B.lora1." in k for k in official)
    assert any(k.startswith("proj_out_lora.") for k in official)
    cfg = wan_config(dim=128, num_layers=2, ffn_dim=256) if family == "wan" else hunyuan_config(hidden=128)
    fresh = add_detail_expert(build_transformer(family, cfg, seed=99), rank=4, alpha=8)
    fresh.load_state_dict(official, strict=True)
    for k, v in tr.student_unwrapped.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    adapter_cfg = json.loads((run / "export" / "transformer" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    # 2. pack-native files through dcm_core.formats
    from dcm_core.formats import diffusers_to_comfy, inspect_file, load_experts

    assert inspect_file(res.exported["transformer"]).kind == "official_dcm"
    assert inspect_file(res.exported["semantic"]).kind == "dcm_semantic"
    assert inspect_file(res.exported["detail_expert"]).kind == "dcm_detail_expert"
    bundle = load_experts(res.exported["semantic"])
    assert bundle.family == family and bundle.detail.patches and bundle.detail.expected_targets
    ref = diffusers_to_comfy(family, semantic_state_dict(official))
    strip = lambda k: k.split("diffusion_model.", 1)[-1]  # noqa: E731
    ours = {strip(k): v for k, v in bundle.semantic_sd.items()}
    assert {strip(k) for k in ref} == set(ours)
    assert all(torch.equal(ours[strip(k)], v) for k, v in ref.items())
    # 3. `python -m dcm_core export RUN_DIR` rebuilds the same files from the checkpoint
    from dcm_core.cli import main

    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0
    again = load_file(str(tmp_path / "again" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert again.keys() == official.keys() and all(torch.equal(again[k], official[k]) for k in official)
    assert (tmp_path / "again" / "dcm_detail_expert.safetensors").is_file()


def test_semantic_run_feeds_the_detail_stage(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "wan")
    sem = tmp_path / "sem"
    DCMTrainer(th.tiny_config("wan", "semantic", data, sem, optim__lr=1e-3)).train()
    semantic = load_file(str(sem / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any("lora" in k for k in semantic)
    tr = DCMTrainer(th.tiny_config("wan", "detail", data, tmp_path / "det", model__semantic_expert=str(sem)))
    base = semantic_state_dict(tr.student_unwrapped.state_dict())
    assert all(torch.equal(base[k], semantic[k]) for k in semantic)
    # the teacher is the ORIGINAL model, not the semantic expert
    teacher = tr.models.teacher.state_dict()
    assert not torch.equal(teacher["proj_out.weight"], semantic["proj_out.weight"])


def test_failed_export_leaves_no_partial_output(tmp_path, th, monkeypatch):
    data = th.make_dataset(tmp_path / "data", "wan")
    run = tmp_path / "run"
    DCMTrainer(th.tiny_config("wan", "detail", data, run, export__at_end="false")).train()
    import dcm_core.formats as formats

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(formats, "convert_official", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run)
    assert not (run / "export").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("where", ["transformer", "native"])
def test_write_errors_become_a_dcm_write_error_naming_the_folder(tmp_path, th, monkeypatch, where):
    """safetensors' own SafetensorError (its text carries the OS error) while writing the transformer file, or
    the converter's DCMWriteError for the pack-native pair: a DCMWriteError (also an OSError) naming the output
    folder, with the errno; a previous export stays untouched."""
    import errno

    import safetensors.torch as st_torch
    from safetensors import SafetensorError

    import dcm_core.convert as conv
    from dcm_core.errors import DCMError, DCMWriteError

    data = th.make_dataset(tmp_path / "data", "wan")
    run = tmp_path / "run"
    DCMTrainer(th.tiny_config("wan", "detail", data, run)).train()  # exports at the end
    before = {p.relative_to(run / "export"): p.read_bytes() for p in (run / "export").rglob("*") if p.is_file()}
    if where == "transformer":
        def fail(*a, **k):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(st_torch, "save_file", fail)
    else:
        def fail(*a, **k):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        monkeypatch.setattr(conv, "StreamingWriter", fail)
    with pytest.raises(DCMWriteError) as ei:
        export_run(run)
    e = ei.value
    assert isinstance(e, DCMError) and isinstance(e, OSError)
    assert e.errno == (errno.ENOSPC if where == "transformer" else errno.EDQUOT)
    msg = str(e)
    assert msg.startswith(f"{run / 'export'}: cannot write the export (")
    assert ("No space left" if where == "transformer" else "Disk quota exceeded") in msg
    assert "previous export there is unchanged" in msg and "--out" in msg
    after = {p.relative_to(run / "export"): p.read_bytes() for p in (run / "export").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_semantic_lora_export_from_the_checkpoint_merges_without_a_copy(tmp_path, th, monkeypatch):
    """`python -m dcm_core export` of a semantic-LoRA run merges the LoRA into the student it rebuilt (no deep copy
    of the model: one fp32 copy in memory) and writes the same file as the end-of-training export (which merges a
    copy of the live student)."""
    import copy

    from dcm_core.train import models as train_models

    data = th.make_dataset(tmp_path / "data", "wan", n=2)
    run = tmp_path / "run"
    res = DCMTrainer(th.tiny_config("wan", "semantic", data, run, max_train_steps=1, model__semantic_lora="true",
                                    model__semantic_lora_rank=4, optim__lr=1e-3)).train()
    deep = copy.deepcopy

    def no_model_copies(obj, *a, **k):
        assert not isinstance(obj, torch.nn.Module), "export deep-copied the model"
        return deep(obj, *a, **k)

    monkeypatch.setattr(train_models.copy, "deepcopy", no_model_copies)
    again = export_run(run, out_dir=tmp_path / "again")
    a, b = load_file(res.exported["transformer"]), load_file(again["transformer"])
    assert not any("lora" in k for k in b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
