"""``python -m dcm_core`` / ``dcm``: an argparse subcommand registry.

Subcommands are registered lazily so ``--help`` stays fast (no torch import until a command runs).
Two ways to add one:

* ``register(name, help, module)`` where ``module`` (a dotted path) exposes ``add_parser(subparsers)``
  that creates the sub-parser and sets ``set_defaults(_run=fn)``, ``fn(args) -> int``;
* ``register_command(name, help, add_arguments, run)`` with plain callables (imported eagerly by the caller).

Every :class:`~dcm_core.errors.DCMError` becomes its message on stderr and exit code 2 (no traceback);
``DCM_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    module: str | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int | None] | None = None


_REGISTRY: dict[str, _Command] = {}


def register(name: str, help: str, module: str) -> None:
    """Register a subcommand implemented by ``module.add_parser(subparsers)`` (imported only when used)."""
    _REGISTRY[name] = _Command(name, help, module=module)


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
) -> None:
    """Register a subcommand from two callables."""
    _REGISTRY[name] = _Command(name, help, add_arguments=add_arguments, run=run)


# Built-in and planned subcommands. A module that does not exist yet is simply not listed.
register("convert", "split an official DCM checkpoint into ComfyUI semantic + detail-expert files", "dcm_core.convert")


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="one or more .safetensors files")


def _inspect_run(args: argparse.Namespace) -> int:
    from .formats import inspect_file

    for i, f in enumerate(args.files):
        if i:
            print()
        print(inspect_file(f).describe())
    return 0


register_command(
    "inspect",
    "say what a .safetensors file is (family, role, dims, rank, alpha + source, dtype, tensors, boundary, preset)",
    _inspect_arguments,
    _inspect_run,
)
for _name, _help, _mod in (
    ("train", "train DCM experts (headless)", "dcm_core.train.cli"),
    ("preprocess", "precompute latents / text embeddings for training", "dcm_core.train.preprocess"),
    ("export", "export trained experts to pack-native files", "dcm_core.train.export"),
    ("demo", "run the toy end-to-end demo", "dcm_core.toy.demo"),
):
    register(_name, _help, _mod)


def _module_available(mod: str) -> bool:
    """Whether ``dcm_core.x.y`` exists, checked on disk so that nothing is imported (fast ``--help``)."""
    parts = mod.split(".")
    if parts[0] != "dcm_core":
        try:
            import importlib.util

            return importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            return False
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser. Only the subcommand named in ``argv`` is imported."""
    parser = argparse.ArgumentParser(
        prog="python -m dcm_core",
        description="DCM (Dual-Expert Consistency Model) tools for ComfyUI: convert and inspect checkpoints, train experts.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for cmd in _REGISTRY.values():
        if cmd.module is not None:
            if cmd.name == wanted:
                mod = importlib.import_module(cmd.module)
                if not hasattr(mod, "add_parser"):
                    raise SystemExit(f"internal error: {cmd.module} has no add_parser(subparsers) for '{cmd.name}'")
                mod.add_parser(sub)
            elif _module_available(cmd.module):
                sub.add_parser(cmd.name, help=cmd.help, add_help=False)
        else:
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
            cmd.add_arguments(p)
            p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 0 if args.command is None else 2
    from .errors import DCMError

    try:
        return int(run(args) or 0)
    except DCMError as e:
        if os.environ.get("DCM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
