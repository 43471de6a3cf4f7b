"""Counting for monitoring: what IMetrics (mailrelay/interfaces.py) promises, in one place.

The session, the policy, the spool and delivery call a few cheap IMetrics methods; only
``prom.py`` knows prometheus-client, and only the relay imports it (service.py). Without
``[metrics]`` the callers hold ``NO_METRICS``, whose methods do nothing.

The delivery process counts in ``forward.DeltaMetrics``: plain integers, sent to the relay
once a second as one record among its log records (the channel that already carries
them), and added there to the relay's counters (``prom.PrometheusMetrics.absorb``). The
counts thus outlive a restart of the delivery process, need no second listener or shared
directory, and lose at most the last second's when the process is killed.
"""

from __future__ import annotations

from bisect import bisect_left

from zope.interface import implementer

from mailrelay.interfaces import IListenerMetrics, IMetrics

# The key of the delivery process's metrics records (delivery/process.py takes them out of
# its log records); the value is a JSON text.
RECORD_KEY = "mailrelay_metrics"
REPORT_INTERVAL = 1.0  # seconds between the delivery process's records (also its heartbeat)

# The only label values there are: anything else is counted as "other".
OUTCOMES = ("sent", "deferred", "bounced", "expired")
DESTINATIONS = ("mx", "smarthost", "route")
NOTIFICATIONS = ("bounce", "delay", "sender")
LOGIN_METHODS = ("password", "ip", "address")
LOGIN_RESULTS = ("success", "failure", "refused", "error")
WEBHOOK_OUTCOMES = ("sent", "retried", "failed")
POLICY_REASONS = ("connections", "user_connections", "login_blocked", "login_delayed",
                  "rate_limit", "messages_per_connection", "quota")

# Histogram buckets (seconds, upper bounds; +Inf is added).
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                    14400.0, 86400.0)
DIRECTORY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


class Buckets:
    """A histogram's counts: one per bound and one past the last (+Inf), not cumulative,
    and the sum of what was observed. Plain integers: an observation costs a bisection."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def add(self, counts: list[int], total: float) -> None:
        """Add another Buckets' ``counts`` and ``sum`` (of the same bounds)."""
        if len(counts) != len(self.counts):
            raise ValueError("buckets of other bounds")
        for i, n in enumerate(counts):
            self.counts[i] += int(n)
        self.sum += float(total)


@implementer(IListenerMetrics)
class _NoListenerMetrics:
    def opened(self, tls: bool) -> None:
        pass

    def startedTLS(self) -> None:
        pass

    def closed(self, tls: bool) -> None:
        pass

    def accepted(self, size: int, commit_seconds: float) -> None:
        pass

    def refused(self, code: int, status: str | None) -> None:
        pass

    def login(self, method: str, result: str) -> None:
        pass


@implementer(IMetrics)
class NoMetrics:
    """Counts nothing (metrics off, tests, mailrelay-admin)."""

    def listener(self, name: str) -> IListenerMetrics:
        return NO_LISTENER_METRICS

    def login(self, method: str, result: str) -> None:
        pass

    def policyRefusal(self, reason: str) -> None:
        pass

    def notification(self, kind: str) -> None:
        pass

    def delivery(self, outcome: str, destination: str, latency: float | None) -> None:
        pass

    def directory(self, seconds: float, ok: bool) -> None:
        pass

    def webhook(self, outcome: str) -> None:
        pass

    def absorb(self, record: str) -> None:
        """A metrics record of the delivery process (prom.PrometheusMetrics adds it)."""


NO_LISTENER_METRICS = _NoListenerMetrics()
NO_METRICS = NoMetrics()
