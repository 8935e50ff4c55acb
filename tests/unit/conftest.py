"""The unit tests: no Redis, no cgroup, no root. This directory goes on sys.path so that
the property tests import their shared strategies (``import strategies``) whatever
pytest's import mode."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for directory in (str(HERE), str(HERE.parent)):  # strategies; needs (tests/needs.py)
    if directory not in sys.path:
        sys.path.insert(0, directory)
