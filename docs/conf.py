"""Sphinx configuration: the pages are Markdown (MyST), the theme is furo.

Build with warnings as errors, as CI does (``.ci/run``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The version without importing the package (and Celery with it).
_VERSION = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "celery_guard" / "__init__.py").read_text(), re.M
)

project = "celery-guard"
author = "the celery-guard maintainers"
copyright = "the celery-guard maintainers"
version = release = _VERSION.group(1) if _VERSION else "unknown"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
#: ``api.md`` is generated from the docstrings: the package is imported from the checkout.
import sys  # noqa: E402

sys.path.insert(0, str(ROOT))
autodoc_member_order = "bysource"
autodoc_typehints = "description"
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
#: Links to headings (``page.md#a-heading``) resolve with GitHub's slugs, so every link
#: works both on GitHub and in the built site.
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"celery-guard {release}"

#: The pages link to ``../BENCHMARKS.md`` so that the link works on GitHub; the built site
#: has that file as its own page (``benchmarks.md`` includes it).
_BENCHMARKS_LINK = re.compile(r"\]\(\.\./BENCHMARKS\.md(#[^)]*)?\)")


def _benchmarks_link(app: Any, docname: str, source: list[str]) -> None:
    source[0] = _BENCHMARKS_LINK.sub(lambda m: f"](benchmarks.md{m.group(1) or ''})", source[0])


def setup(app: Any) -> None:
    app.connect("source-read", _benchmarks_link)
