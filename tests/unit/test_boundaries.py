"""Architecture rules: only dcm_core/comfy_adapter imports ComfyUI; nodes import only comfy_api + dcm_core."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "folder_paths", "nodes", "server", "latent_preview", "node_helpers", "comfy_extras",
                 "comfy_execution", "execution"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_only_the_adapter_imports_comfyui():
    offenders = []
    for p in sorted((ROOT / "dcm_core").rglob("*.py")):
        if "comfy_adapter" in p.relative_to(ROOT).parts:
            continue
        bad = _imports(p) & (COMFY_MODULES | {"comfy_api"})
        if bad:
            offenders.append(f"{p.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, offenders


def test_nodes_import_only_comfy_api_and_the_engine():
    offenders = []
    for p in sorted((ROOT / "nodes").rglob("*.py")):
        bad = _imports(p) & COMFY_MODULES
        if bad:
            offenders.append(f"{p.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, offenders


def test_root_init_does_no_work_at_import():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top = [type(n).__name__ for n in tree.body]
    assert set(top) <= {"Expr", "AsyncFunctionDef", "FunctionDef", "Assign"}, top
    assert any(isinstance(n, (ast.AsyncFunctionDef, ast.FunctionDef)) and n.name == "comfy_entrypoint" for n in tree.body)
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)


def test_no_pickle_loading_anywhere():
    """No call to torch.load / pickle.load(s) / numpy allow_pickle in the product code."""
    offenders = []
    for base in ("dcm_core", "nodes"):
        for p in sorted((ROOT / base).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text(), str(p))):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                name = f"{getattr(getattr(f, 'value', None), 'id', '')}.{getattr(f, 'attr', getattr(f, 'id', ''))}"
                if name in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler"):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}: {name}")
                if any(k.arg == "allow_pickle" for k in node.keywords):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}: allow_pickle")
    assert not offenders, offenders
