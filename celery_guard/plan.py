"""The startup decision: how many pool children fit in the budget.

A pure function of the figures, so every case is a row in a table test.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Pools whose children are forked copies of the main process; the others share it.
FORKING_POOLS = frozenset({"prefork", "processes"})


@dataclass(frozen=True)
class Decision:
    concurrency: int
    action: str  # kept | scaled | over_budget | refused | warned | off
    fits: int  # the largest concurrency that fits (0 when not even one child does)
    headroom: int  # bytes of the limit kept free


def largest_fit(limit: int, headroom: int, in_use: int, child: int) -> int:
    """Children that fit after the headroom and what the main process already uses."""
    free = limit - headroom - in_use
    if free <= 0:
        return 0
    return free // max(child, 1)


def decide(
    *,
    mode: str,
    limit: int,
    headroom_fraction: float,
    in_use: int,
    child: int,
    requested: int,
    minimum: int,
    pool: str,
) -> Decision:
    """Apply the mode to the figures. Only forking pools multiply memory."""
    headroom = int(limit * headroom_fraction)
    fits = largest_fit(limit, headroom, in_use, child)
    if mode == "off":
        return Decision(requested, "off", fits, headroom)
    if pool not in FORKING_POOLS or requested <= fits:
        return Decision(requested, "kept", fits, headroom)
    if mode == "refuse":
        return Decision(requested, "refused", fits, headroom)
    if mode == "warn":
        return Decision(requested, "warned", fits, headroom)
    # scale: lower to what fits, never below the minimum, never above what was asked.
    if fits >= minimum:
        return Decision(fits, "scaled", fits, headroom)
    return Decision(min(minimum, requested), "over_budget", fits, headroom)
