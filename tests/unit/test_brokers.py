"""The hold bound: a held task goes back to the broker before the broker's own timer
acts on it (Redis/SQS redeliver it, RabbitMQ closes the channel)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_guard.brokers import HoldBound, hold_bound


@pytest.mark.parametrize(
    ("transport", "options", "expected"),
    [
        ("redis", {}, HoldBound(3240.0, "visibility_timeout")),
        ("rediss", {"visibility_timeout": 10}, HoldBound(9.0, "visibility_timeout")),
        ("sentinel", {"visibility_timeout": 60.0}, HoldBound(54.0, "visibility_timeout")),
        ("sqs", {}, HoldBound(1620.0, "visibility_timeout")),
        ("amqp", {}, HoldBound(1620.0, "consumer_timeout")),
        ("pyamqp", {"consumer_timeout": 20}, HoldBound(18.0, "consumer_timeout")),
        ("redis", {"visibility_timeout": "10"}, HoldBound(3240.0, "visibility_timeout")),
        ("redis", {"visibility_timeout": -1}, HoldBound(3240.0, "visibility_timeout")),
        ("redis", {"visibility_timeout": True}, HoldBound(3240.0, "visibility_timeout")),
        ("memory", {}, HoldBound(None, "")),
        ("filesystem", {"visibility_timeout": 5}, HoldBound(None, "")),
    ],
)
def test_hold_bound(transport: str, options: dict[str, Any], expected: HoldBound) -> None:
    assert hold_bound(transport, options) == expected
