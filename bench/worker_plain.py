"""The reference for the loading scenario: a plain ``safetensors.torch.load_file`` of the same file.

    python -m bench.worker_plain FILE OUT.json

Wall/CPU time and the RSS peak (anon + file pages) of ``load_file`` plus one read pass over every tensor
(``load_file`` maps the file lazily: without the pass nothing would be read), in a fresh process (torch
imported before the clock starts).
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    path, out = (argv or sys.argv[1:])[:2]
    import torch  # noqa: F401
    from safetensors.torch import load_file

    from . import rss

    with rss.Monitor() as mon:
        with mon.phase() as ph:
            t0, c0 = time.perf_counter(), time.process_time()
            sd = load_file(path)
            n = 0
            for t in sd.values():
                n += t.numel() * t.element_size()
                if t.is_floating_point():
                    float(t.sum())
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with open(out, "w") as fh:
        json.dump({"wall": wall, "cpu": cpu, "bytes": n, "tensors": len(sd), "rss": ph}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
