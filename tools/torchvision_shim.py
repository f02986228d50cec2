"""Development-environment shim: make PyPI's torchvision importable beside torch 2.13.0+cpu.

ComfyUI's requirements pull in torchvision (via spandrel) as a CUDA build whose C
library cannot load beside the CPU torch wheel; its import then fails with
``operator torchvision::nms does not exist``. Defining the two op schemas its meta
registrations need, *before* torchvision is imported, fixes the import (the C ops stay
unusable; neither ComfyUI's video path nor this pack uses them).

tools/bootstrap.sh installs this file into the dev venv with a ``.pth`` hook that only
registers an import hook: nothing (not even torch) is imported until something imports
torchvision. It is never part of the node pack.
"""

import importlib.abc
import sys


class _Finder(importlib.abc.MetaPathFinder):
    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not _Finder.done:
            _Finder.done = True
            try:
                import torch

                lib = torch.library.Library("torchvision", "FRAGMENT")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                sys.modules.setdefault("_dcm_torchvision_shim_lib", lib)  # keep the fragment alive
            except Exception:  # already defined (a working torchvision build), or no torch: nothing to do
                pass
        return None


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
