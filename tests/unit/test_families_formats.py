"""The families artists use (Wan2.1 T2V / I2V, Wan2.2 TI2V-5B, Wan2.2 A14B high/low) in the formats layer:
``inspect`` / ``convert`` / the loaders say family, base, task, role, boundary and preset, from metadata or from
the tensor shapes, and refuse an expert on the wrong model with the named error and the fix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcm_core import families as fm
from dcm_core import tiny
from dcm_core.cli import main as cli_main
from dcm_core.errors import DCMFormatError, DCMIncompatibleModelError, DCMUnsupportedFileError
from dcm_core.formats import DetailExpert, FileInfo, check_compatible, convert_official, inspect_file, load_experts

RANK, ALPHA = 4, 8.0
#: tiny stand-ins with each base's channel layout (width 128, one block)
SHAPES = {
    "t2v": dict(),
    "i2v14": dict(in_channels=36, image_dim=1280),  # Wan2.1 I2V: mask + image latent, CLIP image embedder
    "i2v_a14b": dict(in_channels=36),  # Wan2.2 I2V A14B: mask + image latent, no image embedder
    "ti2v5b": dict(in_channels=48, out_channels=48),  # Wan2.2 TI2V 5B: 48-channel Wan2.2 VAE latent
}


def _official(tmp_path, shape: str, meta: dict | None = None, seed: int = 3):
    model = tiny.make_official_model("wan", tiny.wan_config(num_layers=1, **SHAPES[shape]), rank=RANK, alpha=ALPHA, seed=seed)
    return tiny.save_official_checkpoint(
        model, tmp_path / f"{shape}_official.safetensors", metadata={"lora_alpha": str(ALPHA), **(meta or {})}
    )


def _relabel(path, **meta):
    """Rewrite a file's metadata (what an edited / other-made file looks like)."""
    sd = load_file(str(path))
    from dcm_core.formats import read_header

    old = dict(read_header(path).metadata)
    old.update(meta)
    save_file(sd, str(path), metadata={k: v for k, v in old.items() if v is not None})


def test_bases_from_real_shapes():
    """Released sizes pick the base; Wan2.1 14B T2V and each Wan2.2 A14B transformer share every shape."""
    assert fm.bases_for("wan", dict(in_dim=16, out_dim=16, dim=1536, num_layers=30)) == ("wan2.1-t2v-1.3b",)
    assert fm.bases_for("wan", dict(in_dim=16, out_dim=16, dim=5120, num_layers=40)) == ("wan2.1-t2v-14b", "wan2.2-t2v-a14b")
    assert fm.bases_for("wan", dict(in_dim=36, out_dim=16, dim=5120, num_layers=40, image_dim=1280)) == ("wan2.1-i2v-14b",)
    assert fm.bases_for("wan", dict(in_dim=36, out_dim=16, dim=5120, num_layers=40)) == ("wan2.2-i2v-a14b",)
    assert fm.bases_for("wan", dict(in_dim=48, out_dim=48, dim=3072, num_layers=30)) == ("wan2.2-ti2v-5b",)
    assert fm.task_from_dims("wan", dict(in_dim=48, out_dim=48)) == "ti2v"
    assert fm.task_from_dims("wan", dict(in_dim=36, out_dim=16)) == "i2v"
    assert fm.task_from_dims("wan", dict(in_dim=20, out_dim=16)) is None
    assert fm.resolve_boundary("wan2.2-i2v-a14b (900)", 978.0) == 900.0
    assert fm.resolve_boundary("manual", 950.0) == 950.0


@pytest.mark.parametrize(
    "shape,task,base,variant",
    [
        ("t2v", "t2v", None, "t2v"),
        ("i2v14", "i2v", "wan2.1-i2v-14b", "i2v"),
        ("i2v_a14b", "i2v", "wan2.2-i2v-a14b", "i2v"),
        ("ti2v5b", "ti2v", "wan2.2-ti2v-5b", "ti2v"),
    ],
)
def test_shapes_alone_give_task_and_base(tmp_path, shape, task, base, variant):
    """No dcm.* family metadata: the task comes from patch_embedding's input channels / img_emb, the base when
    only one fits; convert carries both onto the two files."""
    info = inspect_file(_official(tmp_path, shape))
    assert (info.task, info.base, info.variant) == (task, base, variant)
    res = convert_official(info.path, tmp_path / "out", dtype="fp32", name=shape, progress=False)
    for p in (res.semantic_path, res.detail_path):
        got = inspect_file(p)
        assert (got.task, got.base, got.variant) == (task, base, variant)
        assert got.metadata["dcm.task"] == task and got.metadata.get("dcm.base") == base


def test_a14b_export_metadata_survives_convert_and_shows_in_inspect(tmp_path, capsys):
    """A trainer export of the Wan2.2 I2V A14B low-noise detail expert: base, expert base, the base's own
    boundary (900) and the per-expert-uniform preset reach both files and ``inspect``'s output."""
    src = _official(tmp_path, "i2v_a14b", {"dcm.base": "wan2.2-i2v-a14b", "dcm.expert_base": "low_noise", "dcm.task": "i2v"})
    info = inspect_file(src)
    assert (info.boundary_timestep, info.schedule, info.expert_base) == (900.0, "per-expert-uniform", "low_noise")
    res = convert_official(src, tmp_path / "out", dtype="fp32", name="a14b_low", progress=False)
    assert cli_main(["inspect", str(res.detail_path)]) == 0
    out = capsys.readouterr().out
    for line in ("kind:       dcm_detail_expert", "role:       detail_expert", "task:       i2v",
                 "base:       Wan2.2 I2V A14B (wan2.2-i2v-a14b)", "expert of:  low_noise", "boundary:   900",
                 "preset:     per-expert-uniform"):
        assert line in out, out
    meta = inspect_file(res.semantic_path).metadata
    assert (meta["dcm.boundary_timestep"], meta["dcm.expert_base"], meta["dcm.schedule"]) == ("900", "low_noise", "per-expert-uniform")


def test_convert_prints_task_and_base(tmp_path, capsys):
    src = _official(tmp_path, "ti2v5b")
    assert cli_main(["convert", str(src), "--out-dir", str(tmp_path / "o"), "--dtype", "fp32", "--no-progress"]) == 0
    assert "task ti2v; base Wan2.2 TI2V 5B (wan2.2-ti2v-5b)" in capsys.readouterr().out


def test_ambiguous_shapes_list_every_base(tmp_path):
    """A plain 14B-shaped Wan without metadata could be Wan2.1 T2V 14B or either A14B transformer: inspect says so."""
    info = FileInfo(path="x", kind="base_model", family="wan", dims={}, bases=("wan2.1-t2v-14b", "wan2.2-t2v-a14b"), task="t2v")
    assert "one of wan2.1-t2v-14b, wan2.2-t2v-a14b" in info.describe()


# --------------------------------------------------------------------------- refusals


def _pair(tmp_path, shape, meta=None, name=None, seed=3):
    src = _official(tmp_path, shape, meta, seed=seed)
    return convert_official(src, tmp_path / (name or shape), dtype="fp32", name=name or shape, progress=False)


def _shapes(path):
    from dcm_core.formats import read_header

    return {"diffusion_model." + k: v for k, v in read_header(path).shapes.items()}


def _detail(path):
    from dcm_core.formats import load_detail_expert

    return load_detail_expert(path)


def test_refuses_i2v_expert_on_t2v_model(tmp_path):
    """Wan2.2 I2V A14B's expert patches no layer a T2V model lacks (no image embedder): only the task check
    stops it from loading silently onto the wrong model."""
    i2v, t2v = _pair(tmp_path, "i2v_a14b"), _pair(tmp_path, "t2v")
    with pytest.raises(DCMIncompatibleModelError, match=r"is a i2v DCM expert .* is a t2v model \(16 input channels.*WanImageToVideo"):
        check_compatible(_detail(i2v.detail_path), _shapes(t2v.semantic_path), name="t2v.safetensors")
    with pytest.raises(DCMIncompatibleModelError, match=r"is a t2v DCM expert .* is a i2v model \(36 input channels"):
        check_compatible(_detail(t2v.detail_path), _shapes(i2v.semantic_path), name="i2v.safetensors")


def test_refuses_wan21_i2v_expert_on_t2v_model(tmp_path):
    i2v, t2v = _pair(tmp_path, "i2v14"), _pair(tmp_path, "t2v")
    with pytest.raises(DCMIncompatibleModelError, match=r"Wan2.1 I2V 14B \(wan2.1-i2v-14b\)\) but t2v.safetensors is a t2v"):
        check_compatible(_detail(i2v.detail_path), _shapes(t2v.semantic_path), name="t2v.safetensors")


def test_refuses_5b_expert_on_14b_model():
    """Real sizes, shapes only: a Wan2.2 TI2V 5B expert (48 channels, dim 3072) on a Wan 14B model."""
    d14 = 5120
    model = {
        "head.modulation": (1, 2, d14), "blocks.0.ffn.0.weight": (13824, d14), "patch_embedding.weight": (d14, 16, 1, 2, 2),
        "head.head.weight": (64, d14), "text_embedding.0.weight": (d14, 4096), "time_embedding.0.weight": (d14, 256),
    }
    info = FileInfo(path="dcm_ti2v_5b_detail_expert.safetensors", kind="dcm_detail_expert", family="wan",
                    task="ti2v", base="wan2.2-ti2v-5b")
    expert = DetailExpert(info=info, family="wan", patches={}, expected_targets=frozenset(),
                          dims=dict(dim=3072, num_layers=30, in_dim=48, out_dim=48))
    with pytest.raises(DCMIncompatibleModelError, match=r"Wan2.2 TI2V 5B .* is a t2v model \(16 input channels, 16 latent.*Wan22ImageToVideoLatent"):
        check_compatible(expert, model, name="wan2.2_t2v_high_noise_14B.safetensors")


def test_refuses_low_noise_detail_expert_paired_with_high_noise_semantic(tmp_path):
    """An A14B semantic file (high-noise) whose metadata names a low-noise detail expert as partner: the DCM
    loader would apply the low-noise expert onto the high-noise model. Refused with what to connect where."""
    meta = {"dcm.base": "wan2.2-t2v-a14b"}
    low = _pair(tmp_path, "t2v", {**meta, "dcm.expert_base": "low_noise"}, name="a14b")
    _relabel(low.semantic_path, **{"dcm.expert_base": "high_noise"})
    assert inspect_file(low.semantic_path).expert_base == "high_noise"
    with pytest.raises(DCMIncompatibleModelError, match=r"low-noise transformer; it applies onto the stock low-noise model .*DCM Expert LoRA Loader"):
        load_experts(low.semantic_path)
    # the same pair labelled consistently loads
    _relabel(low.semantic_path, **{"dcm.expert_base": "low_noise"})
    assert load_experts(low.semantic_path).detail.info.expert_base == "low_noise"


def test_refuses_expert_of_another_base(tmp_path):
    detail = _detail(_pair(tmp_path, "t2v", {"dcm.base": "wan2.2-t2v-a14b", "dcm.expert_base": "low_noise"}).detail_path)
    model = FileInfo(path="m", kind="dcm_semantic", family="wan", base="wan2.1-t2v-14b", task="t2v")
    with pytest.raises(DCMIncompatibleModelError, match=r"made for Wan2.2 T2V A14B .* is Wan2.1 T2V 14B"):
        check_compatible(detail, _shapes(_pair(tmp_path, "t2v", name="other").semantic_path), model_info=model)


@pytest.mark.parametrize(
    "shape,meta,err,match",
    [
        ("t2v", {"dcm.task": "i2v"}, DCMFormatError, r"metadata says a i2v model but the tensors are t2v"),
        ("t2v", {"dcm.task": "v2v"}, DCMFormatError, r"dcm.task='v2v' is not one of"),
        ("t2v", {"dcm.base": "wan9-t2v"}, DCMUnsupportedFileError, r"does not know .*Update the DCM custom nodes"),
        ("t2v", {"dcm.base": "wan2.1-i2v-14b"}, DCMFormatError, r"is a i2v base but the file is a t2v model"),
        ("i2v_a14b", {"dcm.base": "wan2.1-i2v-14b"}, DCMFormatError, r"does not match the tensors \(36 input channels\)"),
        ("t2v", {"dcm.base": "wan2.1-t2v-1.3b", "dcm.expert_base": "high_noise"}, DCMFormatError, r"has one transformer"),
        ("t2v", {"dcm.expert_base": "middle"}, DCMFormatError, r"dcm.expert_base='middle' is not one of"),
    ],
)
def test_mislabelled_files_are_refused_on_inspect(tmp_path, shape, meta, err, match):
    with pytest.raises(err, match=match):
        inspect_file(_official(tmp_path, shape, meta))


def test_detail_file_whose_dims_lie_about_the_image_embedder(tmp_path):
    res = _pair(tmp_path, "i2v14")
    import json

    from dcm_core.formats import read_header

    dims = json.loads(read_header(res.detail_path).metadata["dcm.dims"])
    dims.pop("image_dim")
    _relabel(res.detail_path, **{"dcm.dims": json.dumps(dims)})
    with pytest.raises(DCMFormatError, match=r"has no image embedder, but the file patches img_emb"):
        inspect_file(res.detail_path)


def test_expert_files_keep_float_tensors(tmp_path):
    """Sanity: the converted TI2V expert patches the 48-channel head (the detail expert's proj_out copy)."""
    res = _pair(tmp_path, "ti2v5b")
    det = _detail(res.detail_path)
    assert det.patches["diffusion_model.head.head.diff"].shape[0] == 48 * 4
    assert all(t.dtype == torch.float32 for t in det.patches.values())


def test_a14b_high_noise_semantic_without_partner_points_to_the_two_model_wiring(tmp_path):
    """The A14B semantic expert (high-noise) has no detail partner of its own: the DCM loader says how to wire the
    pair instead of a generic 'no detail expert named' error."""
    res = _pair(tmp_path, "i2v_a14b", {"dcm.base": "wan2.2-i2v-a14b", "dcm.expert_base": "high_noise"}, name="hi")
    _relabel(res.semantic_path, **{"dcm.detail_expert": None})
    with pytest.raises(DCMUnsupportedFileError, match=r"high-noise transformer .*UNETLoader\) as semantic_model.*boundary preset 900"):
        load_experts(res.semantic_path)
