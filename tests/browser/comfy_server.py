"""A real ComfyUI server in a subprocess, for the browser and cli tiers.

* :func:`make_base` builds a temporary ``--base-directory``: ``custom_nodes/`` holds this pack and
  the test-only nodes (symlinks), ``models/`` holds tiny DCM models (dcm_core.tiny) under the names
  the API twins use and under the names the UI workflows show, plus empty placeholder files for the
  text encoders / VAEs the UI workflows embed in ``properties.models`` (so the frontend's
  missing-models dialog has nothing to report; those files are never executed).
* :class:`ComfyServer` starts ``main.py --cpu`` on 127.0.0.1, waits for ``/system_stats``, and
  stops it with SIGTERM (a SIGINT is ignored by a backgrounded server in a non-interactive shell).

Imported by tests/browser/conftest.py and (by file path) tests/cli/conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
UI_WORKFLOWS = ROOT / "workflows"
API_WORKFLOWS = ROOT / "tests" / "comfy" / "workflows_api"
TEST_NODES = ROOT / "tests" / "comfy" / "testing_nodes"
PACK_DIR_NAME = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]  # registry id
MODEL_KINDS = ("diffusion_models", "loras", "vae", "text_encoders", "checkpoints", "clip_vision")
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

# Which widget of which loader names a model file, and in which folder.
_FILE_WIDGETS = {
    ("DCMCheckpointLoader", "ckpt_name"): "diffusion_models",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("DCMExpertLoraLoader", "lora_name"): "loras",
}


from tools.comfy_inprocess import comfyui_path, execution_error_text  # noqa: E402  (the repo root is on sys.path: pytest / PYTHONPATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_workflows() -> list[Path]:
    return sorted(UI_WORKFLOWS.glob("*.json"))


def api_workflows() -> list[Path]:
    return sorted(API_WORKFLOWS.glob("*.json"))


def _family_of(name: str) -> str:
    n = name.lower()
    return "hunyuan_video" if ("hunyuan" in n or re.search(r"(^|[_\-.])hy([_\-.]|$)", n)) else "wan"


# --------------------------------------------------------------------------- model files
@dataclass
class ModelNeeds:
    official: dict[str, str] = field(default_factory=dict)  # file name in diffusion_models → family
    converted: dict[str, str] = field(default_factory=dict)  # stem (NAME of NAME_semantic) → family
    style_loras: set[str] = field(default_factory=set)  # other LoRA names (tiny Wan LoRA)
    placeholders: set[tuple[str, str]] = field(default_factory=set)  # (folder, name): empty files


def _note_file(needs: ModelNeeds, folder: str, name: str) -> None:
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        return
    stem = name[: -len(".safetensors")]
    if folder == "diffusion_models" and stem.endswith("_semantic"):
        needs.converted[stem[: -len("_semantic")]] = _family_of(stem)
    elif folder == "loras" and stem.endswith("_detail_expert"):
        needs.converted[stem[: -len("_detail_expert")]] = _family_of(stem)
    elif folder == "diffusion_models":
        needs.official[name] = _family_of(stem)
    elif folder == "loras":
        needs.style_loras.add(name)


def model_needs(ui_files: list[Path], api_files: list[Path]) -> ModelNeeds:
    """The model files the workflows name (DCM/UNet/LoRA loaders) and embed (``properties.models``)."""
    needs = ModelNeeds()
    for p in api_files:
        for node in json.loads(p.read_text()).values():
            for (ctype, widget), folder in _FILE_WIDGETS.items():
                if node.get("class_type") == ctype and widget in node.get("inputs", {}):
                    _note_file(needs, folder, node["inputs"][widget])
    for p in ui_files:
        wf = json.loads(p.read_text())
        for node in wf.get("nodes", []):
            for m in (node.get("properties") or {}).get("models") or []:
                if m.get("name") and m.get("directory"):
                    needs.placeholders.add((m["directory"], m["name"]))
            if node.get("mode") == 4:  # a bypassed slot the user fills in (e.g. a style LoRA)
                continue
            vals = node.get("widgets_values")
            if not isinstance(vals, list) or not vals:
                continue
            for (ctype, _widget), folder in _FILE_WIDGETS.items():
                if node.get("type") == ctype:
                    _note_file(needs, folder, vals[0])
    # A real tiny file wins over an empty placeholder of the same name.
    real = {("diffusion_models", n) for n in needs.official} | {("loras", n) for n in needs.style_loras}
    for stem in needs.converted:
        real |= {("diffusion_models", f"{stem}_semantic.safetensors"), ("loras", f"{stem}_detail_expert.safetensors")}
    needs.placeholders -= real
    return needs


def write_models(models: Path, needs: ModelNeeds, work: Path) -> dict[str, list[str]]:
    """Tiny official DCM checkpoints, converted expert pairs and style LoRAs into ``models/``."""
    import torch
    from safetensors.torch import save_file

    from dcm_core import tiny
    from dcm_core.formats import convert_official

    for kind in MODEL_KINDS:
        (models / kind).mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    configs = {"wan": lambda: tiny.wan_config(num_layers=2), "hunyuan_video": lambda: tiny.hunyuan_config()}
    official_src: dict[str, Path] = {}

    def official(family: str) -> Path:
        if family not in official_src:
            model = tiny.make_official_model(family, configs[family](), rank=4, alpha=8.0, seed=3)
            path = work / f"official_{family}.safetensors"
            tiny.save_official_checkpoint(model, path, metadata={"lora_alpha": "8"})
            official_src[family] = path
        return official_src[family]

    toy = Path(__file__).resolve().parents[2] / "dcm_core" / "toy" / "weights"
    for name, family in sorted(needs.official.items()):
        dst = models / "diffusion_models" / name
        if not dst.exists():
            # the bundled toy-world experts are real files of the repo: use them as they are
            src = toy / name if (toy / name).is_file() else official(family)
            if _same_fs(src, dst):
                os.link(src, dst)
            else:
                dst.write_bytes(src.read_bytes())
    for stem, family in sorted(needs.converted.items()):
        res = convert_official(official(family), work / f"conv_{stem}", dtype="fp32", name=stem, progress=False)
        os.replace(res.semantic_path, models / "diffusion_models" / res.semantic_path.name)
        os.replace(res.detail_path, models / "loras" / res.detail_path.name)
    for name in sorted(needs.style_loras):
        # A ComfyUI-native LoRA on two layers of the tiny Wan (dim 128, ffn 256).
        g = torch.Generator().manual_seed(99)
        sd = {}
        for stem, (out_f, in_f) in {"blocks.0.ffn.0": (256, 128), "blocks.1.self_attn.q": (128, 128)}.items():
            sd[f"diffusion_model.{stem}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.5
            sd[f"diffusion_model.{stem}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.5
            sd[f"diffusion_model.{stem}.alpha"] = torch.tensor(4.0)
        save_file(sd, str(models / "loras" / name))
    for folder, name in sorted(needs.placeholders):
        p = models / folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.write_bytes(b"")  # listed by ComfyUI; never loaded by these tests
    return {k: sorted(os.listdir(models / k)) for k in MODEL_KINDS}


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b.parent).st_dev
    except OSError:
        return False


def make_base(base: Path, *, link_pack: bool = True) -> None:
    """Lay out a ComfyUI ``--base-directory`` for the pack (models come from :class:`ModelBuild`).
    ``link_pack=False`` leaves ``custom_nodes/<registry id>`` to the caller (see :func:`install_registry_zip`)."""
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for kind in MODEL_KINDS:
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
    # a stock install ships input/example.png, the start image the image-to-video workflows' LoadImage names
    example = comfyui_path() / "input" / "example.png"
    if example.is_file():
        shutil.copyfile(example, base / "input" / "example.png")
    if link_pack:
        os.symlink(ROOT, base / "custom_nodes" / PACK_DIR_NAME)
    os.symlink(TEST_NODES, base / "custom_nodes" / "dcm_testing_nodes")


def install_registry_zip(base: Path, work: Path) -> tuple[Path, list[str]]:
    """Install the pack the way ``comfy node registry-install`` / ComfyUI-Manager do: the registry zip
    (comfy-cli's own ``zip_files``: git-tracked files, .comfyignore, ``[tool.comfy] includes``, read
    from the working tree) unpacked into ``custom_nodes/<registry id>``.

    New files git does not track yet (and does not ignore) are added too, so work in progress runs;
    they are returned so the caller can warn that a publish would leave them out."""
    work.mkdir(parents=True, exist_ok=True)
    zpath = work / "node.zip"
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("comfy", {}).get("includes", [])
    code = (
        "import sys, json; from comfy_cli.file_utils import zip_files; zip_files(sys.argv[1], json.loads(sys.argv[2]))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(zpath), json.dumps(includes)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    if r.returncode != 0 or not zpath.is_file():
        raise RuntimeError(f"comfy-cli zip_files failed (rc {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    dst = base / "custom_nodes" / PACK_DIR_NAME
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(dst)
    added = []
    for rel in untracked_files():
        if not (dst / rel).exists() and (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
            added.append(rel)
    return dst, added


def untracked_files() -> list[str]:
    """Files git neither tracks nor ignores (not in a registry zip until committed)."""
    r = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    return [f for f in r.stdout.decode().split("\0") if f] if r.returncode == 0 else []


def _cache_key(needs: ModelNeeds) -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "dcm_core").rglob("*.py")) + [Path(__file__)]:
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    h.update(
        repr(
            (
                sorted(needs.official.items()),
                sorted(needs.converted.items()),
                sorted(needs.style_loras),
                sorted(needs.placeholders),
            )
        ).encode()
    )
    return h.hexdigest()[:16]


class ModelBuild:
    """Tiny model files for the workflows, built in a subprocess (it imports torch + diffusers,
    ~10 s on a busy 2-core box) while the server boots, and cached under tests/_output/cache keyed
    by the dcm_core sources and the file names, so a re-run only links files."""

    def __init__(self, models: Path, ui_files: list[Path] | None = None, api_files: list[Path] | None = None):
        self.models = models
        self.needs = model_needs(
            ui_workflows() if ui_files is None else ui_files, api_workflows() if api_files is None else api_files
        )
        self.cache = ROOT / "tests" / "_output" / "cache" / f"models-{_cache_key(self.needs)}"
        self.proc: subprocess.Popen | None = None
        self.log = models.parent / "model_build.log"
        self.cached = (self.cache / ".complete").is_file()

    def start(self) -> ModelBuild:
        if not self.cached:
            tmp = self.cache.with_name(self.cache.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            spec = {"out": str(tmp), "final": str(self.cache), **_needs_to_json(self.needs)}
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__)), "build-models", json.dumps(spec)],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                )  # fmt: skip
        return self

    def finish(self, timeout: float = 300.0) -> dict[str, list[str]]:
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise RuntimeError(f"building tiny models took over {timeout:.0f} s\n{tail(self.log)}")
            if rc != 0 or not (self.cache / ".complete").is_file():
                raise RuntimeError(f"building tiny models failed (rc {rc})\n{tail(self.log)}")
        for kind in MODEL_KINDS:
            src = self.cache / kind
            if not src.is_dir():
                continue
            for f in src.iterdir():
                dst = self.models / kind / f.name
                if not dst.exists():
                    try:
                        os.link(f, dst)
                    except OSError:
                        shutil.copyfile(f, dst)
        return {k: sorted(os.listdir(self.models / k)) for k in MODEL_KINDS}


def _needs_to_json(n: ModelNeeds) -> dict:
    return {
        "official": n.official,
        "converted": n.converted,
        "style_loras": sorted(n.style_loras),
        "placeholders": sorted(n.placeholders),
    }


def _build_models_main(spec: dict) -> None:
    needs = ModelNeeds(
        spec["official"], spec["converted"], set(spec["style_loras"]), {tuple(p) for p in spec["placeholders"]}
    )
    out, final = Path(spec["out"]), Path(spec["final"])
    write_models(out, needs, out / "_work")
    shutil.rmtree(out / "_work", ignore_errors=True)
    (out / ".complete").write_text("ok\n")
    try:
        os.replace(out, final)
    except OSError:  # another session finished first: keep theirs
        shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------- server
def server_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        OMP_NUM_THREADS="1",  # tiny models on shared cores: extra threads only add contention
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        HF_HUB_OFFLINE="1",
        DO_NOT_TRACK="1",
    )
    # torchvision imports through tools/torchvision_shim.py, installed in the venv as a .pth hook by
    # tools/bootstrap.sh (a venv made another way shows the import error in the server log).
    return env


def comfy_args(port: int, base: Path) -> list[str]:
    return [
        "--cpu",
        "--listen", "127.0.0.1",
        "--port", str(port),
        "--base-directory", str(base),
        "--disable-api-nodes",
        "--database-url", "sqlite:///:memory:",
        "--disable-auto-launch",
    ]  # fmt: skip


def http_json(url: str, data=None, timeout: float = 10.0):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    # Never a proxy: loopback only.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(lines[-n:])


class ComfyServer:
    """``python main.py --cpu …`` from the ComfyUI work tree, as a subprocess."""

    def __init__(
        self, base: Path, home: Path, *, comfy: Path | None = None, python: str | None = None, extra_args: tuple = ()
    ):
        self.base = base
        self.extra_args = tuple(extra_args)  # more main.py flags (the soak tier: --preview-method, --cache-none)
        self.home = home
        self.comfy = comfy or comfyui_path()
        self.python = python or sys.executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def start(self, timeout: float = 120.0) -> ComfyServer:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [self.python, "main.py", *comfy_args(self.port, self.base), *self.extra_args],
            cwd=self.comfy,
            env=server_env(self.home),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout, t0)
        return self

    def wait_ready(self, timeout: float, t0: float | None = None) -> None:
        t0 = time.monotonic() if t0 is None else t0
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} before it was ready\n{self.log_tail()}")
            try:
                http_json(self.url + "/system_stats", timeout=2)
                self.ready_s = time.monotonic() - t0
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.25)

    def get(self, path: str, timeout: float = 10.0):
        return http_json(self.url + path, timeout=timeout)

    def post(self, path: str, data, timeout: float = 10.0):
        return http_json(self.url + path, data=data, timeout=timeout)

    def log_tail(self, n: int = 60) -> str:
        return f"--- server log ({self.log_path}), last {n} lines ---\n{tail(self.log_path, n)}"

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def wait_history(self, prompt_id: str, timeout: float = 180.0) -> dict:
        """Poll ``/history/<id>`` until the prompt finished (success or error)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            h = self.get(f"/history/{prompt_id}")
            entry = (h or {}).get(prompt_id)
            if entry:  # ComfyUI adds the history entry when the prompt has finished (success or error)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited while running {prompt_id}\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")


def output_files(base: Path, history_entry: dict) -> list[Path]:
    """Files the prompt's output nodes report (``outputs.<node>.<kind>[i].filename``), resolved."""
    found = []
    for node_out in (history_entry.get("outputs") or {}).values():
        for items in node_out.values():
            if not isinstance(items, list):
                continue
            for it in items:
                if isinstance(it, dict) and "filename" in it:
                    root = base / (it.get("type") or "output")
                    found.append(root / (it.get("subfolder") or "") / it["filename"])
    return found


def history_error(entry: dict) -> str:
    return execution_error_text((entry.get("status") or {}).get("messages")) or json.dumps(entry.get("status"))[:2000]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "build-models":
    _build_models_main(json.loads(sys.argv[2]))
