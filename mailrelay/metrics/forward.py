"""The delivery process's counters, sent to the relay (see the package docstring).

``DeltaMetrics`` counts in plain dicts and, every REPORT_INTERVAL while it runs, logs
what it counted since its last record as one event carrying RECORD_KEY; the relay takes
such events out of the process's log records (delivery/process.py) and adds them to its
own counters. An empty record is sent too: its arrival is the process's heartbeat.
"""

from __future__ import annotations

import json

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailrelay.metrics import (
    DELIVERY_BUCKETS,
    DESTINATIONS,
    NOTIFICATIONS,
    OUTCOMES,
    RECORD_KEY,
    REPORT_INTERVAL,
    WEBHOOK_OUTCOMES,
    Buckets,
    NoMetrics,
    bounded,
)

log = Logger()


class DeltaMetrics(NoMetrics, Service):
    """IMetrics of the delivery process: delivery attempts, DSNs queued, delivery latency,
    webhook requests (its sender's, webhooks/sender.py)."""

    name = "metrics"

    def __init__(self, reactor, interval: float = REPORT_INTERVAL) -> None:
        self._reactor = reactor
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._reset()

    def _reset(self) -> None:
        self._attempts: dict[tuple[str, str], int] = {}
        self._notifications: dict[str, int] = {}
        self._webhooks: dict[str, int] = {}
        self._latency = Buckets(DELIVERY_BUCKETS)

    def delivery(self, outcome: str, destination: str, latency: float | None) -> None:
        key = (bounded(outcome, OUTCOMES), bounded(destination, DESTINATIONS))
        self._attempts[key] = self._attempts.get(key, 0) + 1
        if latency is not None:
            self._latency.observe(max(0.0, latency))

    def notification(self, kind: str) -> None:
        kind = bounded(kind, NOTIFICATIONS)
        self._notifications[kind] = self._notifications.get(kind, 0) + 1

    def webhook(self, outcome: str) -> None:
        outcome = bounded(outcome, WEBHOOK_OUTCOMES)
        self._webhooks[outcome] = self._webhooks.get(outcome, 0) + 1

    def record(self) -> dict:
        """What was counted since the last record (and forget it)."""
        record = {
            "attempts": [[o, d, n] for (o, d), n in self._attempts.items()],
            "notifications": [[k, n] for k, n in self._notifications.items()],
            "webhooks": [[k, n] for k, n in self._webhooks.items()],
            "latency": {"buckets": self._latency.counts, "sum": self._latency.sum},
        }
        self._reset()
        return record

    def report(self) -> None:
        log.info("{" + RECORD_KEY + "}", **{RECORD_KEY: json.dumps(self.record())})

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.report)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.report()  # what the last second counted
