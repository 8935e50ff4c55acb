"""Bounded aggregates of children's memory, and the settings they recommend (pure).

A worker runs for weeks and its children report after every task, so the main process
cannot keep every sample: it keeps exponential histograms, as Kubernetes' VPA does, whose
size does not depend on how many samples arrived. ``recommend`` turns their percentiles
into the two settings a user pastes; the summary line logs its inputs rounded as printed,
so a reader of the log recomputes exactly what the live worker printed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ExpHistogram:
    """Bounded aggregate with exponential buckets, as Kubernetes VPA keeps them:
    bucket 0 is [0, first), bucket i>=1 is [first*ratio**(i-1), first*ratio**i).
    Memory stays bounded however many samples arrive (at most max_buckets keys)."""

    def __init__(self, first: float = 1024 * 1024, ratio: float = 1.05, max_buckets: int = 600):
        if number(first) is None or first <= 0:
            raise ValueError(f"first must be a positive number, not {first!r}")
        if number(ratio) is None or ratio <= 1:
            raise ValueError(f"ratio must be a number above 1, not {ratio!r}")
        if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
            raise ValueError(f"max_buckets must be a whole number >= 1, not {max_buckets!r}")
        try:  # in floats: a whole-number ratio would make an exact, endless integer power
            last = float(first) * float(ratio) ** (max_buckets - 1)
        except OverflowError:
            last = math.inf
        if not math.isfinite(last):
            raise ValueError("first * ratio ** max_buckets is too large for a float")
        self.first = float(first)
        self.ratio = float(ratio)
        self.max_buckets = max_buckets
        self._weights: dict[int, float] = {}
        self.count = 0.0  # the total weight added
        #: The exact smallest and largest values added; None when empty.
        self.min: float | None = None
        self.max: float | None = None

    def lower(self, index: int) -> float:
        """The lower bound of bucket ``index`` (0 for bucket 0)."""
        return 0.0 if index <= 0 else self.first * self.ratio ** (index - 1)

    def upper(self, index: int) -> float:
        """The upper bound of bucket ``index``; the last bucket is open (infinite)."""
        return math.inf if index >= self.max_buckets - 1 else self.first * self.ratio**index

    def bucket(self, value: float) -> int:
        """The index of the bucket ``value`` falls in."""
        if not value >= self.first:  # negative, small, (NaN is refused by add)
            return 0
        steps = (math.log(value) - math.log(self.first)) / math.log(self.ratio)
        index = min(int(steps) + 1, self.max_buckets - 1)
        # log() is off by an ulp near bounds: settle it against the bounds themselves.
        while index > 1 and value < self.lower(index):
            index -= 1
        while index < self.max_buckets - 1 and value >= self.upper(index):
            index += 1
        return index

    def buckets(self) -> list[tuple[int, float]]:
        """The non-empty buckets as (index, weight), smallest first."""
        return sorted(self._weights.items())

    # -- adding ----------------------------------------------------------------------------
    def add(self, value: float, weight: float = 1.0) -> None:
        """Count ``value`` with ``weight``; a weight of 0 changes nothing."""
        if number(value) is None:
            raise ValueError(f"value must be a finite number, not {value!r}")
        if number(weight) is None or weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, not {weight!r}")
        if weight == 0:
            return
        index = self.bucket(value)
        self._weights[index] = self._weights.get(index, 0.0) + weight
        self.count += weight
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)

    # -- reading ---------------------------------------------------------------------------
    def percentile(self, p: float) -> float | None:
        """The upper bound of the bucket where the cumulative weight first reaches p% of
        the total, never above the exact max; None when empty.

        An upper bound, not an interpolation: a setting derived from it is on the safe
        side of every sample in the bucket (at most ``ratio`` above the true value).
        """
        if number(p) is None or not 0 <= p <= 100:
            raise ValueError(f"p must be between 0 and 100, not {p!r}")
        if not self._weights or self.max is None:
            return None
        threshold = self.count * p / 100
        slack = self.count * 1e-12  # sums of float weights must still reach 100%
        cumulative = 0.0
        chosen = max(self._weights)
        for index, weight in sorted(self._weights.items()):
            cumulative += weight
            if cumulative + slack >= threshold:
                chosen = index
                break
        return min(self.upper(chosen), self.max)


def number(value: Any) -> float | None:
    """A finite int or float, else None: bools are not numbers here, nor an int beyond a
    float (``math.isfinite`` raises OverflowError past 1.8e308)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:
        return None


@dataclass(frozen=True)
class Recommendation:
    """The settings to paste: None where the figures do not allow one."""

    max_memory_per_child_kib: int | None
    concurrency: int | None
    note: str  # "" when nothing to say; otherwise one sentence
    #: fewer children, each allowed its healthy peak: none of them recycled
    alternative_concurrency: int | None = None
    alternative_max_memory_per_child_kib: int | None = None


#: billiard recycles a child above worker_max_memory_per_child: set it this much above
#: the healthy children's p95 peak RSS.
MARGIN = 0.15


def _kib(mib: float) -> int | None:
    """MiB to whole KiB, rounded down; the rounding to 1e-6 KiB first keeps a product
    like 280 * 1.15 * 1024 (329727.99999999994 in floats) at the 329728 it means.
    None for a figure beyond floats (no real memory size)."""
    kib = round(mib * 1024, 6)
    return math.floor(kib) if math.isfinite(kib) else None


def container_limit(
    *, parent: float, requested: int, child_peak: float, headroom_fraction: float
) -> float | None:
    """The memory limit that would run the *requested* concurrency, as Kubernetes' VPA
    recommends requests from what it measured: the main process, every child at its peak
    cost (its private memory and the largest peak of a task), and the headroom, which is a
    fraction of the limit itself; no children (a pool that does not fork): the main
    process alone. Whole units of the caller's, rounded up; None when it cannot be told."""
    if not 0 <= headroom_fraction < 1 or parent <= 0 or requested < 0:
        return None
    if requested and child_peak <= 0:
        return None
    return float(math.ceil((parent + requested * child_peak) / (1 - headroom_fraction)))


#: ``recommend``'s figures as the summary line names them (the required ones always there,
#: the children's None before their first sample), and its plan's figures, which the
#: summary names ``plan_vanilla_*``.
REQUIRED_INPUTS = ("limit_mib", "headroom_mib", "parent_rss_mib", "concurrency")
SUMMARY_INPUTS = (
    *REQUIRED_INPUTS, "private_p50_mib", "private_p95_mib", "peak_rss_p50_mib", "peak_rss_p95_mib",
)  # fmt: skip
PLAN_INPUTS = ("concurrency", "tasks_per_child", "max_memory_per_child_kib")


def summary_inputs(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``recommend``'s keyword arguments from a summary's fields: the live worker and the
    log reader recommend from the same figures."""
    inputs = {key: summary.get(key) for key in SUMMARY_INPUTS}
    inputs.update((f"plan_{key}", summary.get(f"plan_vanilla_{key}")) for key in PLAN_INPUTS)
    return inputs


def recommend(
    *,
    limit_mib: float,
    headroom_mib: float,
    parent_rss_mib: float,
    concurrency: int,
    private_p50_mib: float | None,
    private_p95_mib: float | None,
    peak_rss_p50_mib: float | None,
    peak_rss_p95_mib: float | None,
    margin: float = MARGIN,
    plan_concurrency: int | None = None,
    plan_tasks_per_child: int | None = None,
    plan_max_memory_per_child_kib: int | None = None,
) -> Recommendation:
    """``--concurrency`` and ``worker_max_memory_per_child`` (KiB) that go together, from
    a summary's figures, and an alternative when the pair recycles healthy children.

    A child costs the cgroup its private memory, so the concurrency is how many p95
    private footprints fit the budget: the most work the limit allows. billiard compares
    the recycle value with the child's peak RSS (ru_maxrss), which also counts the pages
    it shares with the main process, so the value goes a margin above the healthy peaks,
    unless that is more than each of *those* children can afford (the shared pages plus
    its share of the budget): then it is that share, children that peak above it are
    recycled, and the alternative is the concurrency at which none of the healthy ones
    would be, with the healthy value. Without private figures the pair keeps the current
    concurrency. Where the run-time governor planned the pool for throughput
    (``plan_*``: its plan made again for a worker without the guard, see
    ``Governor._as_settings``), the pair is that plan: its size, and the value at which
    billiard recycles a child after the planned number of tasks. Never raises; a missing
    figure gives None.

    Worked example: limit 1024, headroom 102.4, main process 180, private p50 90 / p95
    98, peak RSS p50 270 / p95 280 (MiB)::

        budget   = 1024 - 102.4 - 180          = 741.6
        children = floor(741.6 / 98)           = 7
        healthy  = 280 * 1.15                  = 322.0
        shared   = 270 - 90                    = 180
        share    = 180 + 741.6 / 7             = 285.94...
        322.0 > 285.94: --concurrency 7, int(285.94... * 1024) = 292805 KiB
        alternative: floor(741.6 / (322.0 - 180)) = 5 children, 322.0 * 1024 = 329728 KiB
    """
    planned = plan_concurrency if plan_concurrency is not None and plan_concurrency >= 1 else None
    if planned and plan_max_memory_per_child_kib is not None and plan_tasks_per_child:
        note = (
            f"planned from the measured pace for a worker without celery-guard (its "
            f"children copy more: no gc.freeze): {planned} children, each recycled after "
            f"about {plan_tasks_per_child} tasks, run the most tasks per second in this limit"
        )
        return Recommendation(plan_max_memory_per_child_kib, planned, note)
    budget = limit_mib - headroom_mib - parent_rss_mib
    if budget <= 0:
        return Recommendation(
            None,
            1,
            f"the main process alone ({parent_rss_mib:.1f} MiB) leaves no room for children"
            f" in {limit_mib:.1f} MiB with {headroom_mib:.1f} MiB kept free: raise the limit",
        )
    children = planned  # the plan's size, where its tasks keep too little to recycle for
    if children is None and private_p95_mib is not None and private_p95_mib > 0:
        per_child = budget / private_p95_mib
        children = max(1, math.floor(per_child)) if math.isfinite(per_child) else None
    if private_p50_mib is None or peak_rss_p50_mib is None or peak_rss_p95_mib is None:
        return Recommendation(None, children, "")
    pool = children or max(int(concurrency), 1)
    healthy = peak_rss_p95_mib * (1 + margin)
    shared = max(peak_rss_p50_mib - private_p50_mib, 0.0)
    share = shared + budget / pool
    if healthy <= share:
        return Recommendation(_kib(healthy), children, "")
    # healthy > share = shared + budget / pool, so healthy - shared > 0.
    ratio = budget / (healthy - shared)
    fewer = max(1, math.floor(ratio)) if math.isfinite(ratio) else 1
    note = (
        f"at {pool} children each can afford {share:.1f} MiB of peak RSS, less than the"
        f" healthy peaks with margin ({healthy:.1f} MiB): children that peak above it are"
        f" recycled; {fewer} children would recycle none of the healthy ones"
    )
    return Recommendation(_kib(share), children, note, fewer, _kib(healthy))
