"""``python -m dcm_core.toy.evaluate`` (``make toy-eval``): measured quality of the bundled toy models.

Runs the toy VBench (:mod:`dcm_core.toy.vbench`) on the bundle — the teacher (50 steps on the toy grid, with
its CFG), DCM, plain flow-Euler on the teacher and the LCM-style single expert — plus the runs of
``make toy-models`` that are not bundled (the PCM-style phased single expert, DCM without GAN / feature
matching, and with ``--ablations`` DCM without the TC loss), at 2, 4 and 6 steps on 64 fixed prompt/seed pairs,
and checks the targets (:func:`dcm_core.toy.vbench.targets`). ``--quick``: 4 pairs at 2 and 4 steps (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import models as M


def write_report(res: dict, out: str | Path, t0: float, render) -> None:
    """Stamp the wall time, write ``res`` as JSON to ``out`` and print its table (``render(res)``)."""
    res["wall_seconds"] = round(time.time() - t0, 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(render(res))
    print(f"\n(wrote {out}; {res['wall_seconds']} s)")


def main(argv: list[str] | None = None) -> int:
    from . import vbench

    p = argparse.ArgumentParser(prog="python -m dcm_core.toy.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(M.WEIGHTS_DIR), help="toy bundle folder (default: the bundled one)")
    p.add_argument("--runs", default="runs/toy_v2", help="`make toy-models` folder of the not-bundled runs ('' for none)")
    p.add_argument("--quick", action="store_true", help="4 pairs at 2 and 4 steps (a smoke run)")
    p.add_argument("--out", default="runs/toy_v2/vbench.json")
    a = p.parse_args(argv)
    args = ["--weights", a.weights, "--runs", a.runs, "--out", a.out]
    if a.quick:
        args += ["--pairs", "4", "--steps", "2,4"]
    return vbench.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
