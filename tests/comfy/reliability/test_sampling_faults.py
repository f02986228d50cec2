"""Faults during sampling, in real ComfyUI through API prompts (execution.PromptExecutor):

* cancel storm: Cancel after every step in turn (a progress hook like main.py's hijack_progress) and
  inside every model call in turn; each cancelled run is followed by an uninterrupted run that must be
  bit-identical to the reference, and the shared BaseModel must hold exactly the semantic weights
  with no detail-LoRA hook left;
* an exception inside a model call (every call of the detail segment, and of the semantic one)
  reaches the user as an ``execution_error``; same recovery checks;
* NaN / Inf produced by a model call is reported with the step and the expert; same recovery checks;
* inputs refused before any model work (hypothesis): wrong latent channel count (a non-empty latent:
  ComfyUI itself adapts an all-zero latent's channels, and a 4-D latent to a 1-frame video), a batch the
  conditioning cannot broadcast to, empty / non-descending / out-of-range sigmas, a boundary outside
  (0, 1000), NaN / Inf in the latent — the model-call counter stays at 0.
"""

from __future__ import annotations

import math
import re

import pytest
import rel_registry as R
import torch
from hypothesis import given
from hypothesis import strategies as st

CAT_CANCEL = "cancel storm"
CAT_EXC = "exception in a model call"
CAT_REFUSED = "refused inputs"
CAT_NAN = "NaN/Inf during sampling"

FAMILIES = ["wan", "hunyuan_video"]
SEED = 21


# --------------------------------------------------------------------------- helpers


def _prompt(dcm, family, *, seed=SEED, latent=None, sigmas=None, batch=1, cond_batch=1, boundary=None, cfg=(1.0, 1.0),
            path="sampler"):
    """DCMCheckpointLoader -> DCMRelFault x2 -> DCMDualExpertSampler (path 'sampler') or DCMDualExpertGuider +
    SamplerCustomAdvanced (path 'guider') -> DCMTestCapture."""
    p = dcm.sampler_prompt(family, seed=seed, batch=batch, cond_batch=cond_batch, boundary=boundary, cfg=cfg)
    p["30"] = {"class_type": "DCMRelFault", "inputs": {"model": ["1", 0], "tag": "semantic"}}
    p["31"] = {"class_type": "DCMRelFault", "inputs": {"model": ["1", 1], "tag": "detail"}}
    p["5"]["inputs"]["semantic_model"] = ["30", 0]
    p["5"]["inputs"]["detail_model"] = ["31", 0]
    if latent is not None:
        p["32"] = {"class_type": "DCMRelLatent", "inputs": latent}
        p["5"]["inputs"]["latent_image"] = ["32", 0]
    if sigmas is not None:
        p["33"] = {"class_type": "DCMRelSigmas", "inputs": {"values": sigmas}}
        p["5"]["inputs"]["sigmas"] = ["33", 0]
    if path == "guider":
        fam = dcm.families[family]
        si = p.pop("5")["inputs"]
        p["10"] = {"class_type": "DCMDualExpertGuider", "inputs": {
            "semantic_model": si["semantic_model"], "detail_model": si["detail_model"], "positive": si["positive"],
            "negative": si["negative"], "boundary_timestep": si["boundary_timestep"], "cfg_semantic": cfg[0],
            "cfg_detail": cfg[1]}}
        if "sigmas" not in si:
            p["11"] = {"class_type": "DCMSchedule", "inputs": {"preset": fam.preset, "semantic_steps": 3, "detail_steps": 3,
                                                              "steps": 6, "boundary_timestep": fam.boundary, "custom_sigmas": ""}}
        p["12"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        p["13"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
        p["14"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["13", 0], "guider": ["10", 0], "sampler": ["12", 0], "sigmas": si.get("sigmas", ["11", 0]),
            "latent_image": si["latent_image"]}}
        p["6"]["inputs"]["samples"] = ["14", 0]
    return p


def _split(dcm, family):
    """(semantic steps, detail steps) of the family's default preset."""
    from dcm_core.schedule import build_sigmas, split_sigmas

    fam = dcm.families[family]
    sig = build_sigmas(fam.preset)
    sem, det = split_sigmas(sig, fam.boundary)
    return len(sem) - 1, len(det) - 1, sig


_REF_WEIGHTS: dict = {}


def _assert_unpatched(dcm, family):
    """Once ComfyUI loads the semantic clone (as the next run does), the shared BaseModel holds exactly
    the semantic expert: every weight equal to the file's, and no forward hook left on any module."""
    import comfy.model_management

    from dcm_core.formats import load_experts

    fam = dcm.families[family]
    semantic, _ = dcm.loading().load_dcm_checkpoint(fam.official, "default")
    comfy.model_management.load_models_gpu([semantic])
    base = semantic.model
    hooks = [n for n, m in base.diffusion_model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, f"forward hooks left on {hooks[:4]}"
    if family not in _REF_WEIGHTS:
        _REF_WEIGHTS[family] = load_experts(dcm.h.model_dir("diffusion_models") / fam.official, dtype=torch.float32).semantic_sd
    ref = _REF_WEIGHTS[family]
    sd = base.diffusion_model.state_dict()
    assert set(sd) == set(ref)
    bad = [k for k in ref if not torch.equal(sd[k].float(), ref[k].float())]
    assert not bad, f"{len(bad)} weights are not the semantic expert's, e.g. {bad[:3]}"


def _events(res):
    return [ev for ev, _ in res.messages]


def _error(res) -> dict:
    for ev, data in res.messages:
        if ev == "execution_error":
            return data
    raise AssertionError(f"no execution_error in {_events(res)}")


@pytest.fixture(scope="module")
def reference(dcm, faults):
    """Uninterrupted output per family (and cfg)."""
    cache = {}

    def get(family, cfg=(1.0, 1.0), seed=SEED):
        key = (family, cfg, seed)
        if key not in cache:
            faults.reset()
            cache[key] = dcm.run(_prompt(dcm, family, cfg=cfg, seed=seed))
        return cache[key]

    return get


def _recover(dcm, comfy, faults, reference, family, cfg=(1.0, 1.0), seed=SEED):
    """After a failed / cancelled run: unpatched weights, and the next clean run equals the reference."""
    from comfy import model_management as mm

    assert not mm.processing_interrupted()
    _assert_unpatched(dcm, family)
    faults.reset()
    again = dcm.run(_prompt(dcm, family, cfg=cfg, seed=seed))
    assert torch.equal(again, reference(family, cfg, seed)), "the run after the fault is not bit-identical to the reference"
    _assert_unpatched(dcm, family)


# --------------------------------------------------------------------------- cancel storm


def _families():
    return FAMILIES if R.FULL else ["wan"]



def _cfgs():
    return [(1.0, 1.0), (2.0, 1.5)] if R.FULL else [(1.0, 1.0)]


@pytest.mark.parametrize("seed", [SEED] + ([7, 123456] if R.FULL else []))
@pytest.mark.parametrize("cfg", _cfgs(), ids=lambda c: f"cfg{c[0]:g}-{c[1]:g}")
@pytest.mark.parametrize("family", _families())  # make test: Wan; make reliability: both families
def test_cancel_storm_progress_hook(dcm, comfy, faults, reference, family, cfg, seed):
    """Cancel after step k for every k (hijack_progress-style hook), then a clean run: bit-identical."""
    from comfy import model_management as mm
    from comfy import utils as comfy_utils

    n_sem, n_det, _ = _split(dcm, family)
    total = n_sem + n_det
    reference(family, cfg, seed)
    for k in range(total):
        seen = []

        def hook(value, tot, preview, prompt_id=None, node_id=None):
            seen.append(value)
            if value == k + 1:
                mm.interrupt_current_processing()
            mm.throw_exception_if_processing_interrupted()

        label = f"{family}: Cancel after step k (progress hook), every k" + (", cfg > 1" if cfg != (1.0, 1.0) else "")
        with R.case(CAT_CANCEL, label):
            faults.reset()
            comfy_utils.set_progress_bar_global_hook(hook)
            try:
                res = comfy.run(_prompt(dcm, family, cfg=cfg, seed=seed))
            finally:
                comfy_utils.set_progress_bar_global_hook(None)
                mm.interrupt_current_processing(False)
            assert not res.success and "execution_interrupted" in _events(res), _events(res)
            if cfg == (1.0, 1.0):  # one model call per step (with cfg > 1 ComfyUI may split cond / uncond)
                assert faults.count() == k + 1, f"{faults.count()} model calls for a cancel after step {k}"
            assert seen[-1] == k + 1
            _recover(dcm, comfy, faults, reference, family, cfg, seed)


@pytest.mark.parametrize("family", _families())
def test_cancel_storm_inside_model_call(dcm, comfy, faults, reference, family):
    """Cancel raised *inside* model call j (mid-step, LoRA hooks live on the detail segment), every j."""
    n_sem, n_det, _ = _split(dcm, family)
    reference(family)
    for j in range(n_sem + n_det):
        tag, idx = ("semantic", j) if j < n_sem else ("detail", j - n_sem)
        with R.case(CAT_CANCEL, f"{family}: Cancel inside model call j, every j"):
            faults.reset(**{tag: ("interrupt", idx)})
            try:
                res = comfy.run(_prompt(dcm, family))
            finally:
                from comfy import model_management as mm

                mm.interrupt_current_processing(False)
            assert not res.success and "execution_interrupted" in _events(res), _events(res)
            assert faults.count() == j + 1
            _recover(dcm, comfy, faults, reference, family)


# --------------------------------------------------------------------------- exceptions and NaN inside model calls


@pytest.mark.parametrize("family", FAMILIES)
def test_exception_in_model_call(dcm, comfy, faults, reference, family):
    """An exception in any detail-segment call (and any semantic one) -> execution_error; clean rerun."""
    n_sem, n_det, _ = _split(dcm, family)
    reference(family)
    plan = [("detail", i) for i in range(n_det)] + ([("semantic", i) for i in range(n_sem)] if R.FULL else [("semantic", 0)])
    for tag, idx in plan:
        with R.case(CAT_EXC, f"exception raised in a {tag}-segment model call"):
            faults.reset(**{tag: ("raise", idx)})
            res = comfy.run(_prompt(dcm, family))
            assert not res.success
            err = _error(res)
            assert err["node_type"] == "DCMDualExpertSampler", err
            assert "InjectedFault" in err["exception_type"], err
            assert f"injected fault in {tag} model call {idx}" in err["exception_message"], err
            _recover(dcm, comfy, faults, reference, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_nan_inf_produced_during_sampling(dcm, comfy, faults, reference, family):
    """A model call returning NaN / Inf at step k -> DCMSamplingError naming step k and the expert."""
    n_sem, n_det, sig = _split(dcm, family)
    reference(family)
    steps = range(n_sem + n_det) if R.FULL else [0, n_sem]
    for k in steps:
        tag, idx = ("semantic", k) if k < n_sem else ("detail", k - n_sem)
        for mode in ("nan", "inf") if R.FULL else ("nan" if k == 0 else "inf",):
            with R.case(CAT_NAN, f"{mode} returned by a model call at step k"):
                faults.reset(**{tag: (mode, idx)})
                res = comfy.run(_prompt(dcm, family))
                assert not res.success
                err = _error(res)
                assert "DCMSamplingError" in err["exception_type"], err
                msg = err["exception_message"]
                m = re.search(rf"step {k} \({tag} expert, sigma=([0-9.e-]+)\)", msg)
                assert m and abs(float(m.group(1)) - sig[k]) < 1e-3, msg
                assert "NaN" in msg or "Inf" in msg, msg
                assert faults.count() == k + 1, "sampling went on after the NaN"
                assert not any(isinstance(v, dict) for v in res.outputs.values() if v), res.outputs
                _recover(dcm, comfy, faults, reference, family)


# --------------------------------------------------------------------------- refused before any model work


def _latent(batch=1, channels=16, frames=2, height=4, width=4, ndim=5, fill="randn", bad=1, seed=0):
    return dict(batch=batch, channels=channels, frames=frames, height=height, width=width, ndim=ndim, fill=fill, bad=bad, seed=seed)


def _descending_violation(xs):
    return any(not a > b for a, b in zip(xs, xs[1:]))


bad_sigmas = st.one_of(
    st.just(""),
    st.floats(0, 1).map(lambda x: f"{x}"),
    st.lists(st.floats(0, 1), min_size=2, max_size=8).filter(_descending_violation).map(lambda xs: ", ".join(map(str, xs))),
    st.lists(st.floats(0, 1), min_size=1, max_size=6).map(lambda xs: ", ".join(map(str, sorted(xs, reverse=True) + [1.5]))),
    st.lists(st.floats(0, 1), min_size=1, max_size=6).map(lambda xs: ", ".join(map(str, [1.0] + sorted(xs, reverse=True) + [-0.5]))),
    st.sampled_from(["1.0, nan, 0.0", "inf, 0.5, 0", "1.0, 0.5, 0.5, 0.0", "0.0, 1.0"]),
)


def _sigma_error(text: str) -> str:
    """The message a refused sigma list must carry, from the list as the sampler sees it (float32, as
    DCMRelSigmas makes it): too short, then the first value outside [0, 1], then the first non-descending pair."""
    vals = torch.tensor([float(v) for v in text.replace(",", " ").split()], dtype=torch.float32).tolist()
    if len(vals) < 2:
        return rf"the sigma list has {len(vals)} value\(s\).*it needs at least two"
    for i, x in enumerate(vals):
        if not math.isfinite(x) or not 0.0 <= x <= 1.0 + 1e-4:
            return rf"sigma #{i} = \S+ is outside \[0, 1\]"
    i = next(i for i in range(len(vals) - 1) if not vals[i] > vals[i + 1])
    return rf"sigmas must be strictly descending, but sigma #{i} = \S+ is followed by #{i + 1}"


bad_input = st.one_of(
    st.tuples(st.just("channels"), st.sampled_from([1, 3, 4, 8, 12, 15, 17, 20, 32, 36, 48])),
    st.tuples(st.just("batch"), st.tuples(st.integers(1, 5), st.integers(2, 5)).filter(lambda bc: bc[0] % bc[1] != 0)),
    st.tuples(st.just("sigmas"), bad_sigmas),
    st.tuples(st.just("boundary"), st.one_of(st.floats(-1e6, 0.0), st.floats(1000.0, 1e6), st.sampled_from([0.0, 1000.0, -0.0]))),
    st.tuples(st.just("nan_latent"), st.tuples(st.sampled_from(["nan", "inf"]), st.integers(1, 50))),
)


@R.settings(short=14, full=600)
@given(family=st.sampled_from(FAMILIES), case=bad_input, path=st.sampled_from(["sampler", "guider"]))
def test_refused_before_any_model_work(dcm, comfy, faults, family, case, path):
    kind, v = case
    kw: dict = {}
    want = {
        "channels": r"latent_image has shape \[1, \d+, 2, 4, 4\].*expects \[batch, 16",
        "batch": r"batch \d+ but the latent has batch \d+",
        "sigmas": None,  # depends on the list: see _sigma_error
        "boundary": r"outside \(0, 1000\)",
        "nan_latent": r"latent_image contains \d+ NaN/Inf",
    }[kind]
    if kind == "channels":
        kw["latent"] = _latent(channels=v)
    elif kind == "batch":
        kw.update(batch=v[0], cond_batch=v[1])
    elif kind == "sigmas":
        kw["sigmas"] = v
        want = _sigma_error(v)
    elif kind == "boundary":
        kw["boundary"] = v
    else:
        kw["latent"] = _latent(fill=v[0], bad=v[1])
    with R.case(CAT_REFUSED, f"refused before model work: {kind}"):
        faults.reset()
        res = comfy.run(_prompt(dcm, family, path=path, **kw), check_valid=False)
        assert not res.success
        if res.node_errors:  # refused at prompt validation (widget range): nothing executed at all
            text = str(res.node_errors)
        else:
            err = _error(res)
            nodes_ok = {"sampler": ("DCMDualExpertSampler",), "guider": ("DCMDualExpertGuider", "SamplerCustomAdvanced")}[path]
            assert err["node_type"] in nodes_ok, err
            assert re.search(r"DCM(Sampling|Schedule)Error", err["exception_type"]), err
            text = err["exception_message"]
            assert text.startswith(("DCM Dual-Expert Sampler:", "DCM Dual-Expert Guider:")), text
        assert re.search(want, text, re.S), (want, text)
        assert faults.count() == 0, f"{faults.count()} model call(s) before the input was refused"
