"""The one way a test says that this machine lacks a part it needs (Redis, a cgroup-v1
memory controller, a CPU controller, an optional package, a capability): it skips with
the reason, and with ``GUARD_TESTS_STRICT=1`` (CI, on a machine that has every part) it
fails instead, so a green CI run never hides a test that did not run.

``tests/unit/test_needs.py`` checks that no test skips any other way.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

STRICT = os.environ.get("GUARD_TESTS_STRICT") == "1"


def unavailable(reason: str, module_level: bool = False) -> NoReturn:
    """Skip the test (or the module) for ``reason``; under strict mode, fail it."""
    if STRICT:
        pytest.fail(f"{reason} (GUARD_TESTS_STRICT=1: every part is required here)")
    pytest.skip(reason, allow_module_level=module_level)


def module(name: str, module_level: bool = False) -> ModuleType:
    """Import an optional package (an extra's) the test needs, or say it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        unavailable(f"{name} is not installed ({error})", module_level)
