"""Import a helper file of a test tier by its path, once (the tier folders are not packages and run
under ``--import-mode=importlib``, so ``import`` by name does not reach them)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_path_module(name: str, path: str | Path):
    """``path`` as module ``name`` in ``sys.modules`` (executed on the first call only)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(path))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
