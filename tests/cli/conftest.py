"""cli tier: comfy-cli against the real ComfyUI work tree, loopback only.

``comfy --workspace <ws> launch --background -- --cpu --listen 127.0.0.1 …``, ``comfy run --workflow
<api json> --wait``, ``comfy stop``, with HOME in a temporary directory (comfy-cli keeps its config
and job records under $HOME) and telemetry off.

The workspace handed to comfy-cli is a temporary mirror of $COMFYUI_PATH (a folder of symlinks to
its entries, with a real ``user/`` folder): ``comfy launch --background`` writes its log to
``<workspace>/user/comfyui_<port>.log``, and the ComfyUI work tree itself must stay untouched.
ComfyUI resolves the ``main.py`` symlink, so it runs from the real tree; ``--base-directory``
points models, custom_nodes, input, output and user at a temporary folder (tests/browser/comfy_server.py).
The pack is installed there from its registry zip (what `comfy node pack` / publish upload), unpacked
into ``custom_nodes/<registry id>`` as `comfy node registry-install` does, so this tier also proves the
published archive runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def load_server_module():
    name = "dcm_comfy_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "browser" / "comfy_server.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


cs = load_server_module()


@dataclass
class CLIResult:
    args: list
    rc: int
    out: str
    err: str
    seconds: float

    def text(self) -> str:
        return f"$ comfy {' '.join(map(str, self.args))}\nrc={self.rc} ({self.seconds:.1f} s)\n--- stdout ---\n{self.out[-4000:]}\n--- stderr ---\n{self.err[-4000:]}"

    def envelopes(self) -> list[dict]:
        """comfy-cli prints JSON envelopes when stdout is not a TTY; every JSON object line."""
        found = []
        for chunk in (self.out, self.out.replace("\n", " ")):
            for line in chunk.splitlines():
                line = line.strip()
                if line.startswith("{") and line.endswith("}"):
                    try:
                        found.append(json.loads(line))
                    except ValueError:
                        pass
            if found:
                break
        if not found:
            try:
                obj = json.loads(self.out)
                found = [obj] if isinstance(obj, dict) else []
            except ValueError:
                pass
        return found


class ComfyCLI:
    def __init__(self, home: Path, workspace: Path):
        self.home, self.workspace = home, workspace
        # the server's environment (HOME, one thread, offline, local no-proxy) minus any proxy, plus the venv
        env = {k: v for k, v in cs.server_env(home).items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env.update(
            VIRTUAL_ENV=str(VENV_BIN.parent),
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONDONTWRITEBYTECODE="1",
            COLUMNS="200",
        )
        self.env = env
        self.history: list[CLIResult] = []

    def __call__(self, *args, timeout: float = 120.0, check: bool = False) -> CLIResult:
        t0 = time.monotonic()
        try:
            p = subprocess.run([str(VENV_BIN / "comfy"), *map(str, args)], env=self.env, cwd=self.home,
                               capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
            r = CLIResult(list(args), p.returncode, p.stdout, p.stderr, time.monotonic() - t0)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            r = CLIResult(list(args), -9, out, err + f"\n(timed out after {timeout:.0f} s)", time.monotonic() - t0)
        self.history.append(r)
        if check and r.rc != 0:
            raise AssertionError(r.text())
        return r


def mirror_workspace(comfy: Path, ws: Path) -> Path:
    """A folder of symlinks to the ComfyUI work tree's entries, with its own ``user/``."""
    ws.mkdir(parents=True)
    for entry in comfy.iterdir():
        if entry.name in (".git", "user"):
            continue
        os.symlink(entry, ws / entry.name)
    (ws / "user").mkdir()
    return ws


@pytest.fixture(scope="session")
def comfy_cli_server(tmp_path_factory):
    """A background server started by ``comfy launch --background``; ``comfy stop`` at the end."""
    home = tmp_path_factory.mktemp("cli_home")
    ws = mirror_workspace(cs.comfyui_path(), tmp_path_factory.mktemp("cli_ws") / "ComfyUI")
    base = tmp_path_factory.mktemp("cli_base")
    cs.make_base(base, link_pack=False)
    # as `comfy node registry-install` does
    _, untracked = cs.install_registry_zip(base, tmp_path_factory.mktemp("cli_zip"))
    if untracked:
        warnings.warn(f"cli tier: {len(untracked)} file(s) not in git were added to the registry zip "
                      f"(a publish would leave them out): {untracked[:12]}", stacklevel=1)  # fmt: skip
    build = cs.ModelBuild(base / "models").start()
    cli = ComfyCLI(home, ws)
    cli("--skip-prompt", "tracking", "disable", check=True, timeout=60)
    port = cs.free_port()
    t0 = time.monotonic()
    launch = cli("--skip-prompt", "--workspace", ws, "launch", "--background", "--",
                 *cs.comfy_args(port, base), timeout=240)  # fmt: skip
    info = {"cli": cli, "ws": ws, "base": base, "port": port, "url": f"http://127.0.0.1:{port}", "launch": launch,
            "launch_s": time.monotonic() - t0, "log": ws / "user" / f"comfyui_{port}.log"}  # fmt: skip
    try:
        assert launch.rc == 0, f"comfy launch --background failed\n{launch.text()}\n{cs.tail(info['log'])}"
        info["models"] = build.finish(timeout=300)
        yield info
    finally:
        if _answers(port):  # test_comfy_stop_stops_the_server did not run or did not stop it
            _ensure_stopped(port, cli("--workspace", ws, "stop", timeout=60))


def _answers(port: int) -> bool:
    try:
        cs.http_json(f"http://127.0.0.1:{port}/system_stats", timeout=1)
        return True
    except Exception:  # noqa: BLE001 - refused: not running
        return False


def _ensure_stopped(port: int, stop: CLIResult) -> None:
    """If ``comfy stop`` left the server running, stop it ourselves (by the pid bound to the port)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not _answers(port):
            return
        time.sleep(0.3)
    try:
        import psutil

        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                psutil.Process(c.pid).terminate()
    except Exception:  # noqa: BLE001
        pass
    raise AssertionError(f"`comfy stop` left the server on port {port} running\n{stop.text()}")
