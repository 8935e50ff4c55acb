"""Tests for celery_guard.stats: the bounded histograms and the recommended settings.

The histogram rows use first=1, ratio=2 so every bucket bound is a power of two that can
be checked by eye; the recommendation rows are the figures a summary line logs.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_guard.stats import MARGIN, ExpHistogram, Recommendation, recommend

MIB = 1024 * 1024


def _powers(max_buckets: int = 10) -> ExpHistogram:
    return ExpHistogram(first=1.0, ratio=2.0, max_buckets=max_buckets)


# id, value, expected bucket (first=1, ratio=2, 10 buckets: the last is [256, inf))
BUCKETS = [
    ("zero", 0.0, 0),
    ("below-first", 0.5, 0),
    ("negative", -3.0, 0),
    ("first", 1.0, 1),
    ("below-2", 1.999, 1),
    ("two", 2.0, 2),
    ("below-4", 3.999, 2),
    ("four", 4.0, 3),
    ("mid", 100.0, 7),
    ("last-lower-bound", 256.0, 9),
    ("past-last", 1e9, 9),
    ("huge", 1.7e308, 9),
]


@pytest.mark.parametrize("value,expected", [b[1:] for b in BUCKETS], ids=[b[0] for b in BUCKETS])
def test_bucket(value: float, expected: int) -> None:
    """Bucket 0 is [0, first), bucket i is [first*ratio**(i-1), first*ratio**i)."""
    assert _powers().bucket(value) == expected


# id, value, expected bucket with the defaults (1 MiB, 1.05, 600)
DEFAULT_BUCKETS = [
    ("below-1mib", MIB - 1, 0),
    ("1mib", MIB, 1),
    ("1mib-times-1.05", MIB * 1.05, 2),
    ("just-below-1.05", MIB * 1.05 - 1e-6, 1),
    ("ten-steps", MIB * 1.05**10, 11),
    ("256mib", 256 * MIB, 114),  # 1.05**113 = 248.9 <= 256 < 1.05**114 = 261.4
    ("beyond", 1e30, 599),
]


@pytest.mark.parametrize(
    "value,expected", [b[1:] for b in DEFAULT_BUCKETS], ids=[b[0] for b in DEFAULT_BUCKETS]
)
def test_default_buckets(value: float, expected: int) -> None:
    """Values exactly on a bound land in the bucket that starts there, despite log()."""
    assert ExpHistogram().bucket(value) == expected


# id, index, expected lower, expected upper
BOUNDS = [
    ("bucket-0", 0, 0.0, 1.0),
    ("bucket-1", 1, 1.0, 2.0),
    ("bucket-3", 3, 4.0, 8.0),
    ("bucket-8", 8, 128.0, 256.0),
    ("last-is-open", 9, 256.0, math.inf),
]


@pytest.mark.parametrize("index,lower,upper", [b[1:] for b in BOUNDS], ids=[b[0] for b in BOUNDS])
def test_bounds(index: int, lower: float, upper: float) -> None:
    hist = _powers()
    assert (hist.lower(index), hist.upper(index)) == (lower, upper)


def test_every_bound_lands_in_its_own_bucket() -> None:
    """For ratios whose powers are inexact, each bound still opens its own bucket."""
    for ratio in (1.01, 1.05, 1.3):
        hist = ExpHistogram(first=1.0, ratio=ratio, max_buckets=500)
        for index in range(1, 499):
            assert hist.bucket(hist.lower(index)) == index, (ratio, index)
            assert hist.bucket(hist.upper(index)) == index + 1, (ratio, index)


ONE_TO_100 = [(float(v), 1.0) for v in range(1, 101)]  # buckets hold 1,2,4,8,16,32,37
WEIGHTED = [(3.0, 9.0), (50.0, 1.0)]

# id, (value, weight) samples, p, expected percentile
PERCENTILES = [
    ("p50", ONE_TO_100, 50, 64.0),  # cumulative 63 at the end of [32, 64)
    ("p31-bucket-end", ONE_TO_100, 31, 32.0),  # cumulative 31 exactly at [16, 32)
    ("p31.5", ONE_TO_100, 31.5, 64.0),
    ("p95-capped-at-max", ONE_TO_100, 95, 100.0),  # [64, 128) but nothing above 100
    ("p100", ONE_TO_100, 100, 100.0),
    ("p0-first-non-empty", ONE_TO_100, 0, 2.0),
    ("p1", ONE_TO_100, 1, 2.0),
    ("weighted-p90", WEIGHTED, 90, 4.0),
    ("weighted-p91", WEIGHTED, 91, 50.0),
    ("single-value", [(5.0, 1.0)], 50, 5.0),
    ("below-first", [(0.25, 1.0), (0.5, 1.0)], 50, 0.5),
    ("negative", [(-2.0, 1.0)], 95, -2.0),
    ("past-last-bucket", [(300.0, 1.0), (5000.0, 1.0)], 50, 5000.0),
    ("fractional-weights", [(1.0, 0.1)] * 10 + [(9.0, 0.1)] * 10, 50, 2.0),
    ("zero-weight-ignored", [(1.0, 1.0), (200.0, 0.0)], 99, 1.0),
]


@pytest.mark.parametrize(
    "samples,p,expected", [r[1:] for r in PERCENTILES], ids=[r[0] for r in PERCENTILES]
)
def test_percentile(samples: list[tuple[float, float]], p: float, expected: float) -> None:
    """The upper bound of the bucket where p% is reached, never above the exact max."""
    hist = _powers()
    for value, weight in samples:
        hist.add(value, weight)
    assert hist.percentile(p) == expected


# id, samples, expected (count, min, max)
FIGURES = [
    ("empty", [], (0.0, None, None)),
    ("one-to-100", ONE_TO_100, (100.0, 1.0, 100.0)),
    ("weighted", WEIGHTED, (10.0, 3.0, 50.0)),
    ("negative", [(-2.0, 1.0), (7.5, 2.0)], (3.0, -2.0, 7.5)),
]


@pytest.mark.parametrize("samples,expected", [r[1:] for r in FIGURES], ids=[r[0] for r in FIGURES])
def test_count_min_max(samples: list[tuple[float, float]], expected: tuple[Any, ...]) -> None:
    """count is the total weight; min and max are exact, not bucket bounds."""
    hist = _powers()
    for value, weight in samples:
        hist.add(value, weight)
    assert (hist.count, hist.min, hist.max) == expected


def test_empty_percentile_is_none() -> None:
    assert _powers().percentile(50) is None


# id, call on a histogram, expected error fragment
REFUSED = [
    ("nan-value", lambda h: h.add(math.nan), "finite"),
    ("inf-value", lambda h: h.add(math.inf), "finite"),
    ("text-value", lambda h: h.add("3"), "finite"),
    ("bool-value", lambda h: h.add(True), "finite"),
    ("negative-weight", lambda h: h.add(1.0, -1.0), "weight"),
    ("nan-weight", lambda h: h.add(1.0, math.nan), "weight"),
    ("p-above-100", lambda h: h.percentile(101), "between 0 and 100"),
    ("p-negative", lambda h: h.percentile(-1), "between 0 and 100"),
    ("first-zero", lambda h: ExpHistogram(first=0), "first"),
    ("ratio-one", lambda h: ExpHistogram(ratio=1.0), "ratio"),
    ("no-buckets", lambda h: ExpHistogram(max_buckets=0), "max_buckets"),
    ("float-buckets", lambda h: ExpHistogram(max_buckets=10.0), "max_buckets"),
    ("overflowing-layout", lambda h: ExpHistogram(ratio=2.0, max_buckets=5000), "too large"),
]


@pytest.mark.parametrize("call,message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(_powers())


def test_a_million_adds_keep_at_most_max_buckets() -> None:
    """Values over 43 orders of magnitude touch every bucket, and no more than 600 exist."""
    hist, value = ExpHistogram(), 1.0
    for _ in range(1_000_000):
        hist.add(value)
        value *= 1.0001
    assert len(hist.buckets()) == 600
    assert hist.count == 1_000_000
    assert (hist.min, hist.max) == (1.0, value / 1.0001)
    assert hist.percentile(100) == value / 1.0001


def test_each_sample_is_counted_in_its_bucket() -> None:
    """First 1, ratio 2: bucket i >= 1 is [2**(i-1), 2**i), so 3 is in bucket 2 and 300
    in bucket 9."""
    hist = _powers()
    hist.add(3.0)
    hist.add(300.0, 2.0)
    assert hist.buckets() == [(2, 1.0), (9, 2.0)]
    assert (hist.count, hist.min, hist.max) == (3.0, 3.0, 300.0)


# The figures of the recommendation rows, as a summary line logs them.
FITS = {
    "limit_mib": 2048.0,
    "headroom_mib": 204.8,
    "parent_rss_mib": 180.0,
    "concurrency": 8,
    "private_p50_mib": 120.0,
    "private_p95_mib": 150.0,
    "peak_rss_p50_mib": 290.0,
    "peak_rss_p95_mib": 270.0,
}
CROSSING = {
    "limit_mib": 1024.0,
    "headroom_mib": 102.4,
    "parent_rss_mib": 200.0,
    "concurrency": 8,
    "private_p50_mib": 80.0,
    "private_p95_mib": 110.0,
    "peak_rss_p50_mib": 260.0,
    "peak_rss_p95_mib": 300.0,
}
WORKED = {
    "limit_mib": 1024.0,
    "headroom_mib": 102.4,
    "parent_rss_mib": 180.0,
    "concurrency": 7,
    "private_p50_mib": 90.0,
    "private_p95_mib": 98.0,
    "peak_rss_p50_mib": 270.0,
    "peak_rss_p95_mib": 280.0,
}
NO_SAMPLES = {
    "private_p50_mib": None,
    "private_p95_mib": None,
    "peak_rss_p50_mib": None,
    "peak_rss_p95_mib": None,
}


def crossing_note(pool: int, share: str, healthy: str, fewer: int) -> str:
    return (
        f"at {pool} children each can afford {share} MiB of peak RSS, less than the healthy"
        f" peaks with margin ({healthy} MiB): children that peak above it are recycled;"
        f" {fewer} children would recycle none of the healthy ones"
    )


# id, figures, expected (max_memory_per_child_kib, concurrency, note, alternative
# concurrency, alternative max_memory_per_child_kib), worked out by hand. The pair is
# computed for the recommended concurrency, not the current one.
RECOMMENDATIONS: list[tuple[str, dict[str, Any], tuple[Any, ...]]] = [
    # budget 2048 - 204.8 - 180 = 1663.2: floor(1663.2 / 150) = 11 children; healthy
    # 270 * 1.15 = 310.5 <= share 170 + 1663.2 / 11 = 321.2; 310.5 * 1024 = 317952
    ("fits", FITS, (317952, 11, "")),
    # budget 721.6: floor(721.6 / 110) = 6 children; healthy 345 > share 180 + 721.6 / 6
    # = 300.27 (307473.07 KiB); floor(721.6 / (345 - 180)) = 4 children at 345 * 1024
    (
        "crossing",
        CROSSING,
        (307473, 6, crossing_note(6, "300.3", "345.0", 4), 4, 353280),
    ),
    # the docstring's worked example: 7 children at 285.94 MiB (292805.49 KiB), or 5 at
    # 322 MiB (329728 KiB)
    (
        "worked-example",
        WORKED,
        (292805, 7, crossing_note(7, "285.9", "322.0", 5), 5, 329728),
    ),
    # no private p95: the current 8 children, share 180 + 721.6 / 8 = 270.2 (276684.8)
    (
        "crossing-without-private-p95",
        {**CROSSING, "private_p95_mib": None},
        (276684, None, crossing_note(8, "270.2", "345.0", 4), 4, 353280),
    ),
    # budget 800, 8 children of 100, share 100 + 800 / 8 = 200 = healthy 200 * (1 + 0)
    (
        "margin-0-equals-share",
        {
            "limit_mib": 1000.0,
            "headroom_mib": 100.0,
            "parent_rss_mib": 100.0,
            "concurrency": 8,
            "private_p50_mib": 100.0,
            "private_p95_mib": 100.0,
            "peak_rss_p50_mib": 200.0,
            "peak_rss_p95_mib": 200.0,
            "margin": 0.0,
        },
        (204800, 8, ""),
    ),
    # peak p50 below private p50: nothing counted as shared; floor(741.6 / 130) = 5
    # children, share 741.6 / 5 = 148.3 >= healthy 100 * 1.15 = 115 (117760 KiB)
    (
        "shared-never-negative",
        {
            **WORKED,
            "private_p50_mib": 120.0,
            "private_p95_mib": 130.0,
            "peak_rss_p50_mib": 100.0,
            "peak_rss_p95_mib": 100.0,
        },
        (117760, 5, ""),
    ),
    # one child at least: share 170 + 1663.2 >= 310.5
    ("one-child-at-least", {**FITS, "private_p95_mib": 4000.0}, (317952, 1, "")),
    # the current concurrency only matters without a private p95
    ("concurrency-0-with-private-p95", {**FITS, "concurrency": 0}, (317952, 11, "")),
    ("no-private-p95", {**FITS, "private_p95_mib": None}, (317952, None, "")),
    ("private-p95-zero", {**FITS, "private_p95_mib": 0.0}, (317952, None, "")),
    # 0 children counts as 1: share 180 + 721.6 = 901.6 >= 345 (353280 KiB)
    (
        "concurrency-0-counts-as-1",
        {**CROSSING, "private_p95_mib": None, "concurrency": 0},
        (353280, None, ""),
    ),
    ("no-private-p50", {**FITS, "private_p50_mib": None}, (None, 11, "")),
    ("no-peak-p50", {**FITS, "peak_rss_p50_mib": None}, (None, 11, "")),
    ("no-peak-p95", {**FITS, "peak_rss_p95_mib": None}, (None, 11, "")),
    ("no-samples", {**FITS, **NO_SAMPLES}, (None, None, "")),
    (
        "no-budget",
        {**FITS, "limit_mib": 256.0, "headroom_mib": 25.6, "parent_rss_mib": 240.0},
        (
            None,
            1,
            "the main process alone (240.0 MiB) leaves no room for children in 256.0 MiB"
            " with 25.6 MiB kept free: raise the limit",
        ),
    ),
    (
        "budget-exactly-0",
        {**FITS, **NO_SAMPLES, "limit_mib": 200.0, "headroom_mib": 20.0, "parent_rss_mib": 180.0},
        (
            None,
            1,
            "the main process alone (180.0 MiB) leaves no room for children in 200.0 MiB"
            " with 20.0 MiB kept free: raise the limit",
        ),
    ),
]


@pytest.mark.parametrize(
    "figures,expected", [r[1:] for r in RECOMMENDATIONS], ids=[r[0] for r in RECOMMENDATIONS]
)
def test_recommend(figures: dict[str, Any], expected: tuple[Any, ...]) -> None:
    assert recommend(**figures) == Recommendation(*expected)


def test_margin_default() -> None:
    """The default margin is the one the rows above assume (300 * 1.15 = 345)."""
    assert MARGIN == 0.15
    assert recommend(**FITS) == recommend(**FITS, margin=0.15)


mib_figure = st.floats(min_value=1.0, max_value=100_000.0, allow_nan=False)


@given(
    limit=st.floats(min_value=64.0, max_value=1_000_000.0),
    parent=mib_figure,
    private_p50=mib_figure,
    private_spread=st.floats(min_value=0.0, max_value=1000.0),
    peak_p50=mib_figure,
    peak_spread=st.floats(min_value=0.0, max_value=1000.0),
    concurrency=st.integers(min_value=1, max_value=64),
)
def test_the_pair_fits_together_and_the_alternative_recycles_no_healthy_child(
    limit: float,
    parent: float,
    private_p50: float,
    private_spread: float,
    peak_p50: float,
    peak_spread: float,
    concurrency: int,
) -> None:
    """The recommended concurrency's children, each at the recommended recycle value (in
    peak RSS, less the pages shared with the main process), fit the budget; so do the
    alternative's children at the healthy peaks, and the alternative is fewer children
    (the pair does the most work)."""
    figures = {
        "limit_mib": limit, "headroom_mib": limit / 10, "parent_rss_mib": parent,
        "concurrency": concurrency, "private_p50_mib": private_p50,
        "private_p95_mib": private_p50 + private_spread, "peak_rss_p50_mib": peak_p50,
        "peak_rss_p95_mib": peak_p50 + peak_spread,
    }  # fmt: skip
    budget = limit - limit / 10 - parent
    advice = recommend(**figures)
    if budget <= 0:
        assert advice.max_memory_per_child_kib is None
        return
    assert advice.concurrency is not None and advice.max_memory_per_child_kib is not None
    shared = max(peak_p50 - private_p50, 0.0)
    slack = 1e-6 * budget + 1 / 1024  # whole KiB, rounded down
    assert advice.concurrency * (advice.max_memory_per_child_kib / 1024 - shared) <= budget + slack
    if advice.concurrency > 1:  # one child always, whatever it costs
        assert advice.concurrency * (private_p50 + private_spread) <= budget + slack
    # The healthy value: above the p95 peak (a child at a healthy peak is not recycled),
    # by at most the margin (a leaking child is not left to run long), in whole KiB.
    peak_kib = (peak_p50 + peak_spread) * 1024
    if advice.alternative_concurrency is None:
        healthy_kib = advice.max_memory_per_child_kib
        assert advice.note == ""
    else:
        healthy_kib = advice.alternative_max_memory_per_child_kib
        assert healthy_kib is not None and advice.max_memory_per_child_kib < healthy_kib
    assert peak_kib - 1 <= healthy_kib <= peak_kib * (1 + MARGIN) + 1  # whole KiB
    if advice.alternative_concurrency is None:
        return
    fewer = advice.alternative_concurrency
    if advice.concurrency > 1:
        assert fewer < advice.concurrency
    if fewer > 1:
        assert fewer * (healthy_kib / 1024 - shared) <= budget + slack


def test_the_governors_plan_is_the_recommended_pair() -> None:
    """With a throughput plan (the summary's plan_* keys), the pair is the plan's, whatever
    the private figures alone would allow (FITS allows 11 children)."""
    advice = recommend(**FITS, plan_concurrency=3, plan_tasks_per_child=6,
                       plan_max_memory_per_child_kib=400_000)  # fmt: skip
    assert (advice.concurrency, advice.max_memory_per_child_kib) == (3, 400_000)
    assert "3 children" in advice.note and "6 tasks" in advice.note
    assert advice.alternative_concurrency is None


def test_a_plan_for_tasks_that_keep_nothing_gives_the_size_and_the_healthy_value() -> None:
    """No recycle value in the plan (its tasks keep too little to recycle for): its size,
    and billiard's value above the healthy peaks as without a plan (FITS: 270 * 1.15)."""
    advice = recommend(**FITS, plan_concurrency=5)
    assert advice.concurrency == 5
    assert advice.max_memory_per_child_kib == 317952  # 270 MiB and 15%: 310.5 MiB, in KiB
