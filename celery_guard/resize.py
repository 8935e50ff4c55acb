"""The pool size where no governor runs (``--autoscale``, no cgroup, physical memory,
``CELERY_GUARD_GOVERNOR=off``): sized by the startup decision's rule again when the first
child is measured and whenever the limit changes. Under ``--autoscale`` only the
autoscaler's max is set. The triggers come from the sampler's thread; the resize runs on
the event loop, where the pool is changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .actuator import PoolControl
from .limit import LiveLimit
from .logline import emit
from .plan import decide
from .sizes import mib


class Resizer:
    """Where no governor runs: the one writer of the pool's size (or the autoscaler's max)."""

    def __init__(
        self,
        w: Any,
        live: LiveLimit,
        in_use: int,
        requested: int,
        minimum: int,
        estimate: int,
        control: PoolControl | None,
        governed: Callable[[], bool],
    ) -> None:
        self.w = w
        self.live = live
        self.in_use = in_use  # the main process and the rest of the cgroup, at startup
        self.requested = requested
        self.minimum = minimum
        self.cost = estimate  # a child's cost: the startup estimate until one is measured
        self.control = control
        self.governed = governed
        self.hub: Any = None  # the event loop, once registered
        self.sized_for = live.limit  # the limit the startup decision sized the pool in

    def calibrated(self, measured: int) -> None:
        """The first child's real cost (sampler's thread): size the pool with it."""
        self.cost = measured
        self._schedule("calibration")

    def check(self) -> None:
        """A watch of the sampler's: the limit changed since the pool was last sized."""
        if self.live.limit != self.sized_for:
            self._schedule("limit")

    def _schedule(self, level: str) -> None:
        if self.governed() or self.hub is None:
            return
        self.sized_for = self.live.limit
        self.hub.call_soon(self.resize, level)

    def target(self) -> int:
        """The concurrency that fits at the child's cost in the limit of now, by the
        startup decision's rule (only forking pools are resized)."""
        live = self.live
        return decide(
            mode="scale", limit=live.limit, headroom_fraction=live.settings.headroom,
            in_use=self.in_use, child=self.cost, requested=self.requested,
            minimum=self.minimum, pool="prefork",
        ).concurrency  # fmt: skip

    def resize(self, level: str) -> None:
        """On the event loop: the autoscaler's max, or the pool itself."""
        if self.governed():
            return
        target = self.target()
        autoscaler = getattr(self.w, "autoscaler", None)
        if self.w.autoscale and autoscaler is not None:
            before = autoscaler.max_concurrency
            if target != before:
                autoscaler.update(max=target)
                self._log(level, "autoscale_max", before, target)
            return
        control = self.control
        if control is None or not control.installed:
            return
        before = control.size
        if target > before:
            control.grow(target - before)
        elif target < before:
            for pid in control.pids()[: before - target]:  # idle ones; busy ones refuse
                control.retire(pid)
        if control.size != before:
            self._log(level, "pool", before, control.size)

    def _log(self, level: str, what: str, before: int, after: int) -> None:
        fields = {"worker": self.w.hostname, "level": level, "action": "resize",
                  "what": what, "before": before, "concurrency": after,
                  "limit_mib": mib(self.live.limit),
                  "child_cost_mib": mib(self.cost)}  # fmt: skip
        emit(logging.WARNING, "pressure", fields)


__all__ = ["Resizer"]
