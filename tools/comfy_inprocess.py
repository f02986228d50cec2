"""Boot a ComfyUI work tree inside this Python process.

Shared by the comfy test tier (tests/comfy/conftest.py) and the benchmarks (bench/comfy_env.py).
Order matters: ComfyUI's ``args`` must be set before ``comfy.model_management`` is imported, and
``utils.install_util`` must be imported before ``nodes`` (nodes.py puts ``comfy/`` first on
``sys.path``, after which ``utils`` resolves to ``comfy/utils.py``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

MODEL_KINDS = ("diffusion_models", "loras", "vae", "text_encoders", "checkpoints")


class StubServer:
    """The few attributes PromptExecutor and the progress hook use."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass

    def send_progress_text(self, *a, **k):
        pass


def execution_error_text(messages, *, traceback: bool = False) -> str:
    """``node: ExceptionType: message`` of the ``execution_error`` among ComfyUI status messages ('' if none)."""
    for ev, data in messages or []:
        if ev == "execution_error":
            text = f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
            return text + ("\n" + "".join(data.get("traceback") or []) if traceback else "")
    return ""


def comfyui_path() -> Path:
    """The ComfyUI work tree the tests and benchmarks use: ``$COMFYUI_PATH``, default ``~/ComfyUI``."""
    return Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()


def boot_comfyui(
    comfy_path: str | os.PathLike,
    base: str | os.PathLike,
    custom_nodes: dict[str, str | os.PathLike],
    *,
    cpu: bool = True,
    lowvram: bool = False,
    reserve_vram: float | None = None,
    threads: int | None = None,
) -> Path:
    """Set ComfyUI up with ``base`` as its base directory and load ``custom_nodes``.

    ``custom_nodes`` maps a folder name under ``base/custom_nodes`` to the pack to symlink there.
    Returns ``base``. Only one ComfyUI can be booted per process.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    sys.path.insert(0, str(comfy_path))
    from comfy.cli_args import args

    args.cpu = cpu
    args.lowvram = lowvram
    if reserve_vram is not None:
        args.reserve_vram = reserve_vram
    args.disable_api_nodes = True
    import folder_paths
    import utils.install_util  # noqa: F401  (import-order trap)

    base = Path(base)
    for sub in ("output", "temp", "input", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    if hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(str(base / "user"))
    for kind in MODEL_KINDS:
        d = base / "models" / kind
        d.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(d), is_default=True)
    custom = base / "custom_nodes"
    custom.mkdir(exist_ok=True)
    for name, src in custom_nodes.items():
        os.symlink(os.path.realpath(src), custom / name)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return base
