"""``python -m dcm_core ...`` (see :mod:`dcm_core.cli`)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
