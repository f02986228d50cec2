"""One error hierarchy for the whole pack.

Every error the pack raises on purpose is a :class:`DCMError`. Each subclass also
derives from the builtin exception that fits (``ValueError``, ``FileNotFoundError``,
``RuntimeError``, ``OSError``), so ComfyUI and ordinary ``except ValueError`` code treat them
normally. Messages follow one rule: say what failed, name the file / key / value,
and say what to do about it.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from contextlib import contextmanager
from typing import Iterator


class DCMError(Exception):
    """Base class of every error raised on purpose by the DCM pack."""


class DCMFileNotFoundError(DCMError, FileNotFoundError):
    """A file the user named does not exist or cannot be opened."""


class DCMFormatError(DCMError, ValueError):
    """A file is damaged, truncated, lies in its header, or is not safetensors."""


class DCMUnsupportedFileError(DCMFormatError):
    """A readable file of the wrong kind (a plain base model, a style LoRA, a pickle...)."""


class DCMIncompatibleModelError(DCMError, ValueError):
    """An expert file does not fit the model it is applied to (family, size, missing keys)."""


class DCMCoverageError(DCMIncompatibleModelError):
    """ComfyUI did not accept every patch an expert needs (would silently load nothing)."""


class DCMScheduleError(DCMError, ValueError):
    """A sigma list, preset, step count or boundary is invalid."""


class DCMConfigError(DCMError, ValueError):
    """A training / CLI configuration value is invalid."""


class DCMSamplingError(DCMError, RuntimeError):
    """Sampling produced an invalid result (NaN / Inf) or got unusable inputs."""


class DCMCheckpointError(DCMError, RuntimeError):
    """A training checkpoint is missing, incomplete or corrupted."""


class DCMWriteError(DCMError, OSError):
    """Output files could not be written (disk full, no permission, read-only folder...).

    Raised only after the partial output was removed: nothing is left under the final names. Also an
    :class:`OSError` (``.errno`` is the underlying error number when known, e.g. ``errno.ENOSPC``), so
    code that catches ``OSError`` around a write keeps working. ``str()`` is the message alone.
    """

    def __init__(self, errno: int | None, message: str, *, reason: str | None = None) -> None:
        super().__init__(errno, message)
        #: the underlying cause alone, e.g. "No space left on device"
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()

    @staticmethod
    def describe(exc: BaseException) -> tuple[int | None, str]:
        """``(errno, reason)`` of a failed write: an :class:`OSError`, safetensors' ``SafetensorError``
        (whose text carries the OS error, e.g. ``... No space left on device (os error 28)``) or a
        nested :class:`DCMWriteError` (its own underlying reason)."""
        if isinstance(exc, DCMWriteError):
            return exc.errno, exc.reason or str(exc)
        if isinstance(exc, OSError):
            return exc.errno, exc.strerror or str(exc)
        text = str(exc)
        m = re.search(r"os error (\d+)|code: (\d+)", text)
        code = int(m.group(1) or m.group(2)) if m else None
        if code is None and ("No space left" in text or "StorageFull" in text):
            code = _errno.ENOSPC
        if code is not None:
            return code, os.strerror(code)
        return None, text


__all__ = [
    "DCMError",
    "DCMFileNotFoundError",
    "DCMFormatError",
    "DCMUnsupportedFileError",
    "DCMIncompatibleModelError",
    "DCMCoverageError",
    "DCMScheduleError",
    "DCMConfigError",
    "DCMSamplingError",
    "DCMCheckpointError",
    "DCMWriteError",
]


@contextmanager
def node_errors(node: str) -> Iterator[None]:
    """Name the node in every :class:`DCMError` raised inside (once), keeping its type and traceback.

    The adapter's entry points run their body under ``with node_errors(NAME):``; messages from the
    formats / schedule layers (which name the file or value and the fix) then read
    ``"<node display name>: <message>"`` in ComfyUI's error dialog.
    """
    try:
        yield
    except DCMError as e:
        if not str(e).startswith(node):
            if isinstance(e, DCMWriteError) and len(e.args) > 1:
                e.args = (e.args[0], f"{node}: {e.args[1]}", *e.args[2:])
            else:
                e.args = (f"{node}: {e}",)
        raise
