"""Resident memory of this process (or a child), sampled in a thread, with per-phase peaks.

RSS is read from ``/proc/<pid>/status`` (``VmRSS`` = ``RssAnon`` + ``RssFile`` + ``RssShmem``): ``anon`` is
memory the process allocated, ``file`` is file pages it has mapped and touched (e.g. a safetensors file
read through ``mmap``: clean page cache, reclaimable, but counted in RSS while mapped).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time


def read_status(pid: int | str = "self") -> dict[str, int]:
    """``{"rss", "anon", "file", "hwm"}`` in bytes (0 when /proc is unavailable)."""
    out = {"rss": 0, "anon": 0, "file": 0, "hwm": 0}
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "hwm"}
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                parts = line.split()
                k = keys.get(parts[0].decode()) if parts else None
                if k:
                    out[k] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def trim() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``) so the next phase starts clean."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Monitor:
    """Background sampler of a process's RSS; :meth:`phase` yields a dict filled with the phase's numbers."""

    def __init__(self, pid: int | str = "self", interval: float = 0.02):
        self.pid = pid
        self.interval = interval
        self._lock = threading.Lock()
        self._peak = {"rss": 0, "anon": 0, "file": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-monitor", daemon=True)
        self.alive = True

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            if not self.alive:
                return
            time.sleep(self.interval)

    def sample(self) -> dict[str, int]:
        s = read_status(self.pid)
        if not s["rss"]:
            self.alive = False
        with self._lock:
            for k in self._peak:
                self._peak[k] = max(self._peak[k], s[k])
        return s

    def reset(self) -> dict[str, int]:
        s = read_status(self.pid)
        with self._lock:
            self._peak = {k: s[k] for k in self._peak}
        return s

    def peak(self) -> dict[str, int]:
        self.sample()
        with self._lock:
            return dict(self._peak)

    @contextlib.contextmanager
    def phase(self):
        """``with mon.phase() as p:`` → ``p = {"start": {...}, "peak": {...}, "end": {...}}`` after the block."""
        rec: dict = {}
        rec["start"] = self.reset()
        try:
            yield rec
        finally:
            rec["peak"] = self.peak()
            rec["end"] = read_status(self.pid)
