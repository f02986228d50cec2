#!/usr/bin/env python3
"""Mutation check: does the suite fail when a feature it names breaks?

Each mutation below is data: a file, an exact snippet of today's code, what to put in its place (the bug),
and the few pytest node ids that must catch it. The script copies the repository to a temporary folder
(without .venv / .git / caches, same relative layout, so the tests run there with this repo's venv and the
same $COMFYUI_PATH), runs the guarding tests once unmutated (they must pass), then applies one mutation at
a time, runs its guarding tests and restores the file.

    .venv/bin/python tools/mutation_check.py              # all mutations (a few minutes on 2 cores)
    .venv/bin/python tools/mutation_check.py --only cfg   # mutations whose name contains 'cfg'
    .venv/bin/python tools/mutation_check.py --list       # the mutations and their guards

Exit status 0 only when every mutation is caught (at least one guarding test fails). Non-zero when one
survives (all its guards pass), when its guards did not run (skipped, e.g. no ComfyUI work tree), when the
unmutated guards fail, or when a mutation's snippet is no longer found in its file ("STALE: update the
snippet" — after a refactor, point the mutation at the code that now carries the feature, and keep its
guards). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # exact text, must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids that must catch it
    what: str  # the bug, in words


SAMPLING = "tests/comfy/test_nodes_sampling.py"
MUTATIONS: list[Mutation] = [
    Mutation(
        "routing-comparison",
        "dcm_core/schedule.py",
        "return DETAIL if math.floor(timestep_of(sigma)) <= boundary_timestep else SEMANTIC",
        "return DETAIL if math.floor(timestep_of(sigma)) < boundary_timestep else SEMANTIC",
        (
            "tests/unit/test_schedule.py::test_routing_rule_uses_float32_timestep_floor",
            f"{SAMPLING}::test_sampler_matches_reference_and_routes_each_step[hunyuan_video-hunyuan-t2v-4step-42-1-1]",
        ),
        "a step at floor(1000·σ) == boundary goes to the semantic expert",
    ),
    Mutation(
        "adapter-segment-expert",
        "dcm_core/comfy_adapter/sampling.py",
        "segments.append(Segment(DETAIL, len(sem) - 1, tuple(det)))",
        "segments.append(Segment(SEMANTIC, len(sem) - 1, tuple(det)))",
        (f"{SAMPLING}::test_sampler_matches_reference_and_routes_each_step[wan-wan2.1-t2v-6step-42-1-1]",),
        "the node runs the detail steps on the semantic expert",
    ),
    Mutation(
        "per-expert-cfg-swap",
        "dcm_core/comfy_adapter/sampling.py",
        "self.guiders[SEMANTIC].set_cfg(float(cfg_semantic))\n        self.guiders[DETAIL].set_cfg(float(cfg_detail))",
        "self.guiders[SEMANTIC].set_cfg(float(cfg_detail))\n        self.guiders[DETAIL].set_cfg(float(cfg_semantic))",
        (f"{SAMPLING}::test_per_expert_cfg_matches_reference_and_runs_negative_only_where_cfg_is_not_1[wan-cfg1-3]",),
        "cfg_semantic and cfg_detail swapped",
    ),
    Mutation(
        "expert-restore-in-finally",
        "dcm_core/modeling.py",
        "    try:\n"
        "        _set_adapters_enabled(model, expert == DETAIL)\n"
        "        if expert == DETAIL:\n"
        "            _swap(model, fam)\n"
        "            swapped = True\n"
        "        yield model\n"
        "    finally:\n"
        "        if swapped:\n"
        "            _swap(model, fam)\n"
        "        _set_adapters_enabled(model, was_enabled)\n",
        "    _set_adapters_enabled(model, expert == DETAIL)\n"
        "    if expert == DETAIL:\n"
        "        _swap(model, fam)\n"
        "        swapped = True\n"
        "    yield model\n"
        "    if swapped:\n"
        "        _swap(model, fam)\n"
        "    _set_adapters_enabled(model, was_enabled)\n",
        ("tests/unit/test_expert_mode.py::test_cancel_inside_a_detail_forward_restores_the_semantic_expert",),
        "the detail expert's LoRA / embedder / head are restored on a normal exit only, not after a cancel",
    ),
    Mutation(
        "resume-rng-restore",
        "dcm_core/train/trainer.py",
        'ck.restore_rng(rng_t, ck.load_json(path / f"rng-rank{rank}.json"), self._generators())',
        "None",
        ("tests/unit/train/test_resume.py::test_resume_with_linear_warmup_schedule_is_exact_and_follows_the_schedule",),
        "resume does not restore the RNG streams",
    ),
    Mutation(
        "resume-lr-scheduler-restore",
        "dcm_core/train/trainer.py",
        'self.lr_scheduler.load_state_dict(ck.load_json(path / "scheduler.json"))',
        "None",
        ("tests/unit/train/test_resume.py::test_resume_with_linear_warmup_schedule_is_exact_and_follows_the_schedule",),
        "resume does not restore the LR scheduler",
    ),
    Mutation(
        "safetensors-duplicate-key",
        "dcm_core/formats/safetensors_io.py",
        "            if k in out:\n",
        "            if False:\n",
        (
            "tests/unit/test_formats_safetensors.py::test_duplicate_key_is_named",
            "tests/unit/test_formats_safetensors.py::test_bad_headers_rejected_with_file_name[duplicate_keys]",
        ),
        "a header listing a key twice is accepted (JSON keeps the last)",
    ),
    Mutation(
        "safetensors-header-cap",
        "dcm_core/formats/safetensors_io.py",
        "        if n > max_header_bytes:\n",
        "        if False:\n",
        ("tests/unit/test_formats_safetensors.py::test_header_size_cap",),
        "no limit on the header length",
    ),
    Mutation(
        "lora-scale-fused",
        "dcm_core/formats/experts.py",
        "scale_of = lambda r: lay.alpha / r",
        "scale_of = lambda r: lay.alpha",
        ("tests/unit/test_formats_experts.py::test_detail_patches_reproduce_the_detail_expert[hunyuan_video]",),
        "the fused (HunyuanVideo q/k/v) detail LoRA is scaled by α instead of α/r",
    ),
    Mutation(
        "lora-scale-alpha",
        "dcm_core/formats/experts.py",
        'detail.append(DetailOp(f"{name}.alpha", (), "alpha", value=float(lay.alpha)))',
        'detail.append(DetailOp(f"{name}.alpha", (), "alpha", value=float(r)))',
        ("tests/unit/test_formats_experts.py::test_detail_patches_reproduce_the_detail_expert[wan]",),
        "the detail LoRA's .alpha is r (scale 1) instead of the recipe's α (scale α/r)",
    ),
    Mutation(
        "family-task-check",
        "dcm_core/formats/experts.py",
        "if e_task and m_task and e_task != m_task:",
        "if False:",
        ("tests/unit/test_families_formats.py::test_refuses_i2v_expert_on_t2v_model",),
        "an image-to-video expert loads silently onto a text-to-video model",
    ),
    Mutation(
        "handover-kept-region",
        "dcm_core/comfy_adapter/sampling.py",
        "x = keep_unmasked(x, latent_image, denoise_mask)",
        "pass",
        ("tests/comfy/test_families_sampling.py::test_wan22_ti2v_5b_one_model_equals_one_stock_sampler",),
        "the second expert keeps the TI2V start frame plus noise instead of the clean frame",
    ),
]

# copied into the temporary repository: everything but these (names anywhere in the tree, or top-level paths)
_SKIP_NAMES = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "node_modules"}
_SKIP_TOP = {"tests/_output", "demo_out", "runs", "out", "bench/.cache", "build", "dist"}


def _ignore(src: str, names: list[str]) -> set[str]:
    rel = Path(src).resolve().relative_to(ROOT)
    return {n for n in names if n in _SKIP_NAMES or (rel / n).as_posix() in _SKIP_TOP}


def check_snippets(mutations: list[Mutation]) -> dict[str, str]:
    """name -> problem (STALE / AMBIGUOUS / missing file) for every mutation that cannot be applied."""
    bad = {}
    for m in mutations:
        path = ROOT / m.file
        if not path.is_file():
            bad[m.name] = f"STALE: update the snippet ({m.file} does not exist)"
            continue
        n = path.read_text(encoding="utf-8").count(m.original)
        if n == 0:
            bad[m.name] = f"STALE: update the snippet (not found in {m.file})"
        elif n > 1:
            bad[m.name] = f"AMBIGUOUS: the snippet occurs {n} times in {m.file}"
    return bad


@dataclass
class Run:
    rc: int
    tests: int
    failed: list[str]
    skipped: int
    seconds: float
    tail: str


def run_tests(repo: Path, python: str, tests: list[str], report: Path, timeout: int) -> Run:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("DCM_REQUIRE_TIERS", None)  # a missing tier shows up here as NOT RUN, per mutation
    cmd = [python, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
           f"--junitxml={report}", *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timed out after {timeout} s\n{e.stdout or ''}"
    dt = time.perf_counter() - t0
    n, failed, skipped = 0, [], 0
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            n += 1
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(case.get("name", "?"))
            elif case.find("skipped") is not None:
                skipped += 1
        report.unlink()
    return Run(rc, n, failed, skipped, dt, "\n".join(out.strip().splitlines()[-15:]))


def verdict(run: Run, expected: int) -> str:
    if run.failed:
        return "caught"
    if run.rc == -1:
        return "TIMEOUT"
    if run.skipped or run.tests < expected:
        return "NOT RUN"
    if run.rc == 0:
        return "SURVIVED"
    return "ERROR"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and their guarding tests")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the guarding tests")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    default_py = ROOT / ".venv" / "bin" / "python"
    ap.add_argument("--python", default=str(default_py if default_py.is_file() else Path(sys.executable)))
    args = ap.parse_args(argv)

    chosen = [m for m in MUTATIONS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.what}\n  {m.file}\n" + "".join(f"  guard: {t}\n" for t in m.tests))
        return 0
    if not chosen:
        print(f"no mutation name contains {args.only!r}", file=sys.stderr)
        return 2

    problems = check_snippets(chosen)
    for name, why in problems.items():
        print(f"{name}: {why}")
    runnable = [m for m in chosen if m.name not in problems]

    tmp = Path(tempfile.mkdtemp(prefix="dcm-mutation-"))
    repo = tmp / ROOT.name
    if runnable:
        print(f"copying {ROOT} -> {repo} (without {', '.join(sorted(_SKIP_NAMES))})", flush=True)
        shutil.copytree(ROOT, repo, symlinks=True, ignore=_ignore)
    report = tmp / "junit.xml"
    rows: list[tuple[str, str, str, str]] = []
    status = 0
    try:
        if not args.no_baseline and runnable:
            guards = list(dict.fromkeys(t for m in runnable for t in m.tests))
            print(f"baseline: {len(guards)} guarding test(s), unmutated ...", flush=True)
            base = run_tests(repo, args.python, guards, report, args.timeout)
            if base.failed or base.rc != 0 or base.skipped or base.tests < len(guards):
                print(f"BASELINE FAILED (rc {base.rc}, {base.tests} run, {base.skipped} skipped, failed: "
                      f"{base.failed}): the guarding tests must pass before mutations mean anything\n{base.tail}")
                return 2
            print(f"baseline: {base.tests} passed in {base.seconds:.0f} s", flush=True)
        for m in runnable:
            target = repo / m.file
            text = target.read_text(encoding="utf-8")
            target.write_text(text.replace(m.original, m.replacement, 1), encoding="utf-8")
            print(f"{m.name}: {m.what} ...", flush=True)
            try:
                run = run_tests(repo, args.python, list(m.tests), report, args.timeout)
            finally:
                target.write_text(text, encoding="utf-8")
            v = verdict(run, len(m.tests))
            by = ", ".join(run.failed) if run.failed else f"{run.tests - run.skipped} passed, {run.skipped} skipped"
            rows.append((m.name, v, by, f"{run.seconds:.0f}"))
            print(f"  -> {v} ({by}, {run.seconds:.0f} s)", flush=True)
            if v != "caught":
                status = 1
                print(run.tail)
    finally:
        if args.keep:
            print(f"kept {repo}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for name, why in problems.items():
        rows.append((name, why.split(":")[0], why, "-"))
        status = 1
    w = [max(len(r[i]) for r in rows + [("mutation", "result", "caught by", "s")]) for i in range(4)]
    line = lambda r: " | ".join(c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    print()
    print(line(("mutation", "result", "caught by", "s")))
    print("-+-".join("-" * x for x in w))
    for r in rows:
        print(line(r))
    caught = sum(r[1] == "caught" for r in rows)
    print(f"\n{caught} of {len(rows)} mutation(s) caught" + ("" if status == 0 else " — NOT ALL CAUGHT"))
    return status


if __name__ == "__main__":
    sys.exit(main())
