"""The pack's ComfyUI compatibility surface: what the pack uses of ComfyUI, checked against recorded facts.

Two halves, one module (the unit test ``tests/unit/test_comfy_surface.py`` imports both):

* **Scan** (:func:`scan_pack`): parses the pack's own source (``__init__.py``, ``nodes/``, ``dcm_core/``) with
  ``ast`` and lists every reference to ComfyUI: imports (``import comfy.sd``, ``from comfy_api.v0_0_2 import
  io``), attribute chains through them (``comfy.sd.load_diffusion_model_state_dict(...)``,
  ``io.Combo.Input(...)``, ``mm.get_torch_device()``) with the call's argument shape, ``super().m(...)`` calls and
  overridden methods in subclasses of ComfyUI classes, and ``.m(...)`` calls whose method name is in the
  ``methods`` list of the surface file (calls on ComfyUI objects such as ``model.clone()``, which cannot be
  resolved statically).
* **Facts** (:func:`extract_module`, :func:`build_surface`): from a directory of ComfyUI source files, the
  top-level names of each module the scan needs (functions with their parameter lists: name, kind, whether a
  default exists; classes with bases and members; module-level constants; imports that make a name available),
  recorded per ComfyUI version with the commit of each file, pruned to what the pack's references touch.
  Only names and parameter facts are stored, never code.

**Check** (:func:`check`): every reference must resolve, and every call must bind
(``inspect.Signature.bind`` on a signature built from the recorded facts), in **every** recorded version.

**Version probes.** A reference that is only meant to work on some versions carries the comment
``# comfy-probe: <reason>`` on its own line or on the first line of a statement that encloses it (the
``if hasattr(...)``, ``try:`` or ``def`` line of a probe helper). A probed reference must still resolve and bind in
at least one recorded version (so a typo behind a probe is still caught). ``hasattr(<comfy ref>, "name")`` and
``getattr(<comfy ref>, "name", default)`` are probes by construction and need no comment.

**Unverifiable.** When a version has no readable copy of a module's file (the newer ComfyUI files are read one by
one, by commit; some are not available), a reference into that module must be listed under
``accepted_unverifiable`` in the surface file with a reason, or the check fails.

Refresh the surface file (after the pack's references changed)::

    .venv/bin/python tools/comfy_surface.py --comfy ~/ComfyUI --label a125cd84 \\
        --comfy /tmp/comfyui-newer --label newer

``--comfy`` without ``MANIFEST.json`` is a git work tree (every file at its ``HEAD``); a directory with a
``MANIFEST.json`` holds single files read by commit (``{"repo": ..., "files": {path: {"commit": ...} or
{"unavailable": reason}}}``; ``"partial_classes": [names]`` marks classes whose members were not all copied).
The hand-kept keys of the surface file (``methods``, ``accepted_unverifiable``) are kept on refresh.
``--comfy recorded:<label>`` keeps the facts already recorded for ``<label>`` (when its directory is gone). ``--check`` prints what the unit test would report.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io as _io
import json
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
SURFACE = ROOT / "dcm_core" / "comfy_adapter" / "compat_surface.json"
PACK_SOURCES = ("__init__.py", "nodes", "dcm_core")
#: top-level module names that belong to ComfyUI (the pack imports its own code relatively)
COMFY_ROOTS = frozenset(
    {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "latent_preview", "node_helpers",
     "nodes", "server", "execution"}
)
PROBE_TAG = "# comfy-probe:"
HAND_KEPT = ("methods", "accepted_unverifiable")
#: members whose signature is the subclass's own business (ComfyUI never calls them with the base's arguments)
OVERRIDE_EXEMPT = frozenset({"__init__", "__new__", "__init_subclass__"})
REFRESH = (".venv/bin/python tools/comfy_surface.py --comfy ~/ComfyUI --label a125cd84 "
           "--comfy /tmp/comfyui-newer --label newer")
REFRESH_HINT = f"refresh the surface file: {REFRESH}"



# =========================================================================== facts (ComfyUI side)


def _params(args: ast.arguments) -> list[list]:
    """``[[name, kind, has_default], ...]`` of a function's parameters."""
    out: list[list] = []
    pos = list(args.posonlyargs) + list(args.args)
    n_def = len(args.defaults)
    first_default = len(pos) - n_def
    for i, a in enumerate(pos):
        kind = "POSITIONAL_ONLY" if i < len(args.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append([a.arg, kind, i >= first_default])
    if args.vararg is not None:
        out.append([args.vararg.arg, "VAR_POSITIONAL", False])
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append([a.arg, "KEYWORD_ONLY", d is not None])
    if args.kwarg is not None:
        out.append([args.kwarg.arg, "VAR_KEYWORD", False])
    return out


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    if isinstance(node, ast.Call):  # @comfytype(io_type=...) -> "comfytype"
        return _dotted(node.func)
    if isinstance(node, ast.Subscript):  # Generic[T] -> "Generic"
        return _dotted(node.value)
    return None


def _absolute(module: str, level: int, package: str) -> str:
    if level == 0:
        return module
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, module] if module else base)


class _FactBuilder:
    def __init__(self, module: str, is_package: bool):
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> dict:
        fact: dict = {"kind": "function", "params": _params(node.args)}
        if isinstance(node, ast.AsyncFunctionDef):
            fact["async"] = True
        if in_class:
            decos = {(_dotted(d) or "").rpartition(".")[2] for d in node.decorator_list}
            binding = "instance"
            for d in ("classmethod", "staticmethod", "property"):
                if d in decos:
                    binding = d
            if binding == "property" or any(x in decos for x in ("setter", "getter", "deleter", "cached_property")):
                return {"kind": "variable", "property": True}
            fact["binding"] = binding
        return fact

    def klass(self, node: ast.ClassDef, names: dict[str, str]) -> dict:
        bases = []
        for b in node.bases:
            d = _dotted(b)
            if d is None:
                continue
            head, _, tail = d.partition(".")
            if head in names:  # resolve a name imported or defined in this module to its absolute place
                d = names[head] + (f".{tail}" if tail else "")
            bases.append(d)
        decos = [(_dotted(d) or "?").rpartition(".")[2] for d in node.decorator_list]
        members: dict[str, Any] = {}
        fields: list[list] = []
        inner_names = dict(names)
        self._body(node.body, members, inner_names, in_class=True, prefix=f"{names.get(node.name, node.name)}")
        if "dataclass" in decos:
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                    if "ClassVar" in ast.dump(st.annotation):
                        continue
                    fields.append([st.target.id, "POSITIONAL_OR_KEYWORD", st.value is not None])
            if "__init__" not in members:
                members["__init__"] = {"kind": "function", "params": [["self", "POSITIONAL_OR_KEYWORD", False], *fields],
                                       "binding": "instance", "synthesized": "dataclass"}
        fact: dict = {"kind": "class", "bases": bases, "members": members}
        if decos:
            fact["decorators"] = decos
        return fact

    def _body(self, body: Iterable[ast.stmt], out: dict, names: dict[str, str], *, in_class: bool, prefix: str) -> None:
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._put(out, st.name, self.function(st, in_class))
            elif isinstance(st, ast.ClassDef):
                names.setdefault(st.name, f"{prefix}.{st.name}")
                self._put(out, st.name, self.klass(st, names))
            elif isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                            value = getattr(st, "value", None)
                            alias = _dotted(value) if isinstance(value, (ast.Name, ast.Attribute)) else None
                            if alias is not None and alias.partition(".")[0] in names and not in_class:
                                head, _, tail = alias.partition(".")
                                target = names[head] + (f".{tail}" if tail else "")
                                out.setdefault(n.id, {"kind": "alias", "target": target})
                            else:
                                out.setdefault(n.id, {"kind": "variable"})
            elif isinstance(st, ast.Import) and not in_class:
                for a in st.names:
                    if a.asname:
                        out.setdefault(a.asname, {"kind": "module", "target": a.name})
                        names[a.asname] = a.name
                    else:
                        head = a.name.partition(".")[0]
                        out.setdefault(head, {"kind": "module", "target": head})
                        names[head] = head
            elif isinstance(st, ast.ImportFrom) and not in_class:
                mod = _absolute(st.module or "", st.level, self.package)
                for a in st.names:
                    if a.name == "*":
                        out.setdefault("*", {"kind": "star", "targets": []})["targets"].append(mod)
                        continue
                    local = a.asname or a.name
                    out.setdefault(local, {"kind": "import", "target": f"{mod}.{a.name}"})
                    names[local] = f"{mod}.{a.name}"
            elif isinstance(st, ast.If):
                if _dotted(st.test) == "TYPE_CHECKING":
                    continue  # annotations only: nothing of it exists at run time
                self._body(st.body, out, names, in_class=in_class, prefix=prefix)
                self._body(st.orelse, out, names, in_class=in_class, prefix=prefix)
            elif isinstance(st, ast.Try) or type(st).__name__ == "TryStar":
                for part in (st.body, *[h.body for h in st.handlers], st.orelse, st.finalbody):
                    self._body(part, out, names, in_class=in_class, prefix=prefix)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                self._body(st.body, out, names, in_class=in_class, prefix=prefix)

    @staticmethod
    def _put(out: dict, name: str, fact: dict) -> None:
        old = out.get(name)
        if old is None or old.get("kind") in ("variable", "import", "module", "alias"):
            out[name] = fact
        elif old.get("kind") == "function" and fact.get("kind") == "function" and old["params"] != fact["params"]:
            # defined more than once (if/else, try/except): a call must bind to one of the definitions
            alts = old.setdefault("alternatives", [])
            if fact["params"] not in alts:
                alts.append(fact["params"])
        else:
            out[name] = fact


def extract_module(source: str, module: str, *, is_package: bool = False) -> dict:
    """Every top-level name of a ComfyUI module, as facts (see the module docstring)."""
    tree = ast.parse(source)
    b = _FactBuilder(module, is_package)
    names: dict[str, str] = {}
    out: dict = {}
    # first pass: where each top-level class/def lives (so bases like ``class A(B)`` resolve to ``module.B``)
    for st in tree.body:
        if isinstance(st, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names[st.name] = f"{module}.{st.name}"
    b._body(tree.body, out, names, in_class=False, prefix=module)
    return out


# =========================================================================== sources of facts


class Source:
    """A directory of ComfyUI files: a git work tree (no MANIFEST.json) or files read by commit (MANIFEST.json)."""

    def __init__(self, path: Path, label: str):
        self.path = Path(path).expanduser()
        self.label = label
        manifest = self.path / "MANIFEST.json"
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else None
        if self.manifest is None:
            try:
                self.tree_commit = subprocess.run(
                    ["git", "-C", str(self.path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
                ).stdout.strip()
            except (OSError, subprocess.CalledProcessError):
                self.tree_commit = "unknown"
        self._cache: dict[str, dict | None] = {}

    def describe(self) -> dict:
        if self.manifest is None:
            return {"kind": "work tree", "repo": "Comfy-Org/ComfyUI", "commit": self.tree_commit}
        return {"kind": "single files read by commit", "repo": self.manifest.get("repo", "Comfy-Org/ComfyUI"),
                "note": self.manifest.get("note", "")}

    def file_of(self, module: str) -> str | None:
        """The repository path of ``module`` if this source has (or declares) it."""
        base = module.replace(".", "/")
        for rel in (f"{base}.py", f"{base}/__init__.py"):
            if (self.path / rel).is_file():
                return rel
            if self.manifest is not None and rel in self.manifest.get("files", {}):
                return rel
        return None

    def is_module(self, module: str) -> bool:
        return self.file_of(module) is not None

    def load(self, module: str) -> dict | None:
        """``{"file", "commit", "names"}`` or ``{"file", "unavailable"}``; None when there is no such module."""
        if module in self._cache:
            return self._cache[module]
        rel = self.file_of(module)
        out: dict | None = None
        if rel is not None:
            entry = (self.manifest or {}).get("files", {}).get(rel, {})
            if "unavailable" in entry:
                out = {"file": rel, "unavailable": entry["unavailable"]}
            else:
                text = (self.path / rel).read_text(encoding="utf-8")
                names = extract_module(text, module, is_package=rel.endswith("__init__.py"))
                for cls in entry.get("partial_classes", []):
                    if cls in names and names[cls].get("kind") == "class":
                        names[cls]["members_partial"] = True
                commit = entry.get("commit") if self.manifest is not None else self.tree_commit
                out = {"file": rel, "commit": commit, "names": names}
                if entry.get("partial"):
                    out["partial"] = True
        self._cache[module] = out
        return out


class RecordedSource:
    """``--comfy recorded:<label>``: the facts already in the surface file for that version, kept as they are.

    For when the directory a version was read from is gone (the newer files were read one by one by commit):
    recorded names stay; a name ComfyUI has whose facts were never recorded stays "unrecorded" (the check fails until
    the version is read again).
    """

    def __init__(self, old: dict, label: str):
        version = old.get("versions", {}).get(label)
        if version is None:
            raise SystemExit(f"recorded:{label}: the surface file has no version {label!r}")
        self.label = label
        self.version = version
        self.modules = version["modules"]

    def describe(self) -> dict:
        return {k: v for k, v in self.version.items() if k not in ("files", "unavailable", "modules")}

    def is_module(self, module: str) -> bool:
        return module in self.modules

    def load(self, module: str) -> dict | None:
        m = self.modules.get(module)
        if m is None or "unavailable" in m:
            return m
        return dict(m)


# =========================================================================== resolution (shared by generator and test)


@dataclass
class Resolved:
    status: str  # found | missing | unavailable | untranscribed | unrecorded | opaque
    fact: dict | None = None
    where: str = ""  # the dotted place the chain resolved to (or failed at)
    rest: str = ""  # the part of the chain beyond a value (not checkable)
    owner_binding: str = ""  # "module" | "class" (how a function fact was reached)
    detail: str = ""


class Facts:
    """Look-ups over one version's module facts; ``touch`` records every fact a resolution used."""

    def __init__(self, loader: Callable[[str], dict | None], is_module: Callable[[str], bool],
                 touch: Callable[[str, str, tuple], None] | None = None):
        self.loader = loader
        self.is_module = is_module
        self.touch = touch or (lambda module, name, path: None)

    # -- chains
    def resolve(self, chain: str, _depth: int = 0) -> Resolved:
        if _depth > 20:
            return Resolved("opaque", where=chain, detail="import cycle")
        parts = chain.split(".")
        for i in range(len(parts), 0, -1):
            mod = ".".join(parts[:i])
            if self.is_module(mod):
                break
        else:
            return Resolved("missing", where=parts[0], detail=f"no module {parts[0]!r} ({REFRESH_HINT})")
        m = self.loader(mod)
        if m is None:
            return Resolved("missing", where=mod, detail=f"no module {mod!r}")
        if "unavailable" in m:
            return Resolved("unavailable", where=mod, detail=f"{m['file']}: {m['unavailable']}")
        cur: Resolved = Resolved("found", {"kind": "module", "module": mod}, where=mod)
        rest = parts[i:]
        for k, p in enumerate(rest):
            cur = self._member(cur, p, _depth)
            if cur.status != "found":
                return cur
            if cur.fact.get("kind") in ("variable", "function"):
                tail = ".".join(rest[k + 1:])
                cur.rest = tail
                return cur
        return cur

    def _member(self, cur: Resolved, name: str, depth: int) -> Resolved:
        fact = cur.fact
        kind = fact.get("kind")
        if kind == "module":
            return self._module_member(fact["module"], name, depth)
        if kind == "class":
            return self._class_member(cur.where, fact, name, depth)
        return Resolved("opaque", where=cur.where)

    def _module_member(self, mod: str, name: str, depth: int) -> Resolved:
        m = self.loader(mod)
        if m is None:
            return Resolved("missing", where=f"{mod}.{name}", detail=f"no module {mod!r}")
        if "unavailable" in m:
            return Resolved("unavailable", where=f"{mod}.{name}", detail=f"{m['file']}: {m['unavailable']}")
        names = m["names"]
        fact = names.get(name)
        if fact is None:
            if self.is_module(f"{mod}.{name}"):  # a submodule
                sub = self.loader(f"{mod}.{name}")
                if sub is not None and "unavailable" in sub:
                    return Resolved("unavailable", where=f"{mod}.{name}", detail=f"{sub['file']}: {sub['unavailable']}")
                return Resolved("found", {"kind": "module", "module": f"{mod}.{name}"}, where=f"{mod}.{name}")
            for star in names.get("*", {}).get("targets", []):
                r = self.resolve(f"{star}.{name}", depth + 1)
                if r.status == "found":
                    self.touch(mod, "*", ())
                    return r
            if m.get("partial"):
                return Resolved("untranscribed", where=f"{mod}.{name}",
                                detail=f"{m['file']} was copied in part; if the pack newly uses it, {REFRESH_HINT}")
            # the file keeps facts only for the names the pack uses: a name it does not know is either new to
            # the pack (refresh) or absent from ComfyUI (the refresh then keeps reporting it)
            return Resolved("missing", where=f"{mod}.{name}",
                            detail=f"{m['file']} @ {str(m.get('commit'))[:8]}; if ComfyUI has it, {REFRESH_HINT}")
        self.touch(mod, name, ())
        k = fact.get("kind")
        if k in ("import", "alias"):
            return self.resolve(fact["target"], depth + 1)
        if k == "module":
            target = fact["target"]
            if self.is_module(target):
                sub = self.loader(target)
                if sub is not None and "unavailable" in sub:
                    return Resolved("unavailable", where=target, detail=f"{sub['file']}: {sub['unavailable']}")
                return Resolved("found", {"kind": "module", "module": target}, where=target)
            return Resolved("opaque", where=target, detail="a module outside ComfyUI")
        return Resolved("found", fact, where=f"{mod}.{name}", owner_binding="module")

    def _class_where(self, where: str) -> tuple[str, tuple]:
        """``comfy.samplers.CFGGuider.X`` -> (``comfy.samplers``, (``CFGGuider``, ``X``))."""
        parts = where.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if self.is_module(".".join(parts[:i])):
                return ".".join(parts[:i]), tuple(parts[i:])
        return parts[0], tuple(parts[1:])

    def _class_member(self, where: str, fact: dict, name: str, depth: int, seen: tuple = ()) -> Resolved:
        mod, path = self._class_where(where)
        members = fact.get("members", {})
        if name in members:
            self.touch(mod, path[0], (*path[1:], name))
            m = members[name]
            if m.get("kind") == "class":
                return Resolved("found", m, where=f"{where}.{name}")
            return Resolved("found", m, where=f"{where}.{name}", owner_binding="class")
        self.touch(mod, path[0], path[1:])
        opaque = False
        for base in fact.get("bases", []):
            if base in seen:
                continue
            r = self.resolve(base, depth + 1)
            if r.status == "found" and r.fact.get("kind") == "class":
                rr = self._class_member(r.where, r.fact, name, depth + 1, (*seen, base))
                if rr.status in ("found", "unavailable", "untranscribed", "unrecorded"):
                    return rr
                opaque = opaque or rr.status == "opaque"
            elif r.status in ("unavailable",):
                return Resolved("unavailable", where=f"{where}.{name}", detail=r.detail)
            elif base not in ("object",):
                opaque = True  # a base outside the recorded facts (ABC, Enum, torch.nn.Module, ...)
        if name in fact.get("all_members", ()):
            return Resolved("unrecorded", where=f"{where}.{name}", detail=f"not in {SURFACE.name}: {REFRESH_HINT}")
        if fact.get("members_partial"):
            return Resolved("untranscribed", where=f"{where}.{name}", detail="members of this class were copied in part")
        if opaque:
            return Resolved("opaque", where=f"{where}.{name}", detail="inherits from a class outside the recorded facts")
        return Resolved("missing", where=f"{where}.{name}", detail=f"{mod} @ recorded commit")

    # -- signatures
    def init_of(self, where: str, fact: dict, depth: int = 0) -> tuple[dict | None, bool]:
        """(``__init__`` fact, known): the constructor a call of the class binds to."""
        r = self._class_member(where, fact, "__init__", depth)
        if r.status == "found" and r.fact.get("kind") == "function":
            return r.fact, True
        if r.status == "missing":
            return {"kind": "function", "params": [["self", "POSITIONAL_OR_KEYWORD", False]], "binding": "instance"}, True
        return None, False


class _Default:
    """Stands for "has a default" (the value itself is not recorded)."""

    def __repr__(self) -> str:
        return "..."


_DEFAULT = _Default()


def signature(params: list[list], *, drop_first: bool) -> inspect.Signature:
    ps = []
    for name, kind, has_default in params:
        default = _DEFAULT if has_default else inspect.Parameter.empty
        ps.append(inspect.Parameter(name, getattr(inspect.Parameter, kind), default=default))
    if drop_first and ps and ps[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        ps = ps[1:]
    return inspect.Signature(ps)


def callable_signatures(r: Resolved, facts: Facts, *, via_instance: bool) -> list[inspect.Signature] | None:
    """The signatures a call of the resolved thing must bind to one of (None: not checkable)."""
    f = r.fact
    if f is None or r.rest:
        return None
    if f.get("kind") == "class":
        init, known = facts.init_of(r.where, f)
        if not known or f.get("decorators") and "dataclass" not in f.get("decorators", []):
            return None
        f, via_instance = init, True
    if f.get("kind") != "function":
        return None
    binding = f.get("binding")
    if binding is None:
        drop = False
    elif binding == "staticmethod":
        drop = False
    elif binding == "classmethod":
        drop = True
    else:
        drop = via_instance
    return [signature(p, drop_first=drop) for p in [f["params"], *f.get("alternatives", [])]]


# =========================================================================== scan (pack side)


@dataclass
class CallShape:
    npos: int
    keywords: tuple[str, ...]
    star: bool = False
    dstar: bool = False

    def text(self) -> str:
        parts = ["_"] * self.npos + (["*_"] if self.star else []) + [f"{k}=_" for k in self.keywords]
        return "(" + ", ".join(parts + (["**_"] if self.dstar else [])) + ")"

    def bind(self, sig: inspect.Signature) -> str | None:
        args = [None] * self.npos
        kwargs = {k: None for k in self.keywords}
        try:
            (sig.bind_partial if self.star or self.dstar else sig.bind)(*args, **kwargs)
        except TypeError as e:
            return str(e)
        return None

    @staticmethod
    def of(call: ast.Call) -> "CallShape":
        npos = 0
        star = False
        for a in call.args:
            if isinstance(a, ast.Starred):
                star = True
                break
            npos += 1
        kws = tuple(k.arg for k in call.keywords if k.arg is not None)
        return CallShape(npos, kws, star, any(k.arg is None for k in call.keywords))


@dataclass
class Ref:
    file: str
    line: int
    kind: str  # import | name | super | override | method
    target: str  # dotted ComfyUI name, or "Class.method" for kind "method"
    call: CallShape | None = None
    probe: str | None = None
    override: list | None = None  # the pack's own parameter facts (kind "override")
    text: str = ""

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _probe_lines(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(_io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(PROBE_TAG):
            out[tok.start[0]] = tok.string[len(PROBE_TAG):].strip()
    return out


def pack_files(root: Path = ROOT) -> list[Path]:
    files = []
    for name in PACK_SOURCES:
        p = root / name
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(x for x in p.rglob("*.py") if "__pycache__" not in x.parts))
    return files


def scan_source(source: str, rel: str, method_names: Iterable[str] = ()) -> list[Ref]:
    """Every ComfyUI reference in one file of pack source (see the module docstring)."""
    tree = ast.parse(source)
    probes = _probe_lines(source)
    method_names = set(method_names)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    refs: list[Ref] = []

    def probe_of(node: ast.AST) -> str | None:
        n: ast.AST | None = node
        while n is not None:
            line = getattr(n, "lineno", None)
            if line in probes and (n is node or isinstance(n, ast.stmt)):
                return probes[line] or "(no reason given)"
            n = parents.get(n)
        return None

    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.partition(".")[0] in COMFY_ROOTS:
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.partition(".")[0]] = a.name.partition(".")[0]
                    refs.append(Ref(rel, node.lineno, "import", a.name, probe=probe_of(node), text=f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").partition(".")[0] in COMFY_ROOTS:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                refs.append(Ref(rel, node.lineno, "import", f"{node.module}.{a.name}", probe=probe_of(node),
                                text=f"from {node.module} import {a.name}"))
    # ``mm = comfy.model_management``: a plain name bound to a ComfyUI chain
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            d = _dotted(node.value) if isinstance(node.value, (ast.Name, ast.Attribute)) else None
            if d and d.partition(".")[0] in aliases:
                head, _, tail = d.partition(".")
                aliases.setdefault(node.targets[0].id, aliases[head] + (f".{tail}" if tail else ""))
    if not aliases:
        return refs

    def chain_of(node: ast.AST) -> str | None:
        d = _dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if d is None:
            return None
        head, _, tail = d.partition(".")
        if head not in aliases:
            return None
        return aliases[head] + (f".{tail}" if tail else "")

    comfy_classes: dict[ast.ClassDef, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = [c for c in (chain_of(b) for b in node.bases) if c]
            if bases:
                comfy_classes[node] = bases

    for node in ast.walk(tree):
        # maximal attribute chains rooted at a ComfyUI alias
        if isinstance(node, (ast.Name, ast.Attribute)):
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.value is node:
                continue
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                continue
            c = chain_of(node)
            is_call = isinstance(parent, ast.Call) and parent.func is node
            if c is None or (isinstance(node, ast.Name) and not is_call):
                continue  # a bare imported name is checked by its import
            call = CallShape.of(parent) if is_call else None
            refs.append(Ref(rel, node.lineno, "name", c, call, probe_of(node), text=ast.unparse(node)))
        if isinstance(node, ast.Call):
            f = node.func
            fname = _dotted(f) if isinstance(f, ast.Name) else None
            # hasattr(comfy.x, "y") / getattr(comfy.x, "y", default): probes by construction
            if fname in ("hasattr", "getattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and isinstance(node.args[1].value, str):
                c = chain_of(node.args[0])
                if c is not None:
                    is_probe = fname == "hasattr" or len(node.args) >= 3
                    refs.append(Ref(rel, node.lineno, "name", f"{c}.{node.args[1].value}", None,
                                    ("hasattr/getattr probe" if is_probe else probe_of(node)),
                                    text=ast.unparse(node)))
            if isinstance(f, ast.Attribute):
                recv = f.value
                if isinstance(recv, ast.Call) and isinstance(recv.func, ast.Name) and recv.func.id == "super":
                    cls = parents.get(node)
                    while cls is not None and not isinstance(cls, ast.ClassDef):
                        cls = parents.get(cls)
                    for base in comfy_classes.get(cls, []) if cls is not None else []:
                        refs.append(Ref(rel, node.lineno, "super", f"{base}.{f.attr}", CallShape.of(node),
                                        probe_of(node), text=ast.unparse(node)))
                elif f.attr in method_names and chain_of(recv) is None:
                    refs.append(Ref(rel, node.lineno, "method", f.attr, CallShape.of(node), probe_of(node),
                                    text=ast.unparse(node)[:120]))
    for cls, bases in comfy_classes.items():
        for st in cls.body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)) and st.name not in OVERRIDE_EXEMPT:
                for base in bases:
                    refs.append(Ref(rel, st.lineno, "override", f"{base}.{st.name}", None, probe_of(st),
                                    override=_params(st.args), text=f"{cls.name}.{st.name}"))
    return refs


_IMPORTS_COMFY = re.compile(r"^\s*(?:import|from)\s[^#\n]*\b(?:" + "|".join(sorted(COMFY_ROOTS)) + r")\b", re.M)


def scan_pack(root: Path = ROOT, method_names: Iterable[str] = ()) -> list[Ref]:
    refs = []
    for p in pack_files(root):
        text = p.read_text(encoding="utf-8")
        if _IMPORTS_COMFY.search(text):  # a file that imports no ComfyUI module references none
            refs.extend(scan_source(text, p.relative_to(root).as_posix(), method_names))
    return refs


# =========================================================================== check


def _recorded_facts(version: dict) -> Facts:
    modules = version["modules"]
    return Facts(lambda m: modules.get(m), lambda m: m in modules)


def _override_problem(base: dict, own: list[list], binding: str) -> str | None:
    """A call ComfyUI's signature allows that the pack's override cannot take (None: compatible)."""
    if any(k in ("VAR_POSITIONAL", "VAR_KEYWORD") for _, k, _ in base["params"]):
        return None  # the base takes anything: the subclass decides its own inputs (ComfyNode.execute)
    drop = binding != "staticmethod"
    params = base["params"][1:] if drop and base["params"] else base["params"]
    mine = signature(own, drop_first=drop)
    shapes = [
        CallShape(sum(k != "KEYWORD_ONLY" for _, k, _ in params), tuple(n for n, k, _ in params if k == "KEYWORD_ONLY")),
        CallShape(sum(k != "KEYWORD_ONLY" and not d for _, k, d in params),
                  tuple(n for n, k, d in params if k == "KEYWORD_ONLY" or (d and k == "POSITIONAL_OR_KEYWORD"))),
    ]
    for s in shapes:
        err = s.bind(mine)
        if err:
            return f"ComfyUI may call it as {s.text()} ({[p[0] for p in params]}), the override refuses: {err}"
    return None


def _one(ref: Ref, facts: Facts, methods: list[dict]) -> tuple[str, str]:
    """(status, message) of one reference in one version: ok | fail | unavailable | opaque."""
    if ref.kind == "method":
        owners = [m["class"] for m in methods if m["method"] == ref.target]
        errors = []
        for owner in owners:
            r = facts.resolve(f"{owner}.{ref.target}")
            if r.status == "unavailable":
                return "unavailable", r.detail
            if r.status != "found":
                errors.append(f"{owner}.{ref.target}: {r.status} ({r.detail})")
                continue
            sigs = callable_signatures(r, facts, via_instance=True)
            if sigs is None:
                return "ok", ""
            errs = [e for e in (ref.call.bind(s) for s in sigs) if e]
            if len(errs) < len(sigs):
                return "ok", ""
            errors.append(f"{owner}.{ref.target}{sigs[0]} does not take {ref.call.text()}: {errs[0]}")
        return "fail", "; ".join(errors) or f"no class listed for method {ref.target!r}"
    r = facts.resolve(ref.target)
    if r.status == "unavailable":
        return "unavailable", r.detail
    if r.status == "opaque":
        return "opaque", r.detail
    if ref.kind == "override" and r.status == "missing":
        return "ok", ""  # a method of the subclass's own, not an override
    if r.status != "found":
        return "fail", f"{r.where} is {r.status} ({r.detail})"
    if ref.kind == "override":
        if r.fact.get("kind") != "function":
            return "ok", ""
        err = _override_problem(r.fact, ref.override or [], r.fact.get("binding", "instance"))
        return ("fail", f"override of {r.where}: {err}") if err else ("ok", "")
    if ref.call is not None:
        sigs = callable_signatures(r, facts, via_instance=ref.kind == "super")
        if sigs:
            errs = [e for e in (ref.call.bind(s) for s in sigs) if e]
            if len(errs) == len(sigs):
                return "fail", f"{r.where}{sigs[0]} does not take {ref.call.text()}: {errs[0]}"
    return "ok", ""


def _accepted(ref: Ref, accepted: dict, methods: list[dict]) -> str | None:
    """The reason a reference into an unreadable file is accepted: a key names one reference exactly
    (``comfy.sample.prepare_noise``), or ends in ``.*`` to cover a name and everything under it."""
    if ref.kind == "method":
        targets = [f"{m['class']}.{ref.target}" for m in methods if m["method"] == ref.target]
    else:
        targets = [ref.target]
    for k, why in accepted.items():
        if k.endswith(".*"):
            if any(t == k[:-2] or t.startswith(k[:-1]) for t in targets):
                return why
        elif k in targets:
            return why
    return None


def check(refs: list[Ref], surface: dict) -> list[str]:
    """Problems (empty: every reference resolves and binds in every recorded version)."""
    versions = surface["versions"]
    methods = surface.get("methods", [])
    accepted = surface.get("accepted_unverifiable", {})
    facts = {label: _recorded_facts(v) for label, v in versions.items()}
    problems = []
    for ref in refs:
        results = {label: _one(ref, f, methods) for label, f in facts.items()}
        shown = f"{ref.where()} `{ref.text or ref.target}`"
        if ref.probe is not None:
            if not any(s in ("ok", "opaque") for s, _ in results.values()):
                why = "; ".join(f"{lb}: {m}" for lb, (s, m) in results.items())
                problems.append(f"{shown} (probed: {ref.probe}) works in no recorded ComfyUI version: {why}")
            continue
        for label, (status, msg) in results.items():
            if status == "fail":
                problems.append(f"{shown} fails on ComfyUI {label}: {msg}")
            elif status == "unavailable" and _accepted(ref, accepted, methods) is None:
                problems.append(
                    f"{shown} cannot be checked on ComfyUI {label} ({msg}); list {ref.target!r} under "
                    f"accepted_unverifiable in {SURFACE.name} with a reason, or mark the call '{PROBE_TAG} <reason>'"
                )
    return problems


def load_surface(path: Path = SURFACE) -> dict:
    return json.loads(path.read_text())


def method_names(surface: dict) -> list[str]:
    return sorted({m["method"] for m in surface.get("methods", [])})


# =========================================================================== generator


def _prune(full: dict, touched: dict[str, dict[str, set]]) -> dict:
    """Module facts restricted to the names (and class members) a resolution touched."""
    out: dict = {}
    for mod, names in sorted(touched.items()):
        m = full.get(mod)
        if m is None:
            continue
        if "unavailable" in m:
            out[mod] = m
            continue
        keep: dict = {}
        for name, paths in sorted(names.items()):
            fact = m["names"].get(name)
            if fact is None:
                continue
            keep[name] = _prune_fact(fact, paths)
        out[mod] = {k: v for k, v in m.items() if k not in ("names", "all_names")} | {"names": keep}
    return out


def _prune_fact(fact: dict, paths: set) -> dict:
    if fact.get("kind") != "class":
        return fact
    members: dict = {}
    heads: dict[str, set] = {}
    for p in paths:
        if p:
            heads.setdefault(p[0], set()).add(tuple(p[1:]))
    for name in sorted(heads):
        if name in fact["members"]:
            members[name] = _prune_fact(fact["members"][name], heads[name])
    return {k: v for k, v in fact.items() if k != "members"} | {"all_members": fact.get("all_members") or sorted(fact["members"]), "members": members}


def build_surface(sources: list[Source], refs: list[Ref], old: dict) -> dict:
    """The surface file for ``refs`` from each source (hand-kept keys of ``old`` carried over)."""
    methods = old.get("methods", [])
    out: dict = {
        "about": [
            "Facts about ComfyUI (names, parameter names/kinds, whether a default exists; no code) for every ComfyUI",
            "name the pack references, per recorded ComfyUI version and file commit. Generated by",
            "tools/comfy_surface.py from the pack's own source scan; checked by tests/unit/test_comfy_surface.py.",
            "Hand-kept: 'methods' (ComfyUI class methods the pack calls on ComfyUI objects: a '.method(' call in a",
            "file that imports ComfyUI is checked against them) and 'accepted_unverifiable' (references into files",
            "that have no readable newer version, with the reason). Version probe: '# comfy-probe: <reason>' on the",
            "reference's line or on the first line of an enclosing statement; a probed reference must work in at",
            "least one recorded version.",
        ],
        "versions": {},
        "methods": methods,
        "accepted_unverifiable": old.get("accepted_unverifiable", {}),
    }
    for src in sources:
        touched: dict[str, dict[str, set]] = {}
        loaded: dict[str, dict | None] = {}

        def loader(mod: str) -> dict | None:
            m = src.load(mod)
            loaded[mod] = m
            touched.setdefault(mod, {}) if m is not None else None
            return m

        def touch(mod: str, name: str, path: tuple) -> None:
            touched.setdefault(mod, {}).setdefault(name, set()).add(path)

        facts = Facts(loader, src.is_module, touch)
        for ref in refs:
            if ref.kind == "method":
                for m in methods:
                    if m["method"] == ref.target:
                        facts.resolve(f"{m['class']}.{ref.target}")
            else:
                r = facts.resolve(ref.target)
                if r.status == "found" and r.fact.get("kind") == "class" and ref.call is not None:
                    facts.init_of(r.where, r.fact)
        for m in methods:  # record the listed methods even when no call names them yet
            facts.resolve(f"{m['class']}.{m['method']}")
        full = {k: v for k, v in loaded.items() if v is not None}
        modules = _prune(full, touched)
        files = {}
        unavailable = {}
        for mod, m in sorted(modules.items()):
            if "unavailable" in m:
                unavailable[m["file"]] = m["unavailable"]
            else:
                files[m["file"]] = m["commit"]
        out["versions"][src.label] = {**src.describe(), "files": files, "unavailable": unavailable, "modules": modules}
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, set):
        return sorted(x)
    raise TypeError(type(x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", action="append", default=[], type=Path, help="a directory of ComfyUI files (repeat)")
    ap.add_argument("--label", action="append", default=[], help="the version label of each --comfy, in order")
    ap.add_argument("--out", type=Path, default=SURFACE)
    ap.add_argument("--check", action="store_true", help="only check the pack against --out and print problems")
    a = ap.parse_args(argv)
    old = load_surface(a.out) if a.out.is_file() else load_surface(SURFACE) if SURFACE.is_file() else {}
    if a.check:
        problems = check(scan_pack(ROOT, method_names(old)), old)
        print("\n".join(problems) or "ok: every ComfyUI reference resolves and binds in every recorded version")
        return 1 if problems else 0
    if not a.comfy or len(a.comfy) != len(a.label):
        ap.error("give --comfy DIR --label NAME pairs (one label per directory)")
    refs = scan_pack(ROOT, method_names(old))
    sources = [RecordedSource(old, str(p)[len("recorded:"):]) if str(p).startswith("recorded:") else Source(p, lb)
               for p, lb in zip(a.comfy, a.label)]
    surface = build_surface(sources, refs, old)
    a.out.write_text(json.dumps(surface, indent=1, sort_keys=False, default=_jsonable) + "\n")
    problems = check(refs, json.loads(a.out.read_text()))
    n_mod = {lb: len(v["modules"]) for lb, v in surface["versions"].items()}
    print(f"wrote {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}: {len(refs)} references, modules {n_mod}")
    for p in problems:
        print("  problem:", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
