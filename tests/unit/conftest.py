"""The unit tests: no Redis, no cgroup, no root. This directory goes on sys.path so that
the property tests import their shared strategies (``import strategies``) whatever
pytest's import mode."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
