"""The live limit: one object owns it, the rest read it.

The cgroup's limit can change while the worker runs (``docker update --memory``, an
in-place pod resize). ``LimitWatch`` reads it every second on the sampler's thread and,
when it changed, logs a line and replaces the ``LiveLimit``'s ``Marks``: one assignment,
which a reader on another thread sees whole.
"""

from __future__ import annotations

import logging

from . import cgroups
from .config import Settings
from .logline import emit
from .policy import Marks
from .sizes import mib


class LiveLimit:
    """The budget's limit now, with its marks."""

    def __init__(self, limit: int, settings: Settings) -> None:
        self.settings = settings
        self.set(limit)

    @property
    def limit(self) -> int:
        return self.marks.limit

    @property
    def headroom(self) -> int:
        """Bytes of the limit kept free, as the startup decision kept them."""
        return int(self.marks.limit * self.settings.headroom)

    def set(self, limit: int) -> None:
        s = self.settings
        self.marks = Marks.of(limit, s.low_water, s.high_water, s.hard_water)


class LimitWatch:
    """Read the cgroup's limit again; carry a new figure to the live limit, with a line."""

    def __init__(
        self, cgroup: cgroups.Cgroup, physical: int, live: LiveLimit, hostname: str
    ) -> None:
        self.cgroup = cgroup
        self.physical = physical
        self.live = live
        self.hostname = hostname

    def check(self) -> None:
        found = cgroups.read_limit(self.cgroup, self.physical)
        new = found.bytes or self.physical  # no limit any more: physical memory
        old = self.live.limit
        if new == old:
            return
        fields = {
            "worker": self.hostname,
            "action": "changed",
            "old_mib": mib(old),
            "new_mib": mib(new),
            "limit_source": found.source if found.bytes else "physical",
            "limit_detail": found.reason,
        }
        emit(logging.WARNING, "limit", fields)
        self.live.set(new)


__all__ = ["LimitWatch", "LiveLimit"]
