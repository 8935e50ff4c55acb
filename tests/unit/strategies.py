"""What the property tests (``test_*_properties.py``) share: the hypothesis settings,
the file trees the cgroup and /proc readers are given, and the strategies of more than
one module (log text, JSON values, mostly-good values)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from celery_guard.cgroups import V1_UNLIMITED

#: Plain properties; no example database, so nothing is written into the repository.
QUICK = settings(max_examples=250, deadline=None, database=None)
#: Properties that build a file tree per example: fewer examples, and the tree is slow.
FILES = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HUGE = 1 << 62  # cgroups: anything this large is a sentinel, never a limit


# ---------------------------------------------------------------------------------------
# file trees


class Odd(Enum):
    """A file that is not a regular file with contents."""

    MISSING = "missing"
    DIRECTORY = "a directory"
    LOOP = "a symlink to itself"


def _put(path: Path, content: bytes | Odd) -> None:
    if content is Odd.MISSING:
        return
    if content is Odd.DIRECTORY:
        path.mkdir()
    elif content is Odd.LOOP:
        path.symlink_to(path.name)
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)


#: What a kernel file holding one number might hold instead.
NUMBER_TEXT = st.one_of(
    st.integers(0, 2**64).map(str),
    st.sampled_from(
        [
            "max",
            "-1",
            "+5",
            "1_000",
            " 7 ",
            "0x10",
            "1e3",
            "",
            "\u0661\u0662",  # Arabic-Indic digits: isdigit() but not ASCII
            "\u00b2",  # superscript two: isdigit(), and int() refuses it
            str(min(V1_UNLIMITED)),
            str(HUGE),
        ]
    ),
    st.text(max_size=12),
)
STAT_KEYS = [
    "inactive_file",
    "total_inactive_file",
    "hierarchical_memory_limit",
    "oom_kill",
    "oom_kill_disable",
    "under_oom",
    "oom",
    "max",
]
#: memory.stat, memory.events, memory.oom_control: ``key N`` lines, more or less.
KEY_VALUE_TEXT = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(STAT_KEYS), st.text(max_size=8)),
        st.sampled_from([" ", "  ", "\t", ""]),
        NUMBER_TEXT,
    ),
    max_size=6,
).map(lambda rows: "".join(f"{key}{sep}{value}\n" for key, sep, value in rows))
FILE = st.one_of(
    st.sampled_from(Odd),
    st.binary(max_size=48),
    NUMBER_TEXT.map(lambda text: (text + "\n").encode()),
    KEY_VALUE_TEXT.map(str.encode),
)
CGROUP_FILES = [
    "memory.max",
    "memory.high",
    "memory.current",
    "memory.stat",
    "memory.events",
    "memory.oom.group",
    "memory.limit_in_bytes",
    "memory.usage_in_bytes",
    "memory.oom_control",
]
#: A cgroup directory per level, mount point first, each with some of the files.
LEVELS = st.lists(
    st.dictionaries(st.sampled_from(CGROUP_FILES), FILE, max_size=len(CGROUP_FILES)),
    min_size=1,
    max_size=4,
)


def _levels(root: Path, levels: list[Mapping[str, bytes | Odd]]) -> list[Path]:
    """Make root/cg/l1/l2... with each level's files; the directories, mount first."""
    directory, made = root / "cg", []
    for depth, files in enumerate(levels):
        if depth:
            directory = directory / f"l{depth}"
        directory.mkdir()
        for name, content in files.items():
            _put(directory / name, content)
        made.append(directory)
    return made


# ---------------------------------------------------------------------------------------
# shared by several modules

#: Bytes read from a log as `celery-guard recommend` reads them.
DECODED = st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace"))
JSON_ANY = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nineteen times in twenty: a garbled value stops load_settings, so the later
    options and the water-mark check are only reached when most values parse."""
    return st.tuples(st.integers(0, 19), good, bad).map(lambda t: t[2] if t[0] == 0 else t[1])
