"""Property tests (hypothesis) of celery_guard.stats: every sample falls in its bucket,
percentiles are on the safe side of the nearest rank, histograms merge and round-trip
through JSON; recommend never raises, keeps the bounds its settings promise and moves the
right way when a figure does (its worked figures are the table in test_stats.py)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import QUICK

from celery_guard import cli
from celery_guard.logreader import peak_histogram
from celery_guard.stats import ExpHistogram, Recommendation, recommend

LAYOUT = st.one_of(
    st.just((1.0, 1.01, 1200)),  # peak_histogram()
    st.just((1024.0 * 1024, 1.05, 600)),  # the default
    st.just((1.0, 2.0, 64)),  # every bound a power of two: samples land on them
    st.tuples(st.floats(0.5, 4096), st.floats(1.001, 3.0), st.integers(1, 600)),
)
SAMPLES = st.lists(  # no int past 1.8e308: see test_histogram_huge_ints
    st.one_of(st.integers(0, 2**40), st.integers(0, 40).map(lambda k: 2**k)),
    min_size=1,
    max_size=60,
)


def _histogram(layout: tuple[float, float, int], samples: list[int]) -> ExpHistogram:
    hist = ExpHistogram(*layout)
    for value in samples:
        hist.add(value)
    return hist


@QUICK
@given(layout=LAYOUT, samples=SAMPLES)
def test_every_sample_falls_inside_its_bucket(
    layout: tuple[float, float, int], samples: list[int]
) -> None:
    hist = ExpHistogram(*layout)
    indexes = [hist.bucket(value) for value in sorted(samples)]
    assert indexes == sorted(indexes)
    for value, index in zip(sorted(samples), indexes, strict=True):
        assert 0 <= index < hist.max_buckets
        assert hist.lower(index) <= value < hist.upper(index)


@QUICK
@given(layout=LAYOUT, samples=SAMPLES, ps=st.lists(st.integers(0, 100), min_size=1, max_size=5))
def test_percentiles_are_the_upper_bound_of_the_nearest_rank_bucket(
    layout: tuple[float, float, int], samples: list[int], ps: list[int]
) -> None:
    hist = _histogram(layout, samples)
    ordered = sorted(samples)
    assert (hist.count, hist.min, hist.max) == (len(samples), ordered[0], ordered[-1])
    for p in ps:
        rank = max(1, math.ceil(Fraction(len(samples) * p, 100)))
        nearest = ordered[rank - 1]
        expected = min(hist.upper(hist.bucket(nearest)), ordered[-1])
        assert hist.percentile(p) == expected, (p, nearest)
        assert nearest <= hist.percentile(p) <= ordered[-1]  # the safe side
    p50, p95, p100 = (hist.percentile(p) for p in (50, 95, 100))
    assert p50 is not None and p95 is not None
    assert ordered[0] <= p50 <= p95 <= p100 == ordered[-1]


#: A summary figure, never so small that a budget divided by it passes 1.8e308.
FIGURE = st.one_of(st.just(0.0), st.floats(-1e12, -1e-6), st.floats(1e-6, 1e12))


MIB_SAMPLES = st.lists(st.integers(0, 10**6), max_size=30)


@QUICK
@given(
    limit=st.floats(0, 1e6),
    headroom=st.floats(0, 1e5),
    parent=st.floats(0, 1e5),
    concurrency=st.integers(-2, 64),
    private=MIB_SAMPLES,
    peaks=MIB_SAMPLES,
    margin=st.floats(0, 1),
)
def test_recommend_from_histograms(
    limit: float,
    headroom: float,
    parent: float,
    concurrency: int,
    private: list[int],
    peaks: list[int],
    margin: float,
) -> None:
    """What the settings promise, not how they are computed: the concurrency is the most
    children whose p95 private memory fits the budget (one at least, so one more never
    fits); the recycling limit is the healthy peaks with the margin, to the KiB, when the
    current children can afford them, and else the most they can afford, to the KiB."""
    private_hist = _histogram((1.0, 1.01, 1200), private)
    peak_hist = peak_histogram()
    for value in peaks:
        peak_hist.add(value)
    p50, p95 = private_hist.percentile(50), private_hist.percentile(95)
    peak50, peak95 = peak_hist.percentile(50), peak_hist.percentile(95)
    advice = recommend(
        limit_mib=limit,
        headroom_mib=headroom,
        parent_rss_mib=parent,
        concurrency=concurrency,
        private_p50_mib=p50,
        private_p95_mib=p95,
        peak_rss_p50_mib=peak50,
        peak_rss_p95_mib=peak95,
        margin=margin,
    )
    assert isinstance(advice, Recommendation) and isinstance(advice.note, str)
    budget = limit - headroom - parent  # MiB left for the children
    if budget <= 0:
        assert (advice.max_memory_per_child_kib, advice.concurrency) == (None, 1)
        return
    children = advice.concurrency
    if p95 is None or p95 <= 0:
        assert children is None
    else:  # to a relative 1e-12: budget / p95 is a float division
        assert type(children) is int and children >= 1
        assert children == 1 or children * p95 <= budget * (1 + 1e-12)
        assert (children + 1) * p95 > budget * (1 - 1e-12)
    if p50 is None or peak50 is None or peak95 is None:
        assert advice.max_memory_per_child_kib is None and advice.note == ""
        return
    kib = advice.max_memory_per_child_kib
    assert type(kib) is int and kib >= 0
    # the pair: the recycle value is for the recommended children (the current ones
    # when there is no private p95 to count them by)
    pool = children if children is not None else max(concurrency, 1)
    healthy = peak95 * (1 + margin)  # MiB: the healthy peaks with the margin
    shared = max(peak50 - p50, 0)  # MiB of a child's peak RSS that is not its own

    def taken(peak_mib: float, count: int = pool) -> float:
        """The budget ``count`` children take, each peaking at peak_mib."""
        return count * (peak_mib - shared)

    slack = pool * 1e-6  # a byte a child, for float rounding: far below a KiB
    if advice.note == "":
        assert advice.alternative_concurrency is None
        assert taken(healthy) <= budget + slack
        assert healthy * 1024 - 1 < kib <= healthy * 1024 + 1e-5
        return
    assert taken(healthy) > budget - slack  # the healthy peaks are beyond the budget
    # the most the recommended children can afford: the limit fits, one KiB more does not
    assert taken(kib / 1024) <= budget + slack
    assert taken((kib + 1) / 1024) > budget - slack
    # the alternative: the most children that fit the budget at the healthy peaks (one at
    # least), each allowed them
    fewer, allowed = advice.alternative_concurrency, advice.alternative_max_memory_per_child_kib
    assert fewer is not None and allowed is not None
    assert healthy * 1024 - 1 < allowed <= healthy * 1024 + 1e-5
    each = healthy - shared
    assert fewer >= 1 and (fewer == 1 or fewer * each <= budget * (1 + 1e-12))
    assert (fewer + 1) * each > budget * (1 - 1e-12)
    assert f"{fewer} children would recycle none of the healthy ones" in advice.note


#: A summary's figures in MiB, as ``recommend`` takes them.
ROOM = st.floats(0, 1e6)
SIZE = st.floats(1e-3, 1e5)


def figures_given(test: Callable[..., None]) -> Callable[..., None]:
    """The summary figures the monotonicity tests draw, and how much more of one."""
    return QUICK(
        given(
            limit=ROOM,
            overhead=st.floats(0, 1e5),
            concurrency=st.integers(1, 64),
            sizes=st.lists(SIZE, min_size=4, max_size=4),
            margin=st.floats(0, 1),
            more=st.floats(0, 1e5),
        )(test)
    )


def _figures(
    limit: float, overhead: float, concurrency: int, sizes: list[float], margin: float
) -> dict[str, Any]:
    p50, p95, peak50, peak95 = sizes
    return {
        "limit_mib": limit, "headroom_mib": overhead, "parent_rss_mib": 0.0,
        "concurrency": concurrency, "private_p50_mib": p50, "private_p95_mib": p95,
        "peak_rss_p50_mib": peak50, "peak_rss_p95_mib": peak95, "margin": margin,
    }  # fmt: skip


@figures_given
def test_recommend_more_memory_per_child_never_raises_the_concurrency(
    limit: float, overhead: float, concurrency: int, sizes: list[float], margin: float, more: float
) -> None:
    """Monotonicity: children that cost more never get more of them, and more room never
    fewer."""
    p95 = sizes[1]
    figures = _figures(limit, overhead, concurrency, sizes, margin)
    now = recommend(**figures).concurrency
    costlier = recommend(**{**figures, "private_p95_mib": p95 + more}).concurrency
    roomier = recommend(**{**figures, "limit_mib": limit + more}).concurrency
    assert now is not None and costlier is not None and roomier is not None
    assert costlier <= now <= roomier


@figures_given
def test_recommend_recycling_limit_follows_the_room_and_the_peaks(
    limit: float, overhead: float, concurrency: int, sizes: list[float], margin: float, more: float
) -> None:
    """Monotonicity of worker_max_memory_per_child: more room at the same recommended
    concurrency, higher peaks or more memory shared with the main process never lower
    it; more current children never raise it."""
    peak50, peak95 = sizes[2:]
    figures = _figures(limit, overhead, concurrency, sizes, margin)

    def kib(**change: Any) -> int:
        value = recommend(**{**figures, **change}).max_memory_per_child_kib
        assert value is not None
        return value

    if limit - overhead <= 0:  # no room for children: no limit to compare
        assert recommend(**figures).max_memory_per_child_kib is None
        return
    now = kib()
    # more room: more children, or as many and each allowed no less
    roomier = recommend(**{**figures, "limit_mib": limit + more})
    if roomier.concurrency == recommend(**figures).concurrency:
        assert kib(limit_mib=limit + more) >= now
    assert kib(peak_rss_p95_mib=peak95 + more) >= now
    assert kib(peak_rss_p50_mib=peak50 + more) >= now
    # the current concurrency counts only without a private p95: more never raises it
    assert kib(concurrency=concurrency + 1) == now
    assert kib(concurrency=concurrency + 1, private_p95_mib=None) <= kib(private_p95_mib=None)


@QUICK
@given(
    figures=st.lists(st.floats(-1e12, 1e12), min_size=3, max_size=3),
    concurrency=st.integers(-(10**6), 10**6),
    percentiles=st.lists(st.one_of(st.none(), FIGURE), min_size=4, max_size=4),
    margin=st.floats(0, 10),
)
def test_recommend_never_raises(
    figures: list[float], concurrency: int, percentiles: list[float | None], margin: float
) -> None:
    # bounded, and no tiny percentile: both overflow, see test_recommend_overflows
    advice = recommend(
        limit_mib=figures[0],
        headroom_mib=figures[1],
        parent_rss_mib=figures[2],
        concurrency=concurrency,
        private_p50_mib=percentiles[0],
        private_p95_mib=percentiles[1],
        peak_rss_p50_mib=percentiles[2],
        peak_rss_p95_mib=percentiles[3],
        margin=margin,
    )
    assert advice.concurrency is None or advice.concurrency >= 1
    kib = advice.max_memory_per_child_kib
    assert kib is None or type(kib) is int


# ---------------------------------------------------------------------------------------
# regressions: the smallest inputs of the bugs the properties above found, now fixed;
# each docstring says what the code did before


SUMMARY = {
    "event": "summary",
    "worker": "w",
    "limit_mib": 1000.0,
    "headroom_mib": 0,
    "parent_rss_mib": 0,
    "concurrency": 1,
    "private_p50_mib": 1,
    "private_p95_mib": 1,
    "peak_rss_p50_mib": 1,
    "peak_rss_p95_mib": 1,
}


@pytest.mark.parametrize(
    "figures",
    [
        {"limit_mib": 1e308, "peak_rss_p95_mib": 1e306},  # _kib(healthy): 1e306 * 1024
        {"private_p95_mib": 1e-310},  # children: floor(budget / 1e-310)
    ],
)
def test_recommend_overflows(figures: dict[str, float]) -> None:
    """stats.py recommend: finite figures make math.floor(inf), in _kib when the KiB pass
    1.8e308 and in the children count when the private p95 is tiny; `celery-guard
    recommend` reaches both from one summary line."""
    line = json.dumps({**SUMMARY, **figures})
    status = cli.main(["recommend"], stdin=io.StringIO(line + "\n"), stdout=io.StringIO())
    # a limit of 1e308 MiB is beyond any machine: the reader now refuses the line itself
    assert status == (cli.NO_RECORDS if figures.get("limit_mib") == 1e308 else cli.OK)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ExpHistogram().add(10**309),  # number(value)
        lambda: ExpHistogram(10**309, 1.5, 3),  # number(first)
        # whole first and ratio: first * ratio ** (max_buckets - 1) is exact int arithmetic
        lambda: ExpHistogram(1, 2, 1025),
        lambda: ExpHistogram(1, 2, 2**40),  # the exact power never finished
    ],
    ids=["add", "first", "int-ratio", "int-ratio-huge-buckets"],
)
def test_histogram_huge_ints(build: Callable[[], object]) -> None:
    """stats.py: math.isfinite() of an int past 1.8e308 raises OverflowError, not the
    ValueError that add and the constructor promise for a number they cannot take (number, and
    ExpHistogram.__init__ on ``last``). With a whole ratio and a huge max_buckets
    (ratio 2, max_buckets 2**40) the exact integer power did not even finish."""
    with pytest.raises(ValueError):
        build()
