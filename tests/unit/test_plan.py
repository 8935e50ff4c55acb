"""Tests for celery_guard.plan: the startup decision as rows of figures.

Each row is the figures the worker measured and the concurrency and action the contract
says it must start with, so a change in the arithmetic or a mode shows as one row.
"""

from __future__ import annotations

import pytest

from celery_guard.plan import Decision, decide, largest_fit

MIB = 1 << 20

# The standard figures: limit 1000 MiB, 10% headroom (100 MiB), main process 200 MiB,
# 100 MiB per child, so 700 MiB free and exactly 7 children fit.
LIMIT = 1000 * MIB
HEADROOM = 0.1
IN_USE = 200 * MIB
CHILD = 100 * MIB
FITS = 7
KEPT_FREE = 100 * MIB

# id, mode, pool, requested, minimum, expected concurrency, expected action
MODES = [
    # scale
    ("scale-fits", "scale", "prefork", 4, 1, 4, "kept"),
    ("scale-fits-exactly", "scale", "prefork", 7, 1, 7, "kept"),
    ("scale-one-too-many", "scale", "prefork", 8, 1, 7, "scaled"),
    ("scale-too-large", "scale", "prefork", 16, 1, 7, "scaled"),
    ("scale-processes-alias", "scale", "processes", 16, 1, 7, "scaled"),
    ("scale-solo-too-large", "scale", "solo", 16, 1, 16, "kept"),
    ("scale-threads-too-large", "scale", "threads", 16, 1, 16, "kept"),
    ("scale-gevent-too-large", "scale", "gevent", 500, 1, 500, "kept"),
    ("scale-eventlet-too-large", "scale", "eventlet", 500, 1, 500, "kept"),
    ("scale-solo-fits", "scale", "solo", 1, 1, 1, "kept"),
    # refuse
    ("refuse-fits", "refuse", "prefork", 4, 1, 4, "kept"),
    ("refuse-fits-exactly", "refuse", "prefork", 7, 1, 7, "kept"),
    ("refuse-too-large", "refuse", "prefork", 8, 1, 8, "refused"),
    ("refuse-solo-too-large", "refuse", "solo", 16, 1, 16, "kept"),
    ("refuse-threads-fits", "refuse", "threads", 4, 1, 4, "kept"),
    # warn
    ("warn-fits", "warn", "prefork", 4, 1, 4, "kept"),
    ("warn-too-large", "warn", "prefork", 16, 1, 16, "warned"),
    ("warn-gevent-too-large", "warn", "gevent", 100, 1, 100, "kept"),
    ("warn-solo-fits", "warn", "solo", 1, 1, 1, "kept"),
    # off: nothing changes, whatever the figures
    ("off-fits", "off", "prefork", 4, 1, 4, "off"),
    ("off-too-large", "off", "prefork", 16, 1, 16, "off"),
    ("off-solo-fits", "off", "solo", 1, 1, 1, "off"),
    ("off-solo-too-large", "off", "solo", 16, 1, 16, "off"),
    # the minimum
    ("scale-minimum-equals-fit", "scale", "prefork", 16, 7, 7, "scaled"),
    ("scale-minimum-below-fit", "scale", "prefork", 16, 3, 7, "scaled"),
    ("scale-minimum-above-fit", "scale", "prefork", 16, 8, 8, "over_budget"),
    ("scale-minimum-above-requested", "scale", "prefork", 16, 20, 16, "over_budget"),
    ("scale-requested-below-minimum-fits", "scale", "prefork", 3, 5, 3, "kept"),
    ("warn-minimum-above-fit", "warn", "prefork", 16, 8, 16, "warned"),
    ("refuse-minimum-above-fit", "refuse", "prefork", 16, 8, 16, "refused"),
]


@pytest.mark.parametrize(
    "mode,pool,requested,minimum,concurrency,action",
    [m[1:] for m in MODES],
    ids=[m[0] for m in MODES],
)
def test_decide_modes(
    mode: str, pool: str, requested: int, minimum: int, concurrency: int, action: str
) -> None:
    """Every mode, on a forking pool or not, when the request fits or does not."""
    decision = decide(
        mode=mode,
        limit=LIMIT,
        headroom_fraction=HEADROOM,
        in_use=IN_USE,
        child=CHILD,
        requested=requested,
        minimum=minimum,
        pool=pool,
    )
    assert decision == Decision(concurrency, action, FITS, KEPT_FREE)


# id, mode, pool, requested, minimum, expected concurrency, expected action
# The main process alone (950 MiB) already uses more than the limit minus headroom.
ZERO_FIT = [
    ("scale", "scale", "prefork", 4, 1, 1, "over_budget"),
    ("scale-minimum-2", "scale", "prefork", 4, 2, 2, "over_budget"),
    ("scale-requested-1", "scale", "prefork", 1, 1, 1, "over_budget"),
    ("scale-minimum-above-requested", "scale", "prefork", 2, 3, 2, "over_budget"),
    ("refuse", "refuse", "prefork", 4, 1, 4, "refused"),
    ("warn", "warn", "prefork", 4, 1, 4, "warned"),
    ("off", "off", "prefork", 4, 1, 4, "off"),
    ("scale-solo", "scale", "solo", 1, 1, 1, "kept"),
    ("refuse-threads", "refuse", "threads", 4, 1, 4, "kept"),
]


@pytest.mark.parametrize(
    "mode,pool,requested,minimum,concurrency,action",
    [z[1:] for z in ZERO_FIT],
    ids=[z[0] for z in ZERO_FIT],
)
def test_decide_when_not_one_child_fits(
    mode: str, pool: str, requested: int, minimum: int, concurrency: int, action: str
) -> None:
    """fits is 0: scale starts the minimum (over_budget) and never a pool of zero."""
    decision = decide(
        mode=mode,
        limit=LIMIT,
        headroom_fraction=HEADROOM,
        in_use=950 * MIB,
        child=CHILD,
        requested=requested,
        minimum=minimum,
        pool=pool,
    )
    assert decision == Decision(concurrency, action, 0, KEPT_FREE)


# id, limit, headroom fraction, in_use, child, requested, minimum, expected Decision
FIGURES = [
    (
        "field-case-600MiB",
        600 * MIB,
        0.1,
        148 * MIB,
        43 * MIB,
        16,
        1,
        # headroom 60 MiB; (600 - 60 - 148) / 43 = 9.1
        Decision(9, "scaled", 9, 62914560),
    ),
    (
        "field-case-rule-of-thumb-request",
        600 * MIB,
        0.1,
        148 * MIB,
        43 * MIB,
        4,
        1,
        Decision(4, "kept", 9, 62914560),
    ),
    (
        "no-headroom",
        600 * MIB,
        0.0,
        148 * MIB,
        43 * MIB,
        16,
        1,
        # (600 - 148) / 43 = 10.5
        Decision(10, "scaled", 10, 0),
    ),
    (
        "headroom-truncated-to-bytes",
        999,
        0.1,
        0,
        100,
        16,
        1,
        # headroom int(99.9) = 99; free 900 -> 9
        Decision(9, "scaled", 9, 99),
    ),
    (
        "headroom-one-third",
        1000,
        0.333,
        0,
        111,
        16,
        1,
        # headroom 333; free 667 -> 6
        Decision(6, "scaled", 6, 333),
    ),
    (
        "headroom-makes-the-difference",
        1000,
        0.01,
        0,
        100,
        10,
        1,
        # without headroom 10 would fit; with 10 bytes kept only 9 do
        Decision(9, "scaled", 9, 10),
    ),
    (
        "child-zero-anything-fits",
        1000,
        0.1,
        200,
        0,
        64,
        1,
        # child 0 counts as 1 byte: fits is the free byte count
        Decision(64, "kept", 700, 100),
    ),
    (
        "in-use-above-limit",
        500 * MIB,
        0.1,
        600 * MIB,
        10 * MIB,
        4,
        1,
        Decision(1, "over_budget", 0, 52428800),
    ),
]


@pytest.mark.parametrize(
    "limit,fraction,in_use,child,requested,minimum,expected",
    [f[1:] for f in FIGURES],
    ids=[f[0] for f in FIGURES],
)
def test_decide_figures(
    limit: int,
    fraction: float,
    in_use: int,
    child: int,
    requested: int,
    minimum: int,
    expected: Decision,
) -> None:
    """headroom = int(limit * fraction); the rest, minus the main process, is split by child."""
    decision = decide(
        mode="scale",
        limit=limit,
        headroom_fraction=fraction,
        in_use=in_use,
        child=child,
        requested=requested,
        minimum=minimum,
        pool="prefork",
    )
    assert decision == expected


# id, limit, headroom bytes, in_use, child, expected children
LARGEST_FIT = [
    ("exact", 1000, 100, 200, 100, 7),
    ("remainder-rounds-down", 1000, 100, 200, 99, 7),
    ("room-for-exactly-one", 300, 0, 200, 100, 1),
    ("one-byte-short-of-one", 299, 0, 200, 100, 0),
    ("nothing-free", 1000, 100, 900, 1, 0),
    ("in-use-above-limit", 1000, 100, 2000, 100, 0),
    ("headroom-above-limit", 100, 200, 0, 1, 0),
    ("child-zero-counts-as-one-byte", 1000, 100, 200, 0, 700),
    ("field-case", 600 * MIB, 62914560, 148 * MIB, 43 * MIB, 9),
]


@pytest.mark.parametrize(
    "limit,headroom,in_use,child,expected",
    [x[1:] for x in LARGEST_FIT],
    ids=[x[0] for x in LARGEST_FIT],
)
def test_largest_fit(limit: int, headroom: int, in_use: int, child: int, expected: int) -> None:
    """Whole children in what is left; never negative, never a division by zero."""
    assert largest_fit(limit, headroom, in_use, child) == expected


def test_one_byte_free_fits_one_child_of_one_byte() -> None:
    assert largest_fit(limit=1001, headroom=100, in_use=900, child=1) == 1
