"""Property tests (hypothesis) of celery_guard.footprint: the ``kB`` fields and
pymalloc statistics round-trip, and a garbled /proc directory still gives a footprint
and an estimate."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from strategies import DECODED, FILE, FILES, NUMBER_TEXT, QUICK, Odd, _put

from celery_guard.footprint import (
    Allocators,
    Footprint,
    estimate_child,
    measure,
    parse_pymalloc_stats,
)
from celery_guard.procfs import parse_kib_fields

KIB_NAME = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"), exclude_characters=":"),
    min_size=1,
    max_size=12,
).filter(str.strip)


@QUICK
@given(
    rows=st.lists(
        st.tuples(
            KIB_NAME,
            st.sampled_from([" ", "\t", "       "]),
            st.one_of(
                st.integers(0, 2**50).map(str),
                st.sampled_from(["\u0661\u0662", "\u00b2", "+5", "-1", "1_000", "0x10", "1.5"]),
            ),
        ),
        max_size=8,
    ),
    noise=st.lists(st.text(max_size=30).filter(lambda s: "kB" not in s), max_size=4),
)
def test_kib_fields_round_trip(rows: list[tuple[str, str, str]], noise: list[str]) -> None:
    """Plain decimals only (int() alone would take "+5" and Arabic-Indic digits)."""
    lines = [f"{name}:{pad}{n} kB" for name, pad, n in rows]
    expected = {name.strip(): int(n) * 1024 for name, _, n in rows if n.isascii() and n.isdigit()}
    assert parse_kib_fields("\n".join(noise + lines)) == expected


@QUICK
@given(text=st.one_of(st.text(max_size=200), DECODED))
def test_kib_fields_never_raise(text: str) -> None:
    fields = parse_kib_fields(text)
    assert all(type(v) is int and v >= 0 and v % 1024 == 0 for v in fields.values())


@QUICK
@given(
    n=st.integers(0, 2**63),
    commas=st.booleans(),
    pad=st.sampled_from([b" ", b"            ", b"\t"]),
    before=st.lists(st.binary(max_size=40).filter(lambda b: b"allocated" not in b), max_size=4),
    after=st.lists(st.binary(max_size=40), max_size=4),
)
def test_pymalloc_stats_round_trip(
    n: int, commas: bool, pad: bytes, before: list[bytes], after: list[bytes]
) -> None:
    figure = f"{n:,}" if commas else str(n)
    line = b"# bytes in allocated blocks" + pad + b"=" + pad + figure.encode()
    assert parse_pymalloc_stats(b"\n".join([*before, line, *after])) == n


@QUICK
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=100).map(lambda b: b"# bytes in allocated blocks = " + b),
    )
)
def test_pymalloc_stats_never_raise(data: bytes) -> None:
    live = parse_pymalloc_stats(data)
    assert live is None or (type(live) is int and live >= 0)


KIB_TEXT = st.lists(
    st.one_of(
        st.builds(
            "{}:\t{} kB".format,
            st.sampled_from(["Rss", "Anonymous", "VmRSS", "RssAnon", "VmPTE"]),
            NUMBER_TEXT,
        ),
        st.text(max_size=20),
    ),
    max_size=6,
).map(lambda lines: "\n".join(lines).encode())


@FILES
@given(
    status=st.one_of(FILE, KIB_TEXT),
    rollup=st.one_of(FILE, KIB_TEXT),
    allocators=st.one_of(
        st.none(),
        st.builds(
            Allocators,
            st.one_of(st.none(), st.integers(0, 2**40)),
            st.one_of(st.none(), st.integers(0, 2**40)),
            st.integers(0, 2**40),
            st.integers(0, 2**20),
        ),
    ),
    forked=st.booleans(),
)
def test_footprint_of_a_garbled_proc_directory(
    status: bytes | Odd, rollup: bytes | Odd, allocators: Allocators | None, forked: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _put(Path(tmp) / "status", status)
        _put(Path(tmp) / "smaps_rollup", rollup)
        footprint = measure(Path(tmp).name, str(Path(tmp).parent), allocators)
    assert isinstance(footprint, Footprint)
    assert min(footprint.rss, footprint.anonymous, footprint.page_tables) >= 0
    estimate = estimate_child(footprint, forked)
    assert type(estimate.bytes) is int and estimate.bytes >= 0
    assert estimate.method in ("objects", "anonymous", "spawn")
