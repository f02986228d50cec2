"""Reliability suite, comfy tier: faults during sampling in real ComfyUI (cancel storms, exceptions and
NaN inside model calls, inputs refused before any model work).

Fault-injection nodes are registered into ComfyUI's node table for these tests only (they live here,
not in the shipped pack): ``DCMRelFault`` (a MODEL clone whose DIFFUSION_MODEL wrapper counts calls
and, at a chosen call, raises / cancels / returns NaN or Inf), ``DCMRelLatent`` (any latent shape,
batch and fill, NaN included) and ``DCMRelSigmas`` (any sigma list, empty included).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REL_UNIT = Path(__file__).resolve().parents[2] / "unit" / "reliability"
if str(REL_UNIT) not in sys.path:
    sys.path.insert(0, str(REL_UNIT))

# the shared reliability hooks (counts per property, the figures table)
from rel_registry import pytest_configure, pytest_runtest_call, pytest_terminal_summary  # noqa: E402, F401

# --------------------------------------------------------------------------- fault-injection nodes


class Plan:
    """What the DCMRelFault wrappers do; set by the test before each run."""

    def __init__(self):
        self.calls: list[tuple[str, int, float]] = []  # (tag, index within tag, timestep)
        self.faults: dict[str, tuple[str, int]] = {}  # tag -> (mode, call index)

    def reset(self, **faults: tuple[str, int]) -> None:
        self.calls.clear()
        self.faults = dict(faults)

    def count(self, tag: str | None = None) -> int:
        return sum(1 for c in self.calls if tag is None or c[0] == tag)


PLAN = Plan()


class InjectedFault(RuntimeError):
    pass


def _make_nodes():
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    import torch

    class DCMRelFault:
        CATEGORY = "testing/DCM reliability"
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "apply"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "model"})}}

        @classmethod
        def IS_CHANGED(cls, **kw):
            return float("nan")  # always re-run: the plan changes between runs

        def apply(self, model, tag):
            def wrapper(executor, x, timestep, *args, **kwargs):
                idx = PLAN.count(tag)
                PLAN.calls.append((tag, idx, float(timestep.flatten()[0])))
                mode, at = PLAN.faults.get(tag, ("none", -1))
                if idx == at and mode == "raise":
                    raise InjectedFault(f"injected fault in {tag} model call {idx}")
                if idx == at and mode == "interrupt":
                    mm.interrupt_current_processing()
                    mm.throw_exception_if_processing_interrupted()
                out = executor(x, timestep, *args, **kwargs)
                if idx == at and mode == "nan":
                    out = out.clone()
                    out.view(-1)[:: max(1, out.numel() // 7)] = float("nan")
                elif idx == at and mode == "inf":
                    out = out.clone()
                    out.view(-1)[0] = float("inf")
                return out

            m = model.clone()
            m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "dcm_rel_fault", wrapper)
            return (m,)

    class DCMRelLatent:
        CATEGORY = "testing/DCM reliability"
        RETURN_TYPES = ("LATENT",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            i = ("INT", {"default": 1, "min": 0, "max": 4096})
            return {"required": {"batch": i, "channels": i, "frames": i, "height": i, "width": i, "ndim": i,
                                 "fill": (["randn", "zeros", "nan", "inf"],), "bad": i, "seed": i}}

        @classmethod
        def IS_CHANGED(cls, **kw):
            return float("nan")

        def make(self, batch, channels, frames, height, width, ndim, fill, bad, seed):
            shape = [batch, channels, frames, height, width] if ndim == 5 else [batch, channels, height, width]
            g = torch.Generator().manual_seed(seed)
            t = torch.zeros(shape) if fill == "zeros" else torch.randn(shape, generator=g)
            if fill in ("nan", "inf") and t.numel():
                idx = torch.randperm(t.numel(), generator=g)[: max(1, bad)]
                t.view(-1)[idx] = float("nan") if fill == "nan" else float("inf")
            return ({"samples": t},)

    class DCMRelSigmas:
        CATEGORY = "testing/DCM reliability"
        RETURN_TYPES = ("SIGMAS",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"values": ("STRING", {"default": ""})}}

        @classmethod
        def IS_CHANGED(cls, **kw):
            return float("nan")

        def make(self, values):
            vals = [float(v) for v in values.replace(",", " ").split()]
            return (torch.tensor(vals, dtype=torch.float32),)

    return {"DCMRelFault": DCMRelFault, "DCMRelLatent": DCMRelLatent, "DCMRelSigmas": DCMRelSigmas}


@pytest.fixture(scope="module")
def faults(comfy):
    """Register the fault-injection nodes in ComfyUI's node table; returns the shared :class:`Plan`."""
    import nodes

    added = _make_nodes()
    for name, cls in added.items():
        nodes.NODE_CLASS_MAPPINGS[name] = cls
        nodes.NODE_DISPLAY_NAME_MAPPINGS[name] = name
    yield PLAN
    for name in added:
        nodes.NODE_CLASS_MAPPINGS.pop(name, None)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(name, None)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py: one_torch_thread)."""
