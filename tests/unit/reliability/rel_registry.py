"""Session registry of the reliability suite: generated cases per property, failures, the figures table.

Loaded as the plain module ``rel_registry`` (its folder is put on ``sys.path`` by the reliability
conftests), so tests/unit/reliability and tests/comfy/reliability share one registry per session.

* :func:`case` counts one generated case of a property (and a failure if the body raises);
* :func:`settings` gives hypothesis settings with the short (``make test``) or the full
  (``--reliability-full`` / ``DCM_RELIABILITY_FULL=1``, ``make reliability``) example count;
* :func:`terminal_summary` prints the table (category, cases tried, failures found, all survived)
  and writes ``tests/_output/reliability/<category>.json`` plus ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
OUT_DIR = ROOT / "tests" / "_output" / "reliability"

FULL = os.environ.get("DCM_RELIABILITY_FULL", "").strip().lower() in ("1", "true", "yes", "on")

#: (category, property) -> counters
_ROWS: dict[tuple[str, str], dict] = {}
#: table order (categories not listed follow in order of first use)
CATEGORY_ORDER = [
    "truncated files", "header length lies", "garbled headers", "non-JSON headers", "inconsistent header entries",
    "duplicate keys", "missing tensors", "NaN/Inf tensors", "LoRA rank mismatch", "expert on the wrong base",
    "plain base models", "style LoRAs", "pickle files", "CLI inspect / convert",
    "cancel storm", "exception in a model call", "refused inputs", "NaN/Inf during sampling",
    "trainer SIGKILL + resume", "corrupted checkpoint", "disk full on export",
]
_ORDER: list[str] = []
#: categories touched by the test now running, and categories whose test failed
_CURRENT: set[str] = set()
_FAILED_CATEGORIES: set[str] = set()
#: the running test is marked xfail (a known bug, reported): its failures count as known bugs
_XFAIL = False
_PRINTED = False


def configure(config) -> None:
    global FULL
    try:
        if config.getoption("--reliability-full"):
            FULL = True
    except ValueError:  # option not registered (tests/conftest.py not loaded): env only
        pass


def examples(short: int, full: int) -> int:
    """Example count for the current mode."""
    return full if FULL else short


def settings(short: int, full: int, **kw):
    """hypothesis settings: the mode's example count, no deadline (we bound time ourselves), no database."""
    from hypothesis import HealthCheck
    from hypothesis import settings as hs

    base = dict(
        max_examples=examples(short, full),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
    base.update(kw)
    return hs(**base)


def _row(category: str, prop: str) -> dict:
    key = (category, prop)
    if key not in _ROWS:
        _ROWS[key] = dict(category=category, property=prop, cases=0, failures=0, known_bugs=0, seconds=0.0, signatures=[])
        if category not in _ORDER:
            _ORDER.append(category)
    return _ROWS[key]


def _is_control_flow(e: BaseException) -> bool:
    """hypothesis' assume() / pytest.skip are not failures."""
    name = type(e).__name__
    return name in ("UnsatisfiedAssumption", "Skipped", "StopTest", "Frozen", "KeyboardInterrupt")


@contextlib.contextmanager
def case(category: str, prop: str, n: int = 1):
    """Count ``n`` generated case(s) of ``prop`` in ``category``; a raising body counts as a failure."""
    row = _row(category, prop)
    _CURRENT.add(category)
    row["cases"] += n
    t0 = time.perf_counter()
    try:
        yield row
    except BaseException as e:
        if not _is_control_flow(e):
            # hypothesis replays and shrinks a failing example many times: count distinct failures
            sig = _signature(e)
            if sig not in row["signatures"]:
                row["signatures"].append(sig)
                row["known_bugs" if _XFAIL else "failures"] += 1
        raise
    finally:
        row["seconds"] += time.perf_counter() - t0


def _signature(e: BaseException) -> str:
    """Exception type + first message line with numbers, paths and quoted names blanked."""
    line = (str(e).strip().splitlines() or [""])[0]
    line = re.sub(r"/\S+", "<path>", line)
    line = re.sub(r"'[^']*'", "<name>", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return f"{type(e).__name__}: {line[:160]}"


def begin_test(xfail: bool = False) -> None:
    global _XFAIL
    _CURRENT.clear()
    _XFAIL = xfail


def end_test(failed: bool) -> None:
    global _XFAIL
    if failed and not _XFAIL:
        _FAILED_CATEGORIES.update(_CURRENT)
    _CURRENT.clear()
    _XFAIL = False


def rows() -> list[dict]:
    return [dict(r) for r in _ROWS.values()]


def _ordered() -> list[str]:
    known = [c for c in CATEGORY_ORDER if c in _ORDER]
    return known + [c for c in _ORDER if c not in known]


def categories() -> list[dict]:
    out = []
    for cat in _ordered():
        rs = [r for r in _ROWS.values() if r["category"] == cat]
        failures = sum(r["failures"] for r in rs)
        known = sum(r["known_bugs"] for r in rs)
        out.append(
            dict(
                category=cat,
                properties=len(rs),
                cases=sum(r["cases"] for r in rs),
                failures=failures,
                known_bugs=known,
                survived=failures == 0 and known == 0 and cat not in _FAILED_CATEGORIES,
                failed_test=cat in _FAILED_CATEGORIES,
                seconds=round(sum(r["seconds"] for r in rs), 2),
            )
        )
    return out


def _survived(c: dict) -> str:
    if c["survived"]:
        return "yes"
    if c["failures"] or c["failed_test"]:
        return "NO"
    return f"no: {c['known_bugs']} known bug (xfail)"


def table_lines() -> list[str]:
    cats = categories()
    w = max([len("category")] + [len(c["category"]) for c in cats])
    head = f"{'category':<{w}} | {'cases tried':>11} | {'failures found':>14} | all survived"
    lines = [head, "-" * len(head)]
    for c in cats:
        fails = f"{c['failures']}" + (f" + {c['known_bugs']} xfail" if c["known_bugs"] else "")
        lines.append(f"{c['category']:<{w}} | {c['cases']:>11} | {fails:>14} | {_survived(c)}")
    tot_cases = sum(c["cases"] for c in cats)
    tot_fail = sum(c["failures"] for c in cats)
    tot_known = sum(c["known_bugs"] for c in cats)
    fails = f"{tot_fail}" + (f" + {tot_known} xfail" if tot_known else "")
    lines.append("-" * len(head))
    verdict = "yes" if all(c["survived"] for c in cats) else ("NO" if any(_survived(c) == "NO" for c in cats) else
                                                              f"no: {tot_known} known bug(s) (xfail)")
    lines.append(f"{'total':<{w}} | {tot_cases:>11} | {fails:>14} | {verdict}")
    return lines


def property_lines() -> list[str]:
    rs = list(_ROWS.values())
    w = max([len("property")] + [len(r["property"]) for r in rs])
    lines = [f"  {'property':<{w}} | {'cases':>6} | {'failures':>8} | {'seconds':>7}"]  # failures incl. xfail
    for cat in _ordered():
        for r in rs:
            if r["category"] == cat:
                lines.append(f"  {r['property']:<{w}} | {r['cases']:>6} | {r['failures'] + r['known_bugs']:>8} | {r['seconds']:>7.1f}")
    return lines


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def write_json() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    mode = "full" if FULL else "short"
    for c in categories():
        props = [r for r in rows() if r["category"] == c["category"]]
        data = dict(c, mode=mode, properties=props)
        (OUT_DIR / f"{_slug(c['category'])}.json").write_text(json.dumps(data, indent=2) + "\n")
    summary = dict(mode=mode, categories=categories(), properties=rows(), table="\n".join(table_lines()))
    (OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def terminal_summary(terminalreporter) -> None:
    global _PRINTED
    if _PRINTED or not _ROWS:
        return
    _PRINTED = True
    tr = terminalreporter
    mode = "full (--reliability-full)" if FULL else "short (make test; full counts: make reliability)"
    tr.write_sep("=", f"DCM reliability figures — {mode}")
    for line in table_lines():
        tr.write_line(line)
    tr.write_line("")
    tr.write_line("generated cases per property:")
    for line in property_lines():
        tr.write_line(line)
    try:
        write_json()
        tr.write_line(f"(written to {OUT_DIR.relative_to(ROOT)}/)")
    except OSError as e:  # pragma: no cover - read-only checkout
        tr.write_line(f"(could not write {OUT_DIR}: {e})")


# --------------------------------------------------------------------------- pytest hooks
# Both tiers' reliability conftest.py import these three (pytest collects hooks from a conftest's namespace).


def pytest_configure(config):
    configure(config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    begin_test(xfail=item.get_closest_marker("xfail") is not None)
    outcome = yield
    end_test(outcome.excinfo is not None)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminal_summary(terminalreporter)
