"""Real ComfyUI, in-process (testing-on-cpu.md §4).

The session fixture ``comfy`` boots the ComfyUI work tree at $COMFYUI_PATH on the CPU
with a temporary base directory whose ``custom_nodes`` folder holds this pack (a
symlink to the repo), loads custom nodes through ComfyUI's own loader, and returns a
:class:`ComfyHarness` that can run API-format prompts through ``execution.PromptExecutor``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "dcm-video"
TEST_NODES = Path(__file__).resolve().parent / "testing_nodes"


class StubServer:
    """The few attributes PromptExecutor and the progress hook use."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, *a, **k):
        pass


@dataclass
class RunResult:
    success: bool
    outputs: dict
    messages: list
    node_errors: dict = field(default_factory=dict)
    error: dict | None = None

    def error_text(self) -> str:
        for ev, data in self.messages:
            if ev == "execution_error":
                return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
        return ""


class ComfyHarness:
    def __init__(self, base: Path):
        import execution
        import folder_paths

        self.base = base
        self.folder_paths = folder_paths
        self.execution = execution
        self.server = StubServer()
        self.models = base / "models"
        self.output = base / "output"
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)

    pack_dir_name = PACK_DIR_NAME

    @property
    def pack_module_name(self) -> str:
        """``sys.modules`` name ComfyUI gave the pack (its folder path with '.' → '_x_')."""
        return str(self.base / "custom_nodes" / PACK_DIR_NAME).replace(".", "_x_")

    def pack_module(self, sub: str):
        """A submodule of the pack *as ComfyUI loaded it* (its caches, its error classes)."""
        import importlib

        return importlib.import_module(f"{self.pack_module_name}.{sub}")

    def model_dir(self, kind: str) -> Path:
        """models/<kind> of the temporary base (diffusion_models, loras, ...)."""
        return self.models / kind

    def new_executor(self):
        """A fresh executor (empty node-output cache)."""
        self.executor = self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC)
        return self.executor

    def run(self, prompt: dict, *, executor=None, check_valid: bool = True) -> RunResult:
        """Validate and execute an API-format prompt. ``node_errors`` must be empty to run."""
        pid = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(pid, prompt, None))
        ok, err, outputs, node_errors = valid[0], valid[1], valid[2], valid[3]
        if not ok or node_errors:
            if check_valid:
                raise AssertionError(f"prompt failed validation: {err} {node_errors}")
            return RunResult(False, {}, [], node_errors=node_errors, error=err)
        ex = executor or self.executor
        self.server.last_prompt_id = pid
        ex.execute(prompt, pid, {}, outputs)
        return RunResult(ex.success, ex.history_result.get("outputs", {}), list(ex.status_messages))


def _boot(base: Path, comfy_path: Path) -> ComfyHarness:
    sys.path.insert(0, str(comfy_path))
    from comfy.cli_args import args

    args.cpu = True
    args.disable_api_nodes = True
    import utils.install_util  # noqa: F401  (import-order trap, testing-on-cpu.md §4.1)
    import folder_paths

    for sub in ("output", "temp", "input", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    if hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(str(base / "user"))
    for kind in ("diffusion_models", "loras", "vae", "text_encoders", "checkpoints"):
        d = base / "models" / kind
        d.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(d), is_default=True)
    custom = base / "custom_nodes"
    custom.mkdir(exist_ok=True)
    os.symlink(ROOT, custom / PACK_DIR_NAME)
    os.symlink(TEST_NODES, custom / "dcm_testing_nodes")
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return ComfyHarness(base)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    comfy_path = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()
    base = tmp_path_factory.mktemp("comfy_base")
    h = _boot(base, comfy_path)
    import nodes

    missing = [n for n in ("DCMCheckpointLoader", "DCMDualExpertSampler") if n not in nodes.NODE_CLASS_MAPPINGS]
    h.pack_loaded = not missing
    return h
