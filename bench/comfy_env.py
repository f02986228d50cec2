"""Real ComfyUI, in-process, for the benchmarks (the boot recipe of tests/comfy/conftest.py).

:func:`boot` puts the ComfyUI work tree at ``$COMFYUI_PATH`` on ``sys.path`` (``--cpu`` unless a GPU run
asks otherwise), makes a temporary base directory whose ``custom_nodes`` holds the pack (a symlink to
this repo, or to ``pack`` for before/after comparisons) and the bench-only nodes (``bench/comfy_nodes``),
loads custom nodes with ComfyUI's own loader and returns a :class:`Harness` that validates and executes
API-format prompts through ``execution.PromptExecutor``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tools.comfy_inprocess import StubServer, execution_error_text

ROOT = Path(__file__).resolve().parents[1]
BENCH_NODES = Path(__file__).resolve().parent / "comfy_nodes"
PACK_DIR_NAME = "dcm-video"


class Harness:
    def __init__(self, base: Path):
        import execution

        self.base = base
        self.execution = execution
        self.server = StubServer()
        self.models = base / "models"
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)

    def model_dir(self, kind: str) -> Path:
        return self.models / kind

    def link_model(self, kind: str, path: Path, name: str | None = None) -> str:
        """Symlink a model file into models/<kind>; returns the name ComfyUI lists."""
        dest = self.models / kind / (name or Path(path).name)
        if not dest.exists():
            os.symlink(os.path.realpath(path), dest)
        return dest.name

    def run(self, prompt: dict) -> float:
        """Validate, then execute ``prompt``; returns the wall time of ``execute`` (validation excluded)."""
        pid = str(uuid.uuid4())
        ok, err, outputs, node_errors = asyncio.run(self.execution.validate_prompt(pid, prompt, None))[:4]
        if not ok or node_errors:
            raise RuntimeError(f"prompt failed validation: {err} {node_errors}")
        self.server.last_prompt_id = pid
        t0 = time.perf_counter()
        self.executor.execute(prompt, pid, {}, outputs)
        wall = time.perf_counter() - t0
        if not self.executor.success:
            raise RuntimeError(f"prompt failed: {execution_error_text(self.executor.status_messages, traceback=True)}")
        return wall


def boot(*, pack: str | os.PathLike | None = None, cpu: bool = True, lowvram: bool = False,
         reserve_vram: float | None = None, base: Path | None = None, threads: int | None = None) -> Harness:
    """Boot ComfyUI in this process; ``pack`` = the node pack folder to load (default: this repo)."""
    from tools.comfy_inprocess import boot_comfyui, comfyui_path

    base = Path(base or tempfile.mkdtemp(prefix="dcm_bench_comfy_"))
    boot_comfyui(comfyui_path(), base, {PACK_DIR_NAME: pack or ROOT, "dcm_bench_nodes": BENCH_NODES}, cpu=cpu,
                 lowvram=lowvram, reserve_vram=reserve_vram, threads=threads)
    import nodes

    missing = [n for n in ("DCMCheckpointLoader", "DCMDualExpertSampler", "DCMBenchCallTimer") if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise RuntimeError(f"ComfyUI did not load {missing} (see the log for 'Cannot import')")
    return Harness(base)


def pack_module(sub: str):
    """A submodule of the pack *as ComfyUI loaded it* (its caches and switches)."""
    import importlib

    for name, mod in list(sys.modules.items()):
        if name.endswith(PACK_DIR_NAME.replace(".", "_x_")) or name.endswith("/" + PACK_DIR_NAME):
            return importlib.import_module(f"{name}.{sub}")
    raise KeyError(f"pack module {sub} not loaded")
