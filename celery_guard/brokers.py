"""How long a task may wait in the worker before its broker acts on it (pure).

A task the worker has received but not handed to a child is unacknowledged. Kombu's
Redis (and SQS) transport delivers such a message again after ``visibility_timeout``,
to any worker: a task held past it would run twice. RabbitMQ closes the channel of a
delivery unacknowledged past its ``consumer_timeout`` (a server setting, 30 minutes by
default), failing every delivery on it. The governor gives a held task back to the broker
before either happens (``HOLD_SHARE`` of the timer): the message goes back to its queue
unacknowledged-free, and the next delivery starts a new timer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: kombu/transport/redis.py: ``visibility_timeout = 3600`` (SQS: 1800)
REDIS_VISIBILITY_TIMEOUT = 3600.0
SQS_VISIBILITY_TIMEOUT = 1800.0
#: RabbitMQ's ``consumer_timeout`` default since 3.8.15 (milliseconds in rabbitmq.conf)
RABBITMQ_CONSUMER_TIMEOUT = 1800.0
#: The share of the broker's timer a task may be held for.
HOLD_SHARE = 0.9

_REDIS = ("redis", "rediss", "sentinel")
_AMQP = ("amqp", "amqps", "pyamqp", "librabbitmq")


@dataclass(frozen=True)
class HoldBound:
    """Seconds a task may be held, and the broker timer it keeps under."""

    seconds: float | None  # None: the broker redelivers nothing on a timer
    timer: str  # visibility_timeout | consumer_timeout | "" (none)


def hold_bound(transport: str, options: Mapping[str, Any]) -> HoldBound:
    """The hold bound for a broker by its transport name (``redis``, ``amqp``...) and the
    app's ``broker_transport_options`` (where Redis' and SQS' ``visibility_timeout`` is
    set; ``consumer_timeout``, in seconds, says what the RabbitMQ server was given)."""
    scheme = transport.lower().partition("+")[0]
    if scheme in _REDIS or scheme == "sqs":
        default = REDIS_VISIBILITY_TIMEOUT if scheme in _REDIS else SQS_VISIBILITY_TIMEOUT
        timer = _seconds(options.get("visibility_timeout"), default)
        return HoldBound(HOLD_SHARE * timer, "visibility_timeout")
    if scheme in _AMQP:
        timer = _seconds(options.get("consumer_timeout"), RABBITMQ_CONSUMER_TIMEOUT)
        return HoldBound(HOLD_SHARE * timer, "consumer_timeout")
    return HoldBound(None, "")


def _seconds(value: Any, default: float) -> float:
    """A positive number of seconds, else the default (kombu itself reads the option)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return default
    return float(value)


__all__ = ["HOLD_SHARE", "HoldBound", "hold_bound"]
