"""One error hierarchy for the whole pack.

Every error the pack raises on purpose is a :class:`DCMError`. Each subclass also
derives from the builtin exception that fits (``ValueError``, ``FileNotFoundError``,
``RuntimeError``), so ComfyUI and ordinary ``except ValueError`` code treat them
normally. Messages follow one rule: say what failed, name the file / key / value,
and say what to do about it.
"""

from __future__ import annotations


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
]
