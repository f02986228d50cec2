"""The pack's ComfyUI compatibility surface (tools/comfy_surface.py, dcm_core/comfy_adapter/compat_surface.json).

Runs without ComfyUI: the pack's source is parsed with ``ast`` and every ComfyUI reference (imports, attribute
chains, calls with their arguments, ``super()`` calls and overrides in subclasses of ComfyUI classes, calls of the
listed ComfyUI methods) must resolve and bind in every recorded ComfyUI version: a125cd84 (the pinned work tree)
and the newest file versions readable by commit. A reference meant for some versions only carries
``# comfy-probe: <reason>`` (on its line or on the first line of an enclosing ``if``/``try``/``def``) and must then
work in at least one version; references into files with no readable newer version must be listed under
``accepted_unverifiable`` with a reason.
"""

from __future__ import annotations

import json
import re

from tools import comfy_surface as cs

SURFACE = cs.load_surface()
METHODS = cs.method_names(SURFACE)


def problems_of(source: str) -> list[str]:
    """What the checker reports for a synthetic piece of pack source."""
    return cs.check(cs.scan_source(source, "snippet.py", METHODS), SURFACE)


def test_pack_references_resolve_and_bind_in_every_recorded_comfyui_version():
    refs = cs.scan_pack(cs.ROOT, METHODS)
    assert any(r.kind == "import" for r in refs), "the scan found no ComfyUI import: the scanner is broken"
    problems = cs.check(refs, SURFACE)
    assert not problems, (
        f"{len(problems)} ComfyUI reference(s) do not hold:\n  " + "\n  ".join(problems)
        + f"\nIf the pack's references changed, refresh the facts: {cs.REFRESH}\n(then .venv/bin/python "
        "tools/comfy_surface.py --check)"
    )


def test_surface_records_a_commit_per_file_and_a_reason_per_unavailable_file():
    versions = SURFACE["versions"]
    assert {"a125cd84", "newer"} <= set(versions)
    assert versions["a125cd84"]["commit"].startswith("a125cd84")
    for label, v in versions.items():
        assert v["files"], label
        for path, commit in v["files"].items():
            assert re.fullmatch(r"[0-9a-f]{40}", commit), (label, path, commit)
        for path, why in v["unavailable"].items():
            assert len(why) > 20, (label, path)
        for mod, m in v["modules"].items():
            assert ("unavailable" in m) != ("commit" in m), (label, mod)
    for key, why in SURFACE["accepted_unverifiable"].items():
        assert len(why) > 40, f"accepted_unverifiable[{key!r}] needs a reason"
    for m in SURFACE["methods"]:
        assert set(m) == {"class", "method"}, m


def test_surface_holds_facts_not_code():
    allowed = {"kind", "params", "binding", "async", "bases", "members", "decorators", "alternatives", "target",
               "targets", "synthesized", "property", "all_members", "members_partial"}

    def walk(fact, where):
        assert set(fact) <= allowed, (where, set(fact) - allowed)
        for name, kind, has_default in fact.get("params", []):
            assert re.fullmatch(r"\w+", name) and kind.isupper() and isinstance(has_default, bool), where
        for n, f in fact.get("members", {}).items():
            walk(f, f"{where}.{n}")

    for label, v in SURFACE["versions"].items():
        for mod, m in v["modules"].items():
            for n, f in m.get("names", {}).items():
                walk(f, f"{label}:{mod}.{n}")


# --------------------------------------------------------------------------- the checker fails when it should

BASE = "import comfy.sd\nimport comfy.samplers\nfrom comfy_api.v0_0_2 import io\n"


def test_a_call_with_an_argument_comfyui_does_not_take_is_reported_for_every_version():
    found = problems_of(BASE + "def f(sd):\n    return comfy.sd.load_diffusion_model_state_dict(sd, bogus=1)\n")
    print("\n".join(found))
    assert len(found) == 2, found  # a125cd84 and the newer file version
    for label in ("a125cd84", "newer"):
        assert any(f"on ComfyUI {label}" in p and "unexpected keyword argument 'bogus'" in p for p in found), found


def test_a_missing_name_is_reported():
    found = problems_of(BASE + "x = comfy.sd.no_such_thing\n")
    print("\n".join(found))
    assert found and all("comfy.sd.no_such_thing" in p for p in found), found


def test_a_call_that_only_the_newer_version_takes_is_reported_for_the_old_one():
    # ``disable_dynamic=`` exists in the newer comfy/sd.py (35ead008), not in a125cd84
    found = problems_of(BASE + "m = comfy.sd.load_diffusion_model_state_dict({}, disable_dynamic=True)\n")
    assert len(found) == 1 and "a125cd84" in found[0] and "disable_dynamic" in found[0], found


def test_a_probe_comment_accepts_one_version_but_not_none():
    newer_only = (
        BASE + "def load(sd):\n"
        "    try:  # comfy-probe: disable_dynamic= exists from ComfyUI 0.4 on\n"
        "        return comfy.sd.load_diffusion_model_state_dict(sd, disable_dynamic=True)\n"
        "    except TypeError:\n"
        "        return comfy.sd.load_diffusion_model_state_dict(sd)\n"
    )
    assert problems_of(newer_only) == []
    typo = BASE + "m = comfy.sd.load_diffusion_model_state_dikt({})  # comfy-probe: newer only\n"
    found = problems_of(typo)
    assert len(found) == 1 and "works in no recorded ComfyUI version" in found[0], found
    assert problems_of(BASE + "ok = hasattr(comfy.sd, 'load_diffusion_model_state_dict')\n") == []
    found = problems_of(BASE + "ok = hasattr(comfy.sd, 'load_diffusion_model_state_dikt')\n")
    assert len(found) == 1 and "hasattr/getattr probe" in found[0], found


def test_wrong_arguments_to_a_listed_comfyui_method_are_reported():
    found = problems_of(BASE + "def f(model, p):\n    return model.add_patches(p, 1.0, 1.0, 'extra')\n")
    assert len(found) == 2 and all("ModelPatcher.add_patches" in p for p in found), found
    assert problems_of(BASE + "def f(model, p):\n    return model.clone().add_patches(p, 1.0)\n") == []


def test_node_schema_keywords_are_checked():
    found = problems_of(BASE + "x = io.Float.Input('cfg', default=1.0, minimum=0.0)\n")
    assert len(found) == 1 and "unexpected keyword argument 'minimum'" in found[0], found
    assert problems_of(BASE + "x = io.Float.Input('cfg', default=1.0, min=0.0, max=2.0, step=0.1)\n") == []


def test_an_override_that_cannot_take_comfyuis_call_is_reported():
    src = BASE + (
        "class G(comfy.samplers.CFGGuider):\n"
        "    def sample(self, noise, latent_image, sampler, sigmas):\n"
        "        return super().sample(noise, latent_image, sampler, sigmas, seed=1)\n"
    )
    found = problems_of(src)
    assert len(found) == 2 and all("override of comfy.samplers.CFGGuider.sample" in p for p in found), found


def test_a_reference_into_an_unreadable_newer_file_must_be_accepted_by_name():
    # comfy/sample.py has no readable newer version; prepare_noise is accepted, this name is not
    found = problems_of("import comfy.sample\nx = comfy.sample.sample_custom\n")
    newer = [p for p in found if "ComfyUI newer" in p]
    assert len(newer) == 1 and "cannot be checked" in newer[0] and "accepted_unverifiable" in newer[0], found


def test_unrecorded_names_ask_for_a_refresh():
    found = problems_of("import comfy.model_management\ncomfy.model_management.soft_empty_cache()\n")
    assert found and all("refresh the surface file" in p for p in found), found


# --------------------------------------------------------------------------- facts extraction


def test_extract_module_records_parameter_kinds_defaults_classes_and_imports():
    src = (
        "from .lora import LoRAAdapter\nimport comfy.utils as u\nfrom dataclasses import dataclass\n"
        "X = 1\nY = LoRAAdapter\n"
        "def f(a, /, b, c=1, *args, d, e=2, **kw): ...\n"
        "class A(LoRAAdapter):\n    K = 'k'\n    def m(self, x=None): ...\n"
        "    @classmethod\n    def c(cls, y): ...\n    @property\n    def p(self): ...\n"
        "    class Inner:\n        def __init__(self, z): ...\n"
        "@dataclass\nclass D:\n    a: int\n    b: str = ''\n"
    )
    facts = cs.extract_module(src, "comfy.weight_adapter", is_package=True)
    assert facts["f"]["params"] == [
        ["a", "POSITIONAL_ONLY", False], ["b", "POSITIONAL_OR_KEYWORD", False], ["c", "POSITIONAL_OR_KEYWORD", True],
        ["args", "VAR_POSITIONAL", False], ["d", "KEYWORD_ONLY", False], ["e", "KEYWORD_ONLY", True],
        ["kw", "VAR_KEYWORD", False],
    ]
    assert facts["LoRAAdapter"] == {"kind": "import", "target": "comfy.weight_adapter.lora.LoRAAdapter"}
    assert facts["u"] == {"kind": "module", "target": "comfy.utils"}
    assert facts["X"] == {"kind": "variable"}
    assert facts["Y"] == {"kind": "alias", "target": "comfy.weight_adapter.lora.LoRAAdapter"}
    a = facts["A"]
    assert a["bases"] == ["comfy.weight_adapter.lora.LoRAAdapter"]
    assert a["members"]["K"] == {"kind": "variable"}
    assert a["members"]["c"]["binding"] == "classmethod" and a["members"]["m"]["binding"] == "instance"
    assert a["members"]["p"]["kind"] == "variable"
    assert a["members"]["Inner"]["members"]["__init__"]["params"][1] == ["z", "POSITIONAL_OR_KEYWORD", False]
    init = facts["D"]["members"]["__init__"]["params"]
    assert init == [["self", "POSITIONAL_OR_KEYWORD", False], ["a", "POSITIONAL_OR_KEYWORD", False],
                    ["b", "POSITIONAL_OR_KEYWORD", True]]
    json.dumps(facts)  # plain data


def test_scan_finds_imports_chains_calls_and_method_calls():
    src = (
        "import comfy.model_management as mm\nfrom comfy_api.v0_0_2 import io\nimport folder_paths\n"
        "def f(model):\n"
        "    d = mm.intermediate_device()\n"
        "    names = folder_paths.get_filename_list('loras')\n"
        "    c = model.clone()\n"
        "    return io.NodeOutput(*names), d, c\n"
    )
    refs = cs.scan_source(src, "x.py", ["clone"])
    got = {(r.kind, r.target, r.call.text() if r.call else None) for r in refs}
    assert ("import", "comfy.model_management", None) in got
    assert ("import", "comfy_api.v0_0_2.io", None) in got
    assert ("name", "comfy.model_management.intermediate_device", "()") in got
    assert ("name", "folder_paths.get_filename_list", "(_)") in got
    assert ("method", "clone", "()") in got
    assert ("name", "comfy_api.v0_0_2.io.NodeOutput", "(*_)") in got
    assert cs.scan_source("import os\nos.path.join('a')\nx.clone()\n", "y.py", ["clone"]) == []
