"""Registry readiness: pyproject.toml follows the Comfy Registry's rules, the published zip holds the
pack and nothing heavy, and requirements.txt survives ComfyUI-Manager's per-line ``pip install``.

Rules (docs.comfy.org/registry/specifications):
* ``project.name`` is the node id: < 100 characters, only ASCII letters, digits, ``-``, ``_``, ``.``,
  no consecutive special characters, starts with a letter (not a digit or special character); this
  pack also keeps it lowercase, without "comfyui", and ending in a letter or digit (PEP 508).
* ``project.version`` is semver X.Y.Z; ``[project.urls] Repository`` and ``[tool.comfy] PublisherId``
  are required. The registry only says the publisher id is globally unique and used in URLs; we hold
  it to the registry's URL-safe form: lowercase letters, digits and single hyphens.
* requirements.txt: ComfyUI-Manager pip-installs each non-comment line on its own, never installs
  torch / torchvision / torchaudio / torchsde, and never downgrades those nor transformers,
  safetensors, kornia. A line must not pin (==, <, <=, ~=) a package ComfyUI itself requires.

`comfy node validate` and `comfy node pack` (comfy-cli, offline) run on a clean clone of HEAD, i.e.
what a publish would upload; without comfy-cli the zip is built the same way from `git ls-files`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from tools.comfy_inprocess import comfyui_path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMFY_BIN = Path(sys.executable).parent / "comfy"
COMFYUI = comfyui_path()
PINNED_COMFYUI = "0.3.64"

# ComfyUI-Manager (manager_core / execute_install_script)
PIP_BLACKLIST = {"torch", "torchaudio", "torchsde", "torchvision"}
PIP_DOWNGRADE_BLACKLIST = {"torch", "torchaudio", "torchsde", "torchvision", "transformers", "safetensors", "kornia"}

MAX_FILE_BYTES = 2 * 1024 * 1024  # any one file in the registry zip
MAX_TOTAL_BYTES = 20 * 1024 * 1024  # all of it but the bundled toy models, uncompressed
MAX_TOY_WEIGHTS_BYTES = 30 * 1000 * 1000  # the bundled toy models: the toy world's budget (≤ 30 MB)
HEAVY_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".gguf", ".npz", ".npy", ".mp4", ".webm", ".gif")
HEAVY_ALLOWED_UNDER = ("dcm_core/toy/weights/",)  # the bundled toy models (pyproject package-data)


# --------------------------------------------------------------------------- rule helpers
def node_id_problems(name: str) -> list[str]:
    """Why ``name`` is not a valid Comfy Registry node id for this pack ([] when it is)."""
    p = []
    if not name:
        return ["empty"]
    if len(name) >= 100:
        p.append("100 characters or more")
    if re.search(r"[^A-Za-z0-9._-]", name):
        p.append("characters other than letters, digits, '-', '_', '.'")
    if re.search(r"[._-]{2,}", name):
        p.append("consecutive special characters")
    if not re.match(r"[A-Za-z]", name):
        p.append("does not start with a letter")
    if not re.search(r"[A-Za-z0-9]$", name):
        p.append("does not end with a letter or digit")
    if name != name.lower():
        p.append("not lowercase")
    if "comfyui" in name.lower():
        p.append("contains 'comfyui'")
    return p


def publisher_id_problems(pid: str) -> list[str]:
    p = []
    if not pid:
        return ["empty"]
    if len(pid) >= 100:
        p.append("100 characters or more")
    if not re.fullmatch(r"[a-z][a-z0-9-]*[a-z0-9]", pid):
        p.append("not lowercase letters/digits/hyphens starting with a letter")
    if "--" in pid:
        p.append("consecutive hyphens")
    return p


SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")


def comfyui_requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in (COMFYUI / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            r = Requirement(line)
            reqs[canon(r.name)] = r
    return reqs


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_problems(line: str, comfy_reqs: dict[str, Requirement]) -> list[str]:
    """What goes wrong when ComfyUI-Manager runs ``pip install <line>`` next to ComfyUI."""
    if line.startswith("-"):
        return [f"{line!r}: pip options/-r lines are not installed per line by ComfyUI-Manager"]
    if "#" in line:
        return [f"{line!r}: inline comment (the whole line, comment included, goes to pip)"]
    try:
        r = Requirement(line)
    except InvalidRequirement as e:
        return [f"{line!r}: not a requirement ({e})"]
    name, p = canon(r.name), []
    if name in PIP_BLACKLIST:
        p.append(f"{line!r}: {r.name} is ComfyUI's to install (ComfyUI-Manager skips it; comfy-cli would install it)")
    if r.url:
        p.append(f"{line!r}: a URL requirement")
    if name in comfy_reqs or name in PIP_DOWNGRADE_BLACKLIST:
        caps = [s for s in r.specifier if s.operator in ("==", "===", "<", "<=", "~=")]
        if caps:
            p.append(f"{line!r}: pins/caps {r.name}, which ComfyUI itself requires ({comfy_reqs.get(name, 'Manager')})")
        ours = comfy_reqs.get(name)
        exact = [s.version for s in (ours.specifier if ours else []) if s.operator == "=="]
        if exact and not r.specifier.contains(exact[0], prereleases=True):
            p.append(f"{line!r}: excludes ComfyUI's pinned {r.name}=={exact[0]}")
    return p


def requirement_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


# --------------------------------------------------------------------------- the helpers themselves
@pytest.mark.parametrize(
    "name, ok",
    [("dcm-video", True), ("image-processor", True), ("super.res_2", True), ("ComfyUI-enhancer", False),
     ("123-tool", False), ("-tool", False), ("a--b", False), ("a_.b", False), ("has space", False),
     ("Upper", False), ("x" * 100, False), ("my-comfyui-pack", False), ("tool-", False), ("", False)],
)  # fmt: skip
def test_node_id_rule(name, ok):
    assert (node_id_problems(name) == []) is ok, node_id_problems(name)


@pytest.mark.parametrize(
    "line, ok",
    [("einops", True), ("opencv-python>=4.8", True), ("numpy>=1.25", True), ("torch", False),
     ("torchvision>=0.20", False), ("transformers==4.30.0", False), ("numpy<2", False),
     ("safetensors~=0.4", False), ("kornia<=0.7", False), ("comfyui-frontend-package>=1.28", False),
     ("--index-url https://example.org/simple", False), ("einops  # tensor ops", False),
     ("not a requirement!", False)],
)  # fmt: skip
def test_requirement_rule(line, ok):
    comfy = {canon(n): Requirement(s) for n, s in [
        ("numpy", "numpy>=1.25.0"), ("transformers", "transformers>=4.37.2"), ("safetensors", "safetensors>=0.4.2"),
        ("kornia", "kornia>=0.7.1"), ("comfyui-frontend-package", "comfyui-frontend-package==1.27.10")]}  # fmt: skip
    assert (requirement_problems(line, comfy) == []) is ok, requirement_problems(line, comfy)


# --------------------------------------------------------------------------- pyproject.toml
def test_pyproject_has_the_registry_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT.get("tool", {}).get("comfy", {})
    assert node_id_problems(project.get("name", "")) == [], f"project.name {project.get('name')!r}"
    assert SEMVER.fullmatch(project.get("version", "")), f"project.version {project.get('version')!r} is not X.Y.Z"
    assert "version" not in project.get("dynamic", [])
    assert project.get("description", "").strip(), "project.description is empty"
    lic = project.get("license")
    assert isinstance(lic, dict) and (lic.get("text") or lic.get("file")), (
        'license = {file = "LICENSE"} or {text = "..."}'
    )
    if lic.get("file"):
        assert (ROOT / lic["file"]).is_file(), f"license file {lic['file']} is missing"
    repo = project.get("urls", {}).get("Repository", "")
    assert re.match(r"https://\S+$", repo), f"[project.urls] Repository {repo!r}"
    assert publisher_id_problems(comfy.get("PublisherId", "")) == [], (
        f"[tool.comfy] PublisherId {comfy.get('PublisherId')!r}"
    )
    assert comfy.get("DisplayName", "").strip(), "[tool.comfy] DisplayName"
    icon = comfy.get("Icon", "")
    assert icon == "" or re.match(r"https://\S+\.(svg|png|jpe?g|gif|webp)$", icon, re.I), f"Icon {icon!r}"
    assert isinstance(comfy.get("includes", []), list)


def test_requires_comfyui_admits_the_tested_version():
    spec = PYPROJECT["tool"]["comfy"].get("requires-comfyui", "")
    assert spec, "[tool.comfy] requires-comfyui is missing (V3 nodes need ComfyUI >= 0.3.48)"
    try:
        s = SpecifierSet(spec)
    except InvalidSpecifier as e:
        pytest.fail(f"requires-comfyui {spec!r}: {e}")
    assert s.contains(PINNED_COMFYUI), f"requires-comfyui {spec!r} excludes the tested ComfyUI {PINNED_COMFYUI}"
    assert not s.contains("0.3.47"), f"requires-comfyui {spec!r} admits ComfyUI without the V3 node API"


def test_classifiers_are_ones_the_registry_reads():
    classifiers = PYPROJECT["project"].get("classifiers", [])
    oses = [c[len("Operating System :: ") :] for c in classifiers if c.startswith("Operating System :: ")]
    assert all(o.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")) for o in oses), oses
    accel = [c[len("Environment :: ") :] for c in classifiers if c.startswith("Environment :: ")]
    known = ("GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal")
    assert all(a in known for a in accel), accel


def test_comfy_cli_reads_pyproject():
    parser = pytest.importorskip("comfy_cli.registry.config_parser", reason="comfy-cli not installed")
    cfg = parser.extract_node_configuration(str(ROOT / "pyproject.toml"))
    assert cfg is not None
    assert cfg.project.name == PYPROJECT["project"]["name"]
    assert cfg.project.version == PYPROJECT["project"]["version"]
    assert cfg.tool_comfy.publisher_id == PYPROJECT["tool"]["comfy"]["PublisherId"]
    assert cfg.project.urls.repository
    assert cfg.project.supported_comfyui_version == PYPROJECT["tool"]["comfy"]["requires-comfyui"]


def test_comfyui_reads_pyproject():
    """ComfyUI keys a pack's web folder and metadata by project.name (comfy_config.config_parser)."""
    if not (COMFYUI / "comfy_config" / "config_parser.py").is_file():
        pytest.skip(f"no ComfyUI work tree at {COMFYUI}")
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from comfy_config.config_parser import extract_node_configuration as x;"
        "c = x(sys.argv[2]); print(json.dumps([c.project.name, c.project.version, c.tool_comfy.publisher_id]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(COMFYUI), str(ROOT)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr[-2000:]
    name, version, pid = json.loads(r.stdout.strip().splitlines()[-1])
    assert (name, version, pid) == (
        PYPROJECT["project"]["name"],
        PYPROJECT["project"]["version"],
        PYPROJECT["tool"]["comfy"]["PublisherId"],
    )


# --------------------------------------------------------------------------- the registry zip
@pytest.fixture(scope="module")
def clean_clone(tmp_path_factory):
    """HEAD, cloned: what `comfy node publish` / `pack` would see on a fresh checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    dst = tmp_path_factory.mktemp("registry") / "pack"
    r = subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dst


@pytest.fixture(scope="module")
def comfy_home(tmp_path_factory) -> Path:
    """A throwaway HOME for comfy-cli (its config lives there) with telemetry off."""
    home = tmp_path_factory.mktemp("comfy_home")
    if COMFY_BIN.is_file():
        _comfy(["--skip-prompt", "tracking", "disable"], home, home)
    return home


def _comfy(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(home), PATH=f"{COMFY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               DO_NOT_TRACK="1", PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    return subprocess.run([str(COMFY_BIN), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_comfy_node_validate(clean_clone, comfy_home):
    if not COMFY_BIN.is_file():
        pytest.skip("comfy-cli not installed (tools/bootstrap.sh installs it); the field checks above stand alone")
    r = _comfy(["node", "validate"], clean_clone, comfy_home)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert "Security warnings found" not in text, text  # ruff S102/S307/E702: exec, eval, `a; b`


@pytest.fixture(scope="module")
def registry_zip(clean_clone, comfy_home) -> Path:
    """`comfy node pack` on the clean clone; without comfy-cli the same zip from `git ls-files`."""
    if COMFY_BIN.is_file():
        r = _comfy(["node", "pack"], clean_clone, comfy_home)
        assert r.returncode == 0, r.stdout + r.stderr
        z = clean_clone / "node.zip"
        assert z.is_file(), r.stdout + r.stderr
        return z
    files = subprocess.run(["git", "ls-files", "-z"], cwd=clean_clone, capture_output=True, check=True).stdout
    ignore = clean_clone / ".comfyignore"  # this pack's .comfyignore holds folder prefixes only
    skip = tuple(ln.strip() for ln in (ignore.read_text().splitlines() if ignore.is_file() else [])
                 if ln.strip() and not ln.startswith("#"))  # fmt: skip
    z = clean_clone / "node.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel in filter(None, files.decode().split("\0")):
            if (clean_clone / rel).is_file() and not (skip and rel.startswith(skip)):
                zf.write(clean_clone / rel, rel)
    return z


def test_registry_zip_holds_the_pack(registry_zip):
    names = set(zipfile.ZipFile(registry_zip).namelist())
    missing = [n for n in ("__init__.py", "pyproject.toml", "LICENSE", "requirements.txt") if n not in names]
    assert not missing, f"the registry zip lacks {missing}"
    for folder in ("nodes/", "dcm_core/", "workflows/"):
        assert any(n.startswith(folder) and n.endswith(".py" if folder != "workflows/" else ".json") for n in names), (
            folder
        )
    committed = {f"workflows/{p.name}" for p in (registry_zip.parent / "workflows").glob("*.json")}
    assert committed and committed <= names, f"workflows missing from the zip: {sorted(committed - names)}"
    assert "README.md" in names, "pyproject.toml's readme points at README.md"
    # development folders stay in git but out of what artists download (.comfyignore)
    dev = sorted({n.split("/")[0] for n in names if n.startswith(("tests/", "bench/", "tools/", ".ci/"))})
    assert not dev, f"development folders in the registry zip: {dev} (see .comfyignore)"
    toy = {"dcm_core/toy/weights/dcm_toy_wan.safetensors", "dcm_core/toy/weights/manifest.json"}
    assert toy <= names, f"the toy workflow's model is missing from the zip: {sorted(toy - names)}"


def test_registry_zip_has_nothing_heavy_or_local(registry_zip):
    zf = zipfile.ZipFile(registry_zip)
    infos = [i for i in zf.infolist() if not i.is_dir()]
    bad_paths = [i.filename for i in infos if re.search(
        r"(^|/)(\.venv|venv|node_modules|__pycache__|\.pytest_cache|\.ruff_cache|\.hypothesis)/|^tests/_output/|\.pyc$|(^|/)node\.zip$",
        i.filename)]  # fmt: skip
    assert not bad_paths, f"local/build files in the registry zip: {bad_paths[:20]}"
    big = [(i.filename, i.file_size) for i in infos
           if i.file_size > MAX_FILE_BYTES and not i.filename.startswith(HEAVY_ALLOWED_UNDER)]  # fmt: skip
    assert not big, f"files over {MAX_FILE_BYTES >> 20} MiB in the registry zip: {big}"
    heavy = [
        i.filename
        for i in infos
        if i.filename.lower().endswith(HEAVY_SUFFIXES) and not i.filename.startswith(HEAVY_ALLOWED_UNDER)
    ]
    assert not heavy, f"model/media fixtures in the registry zip (keep them out of git or add a .comfyignore): {heavy}"
    toy = sum(i.file_size for i in infos if i.filename.startswith(HEAVY_ALLOWED_UNDER))
    total = sum(i.file_size for i in infos) - toy
    assert total < MAX_TOTAL_BYTES, f"registry zip holds {total / 2**20:.1f} MiB uncompressed besides the toy models"
    assert toy <= MAX_TOY_WEIGHTS_BYTES, f"the bundled toy models in the registry zip take {toy / 1e6:.1f} MB (budget 30 MB)"


# --------------------------------------------------------------------------- requirements
def test_requirements_survive_manager_per_line_install():
    lines = requirement_lines(ROOT / "requirements.txt") + list(PYPROJECT["project"].get("dependencies", []))
    comfy = comfyui_requirements() if (COMFYUI / "requirements.txt").is_file() else {}
    problems = [p for ln in lines for p in requirement_problems(ln, comfy)]
    assert not problems, "\n".join(problems)


def test_requirement_lines_install_one_by_one():
    """ComfyUI-Manager runs `pip install <line>` for each line; each must resolve on its own."""
    # `git clone` + `pip install -r requirements.txt` (the manual install) must work as well.
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--disable-pip-version-check", "-q",
                        "-r", str(ROOT / "requirements.txt")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, f"pip install --dry-run -r requirements.txt failed:\n{r.stderr[-2000:]}"
    lines = requirement_lines(ROOT / "requirements.txt")
    if not lines:
        return  # nothing for Manager to install: the nodes use only what ComfyUI ships
    for ln in lines:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--disable-pip-version-check", "-q", ln],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, f"pip install --dry-run {ln!r} failed:\n{r.stderr[-2000:]}"
        # --dry-run reports what would change; nothing ComfyUI needs may be replaced by an older version.
        for m in re.finditer(r"Would install (.*)", r.stdout):
            for pkg in m.group(1).split():
                name, _, ver = pkg.rpartition("-")
                if canon(name) in PIP_DOWNGRADE_BLACKLIST:
                    try:
                        have = Version(metadata.version(name))
                    except metadata.PackageNotFoundError:
                        continue
                    assert Version(ver) >= have, f"{ln!r} would downgrade {name} {have} to {ver}"


# --------------------------------------------------------------------------- workflows ↔ registry id
def test_workflow_nodes_name_this_pack_by_its_registry_id():
    """The frontend (missing-nodes dialog) and ComfyUI-Manager look packs up by ``properties.cnr_id``:
    the pack's nodes must carry the registry id, and the examples need no other custom-node pack."""
    name = PYPROJECT["project"]["name"]
    for path in sorted((ROOT / "workflows").glob("*.json")):
        for node in json.loads(path.read_text()).get("nodes", []):
            cnr = (node.get("properties") or {}).get("cnr_id")
            if node["type"].startswith("DCM"):
                assert cnr in (None, name), (
                    f"{path.name}: {node['type']} #{node['id']} has cnr_id {cnr!r}, not {name!r}"
                )
            else:
                assert cnr in (None, "comfy-core", name), f"{path.name}: {node['type']} needs another pack ({cnr!r})"
