"""IMetrics with prometheus-client: the relay's registry, served at /metrics (web.py).

What the relay counts itself (sessions, logins, messages, commits, limits, LDAP) goes into
prometheus-client's own metrics, whose updates are a locked addition. What the delivery
process counts arrives in its records (``absorb``, about once a second) and is kept in
plain values that a collector shows; so are the queue's sizes and the delivery process's
health, read when scraped. Scrapes run in the reactor's thread pool (prometheus-client's
Twisted resource), so reading the spool's directories never blocks the reactor; they are
read at most once per ``queue_cache`` seconds, however often Prometheus asks.
"""

from __future__ import annotations

import json
import threading
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.interfaces import IListenerMetrics, IMetrics
from mailrelay.metrics import (
    COMMIT_BUCKETS,
    DELIVERY_BUCKETS,
    DESTINATIONS,
    DIRECTORY_BUCKETS,
    LOGIN_METHODS,
    LOGIN_RESULTS,
    NOTIFICATIONS,
    OUTCOMES,
    POLICY_REASONS,
    bounded,
)
from mailrelay.spool.queueid import time_of

log = Logger()

QUEUE_CACHE = 5.0  # seconds a reading of the spool's directories is shown again
QUEUE_STATES = ("ready", "deferred", "held")
MAX_REFUSAL_KINDS = 200  # distinct (code, status) pairs; more are counted as "other"


@implementer(IListenerMetrics)
class ListenerMetrics:
    """One listener's counters, their labelled children made once."""

    def __init__(self, metrics: PrometheusMetrics, name: str) -> None:
        m = metrics
        self._metrics = metrics
        self._open = {tls: m.sessions_open.labels(name, _yes(tls)) for tls in (False, True)}
        self._total = {tls: m.sessions.labels(name, _yes(tls)) for tls in (False, True)}
        self._starttls = m.starttls.labels(name)
        self._accepted = m.accepted.labels(name)
        self._bytes = m.received_bytes.labels(name)
        self._commit = m.commit_seconds

    def opened(self, tls: bool) -> None:
        self._open[tls].inc()
        self._total[tls].inc()

    def startedTLS(self) -> None:
        self._open[False].dec()
        self._open[True].inc()
        self._starttls.inc()

    def closed(self, tls: bool) -> None:
        self._open[tls].dec()

    def accepted(self, size: int, commit_seconds: float) -> None:
        self._accepted.inc()
        self._bytes.inc(size)
        self._commit.observe(commit_seconds)

    def refused(self, code: int, status: str | None) -> None:
        self._metrics.refusal(code, status)

    def login(self, method: str, result: str) -> None:
        self._metrics.login(method, result)


@implementer(IMetrics)
class PrometheusMetrics:
    """The relay's IMetrics. ``spool``: the queue shown by state (None: not shown);
    ``delivery``: the delivery.process.DeliveryProcess whose health is shown (None: no
    delivery process)."""

    def __init__(self, spool=None, delivery=None, clock=time.time,
                 queue_cache: float = QUEUE_CACHE) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.sessions_open = Gauge("mailrelay_smtp_sessions_open", "SMTP sessions open now",
                                   ["listener", "tls"], registry=r)
        self.sessions = Counter("mailrelay_smtp_sessions", "SMTP sessions started (tls: "
                                "implicit TLS)", ["listener", "tls"], registry=r)
        self.starttls = Counter("mailrelay_smtp_starttls", "SMTP sessions that started TLS "
                                "with STARTTLS", ["listener"], registry=r)
        self.logins = Counter("mailrelay_smtp_logins", "Logins by method and result",
                              ["method", "result"], registry=r)
        self.accepted = Counter("mailrelay_smtp_messages_accepted", "Messages accepted "
                                "(durable in the spool)", ["listener"], registry=r)
        self.received_bytes = Counter("mailrelay_smtp_received_bytes", "Bytes of the "
                                      "messages accepted, as stored", ["listener"], registry=r)
        self.refusals = Counter("mailrelay_smtp_refusals", "4xx and 5xx replies: refused "
                                "commands and messages, by code and enhanced status",
                                ["code", "status"], registry=r)
        self.commit_seconds = Histogram("mailrelay_spool_commit_seconds", "Time from the "
                                        "end of a message's data to its durable commit",
                                        buckets=COMMIT_BUCKETS, registry=r)
        self.policy_refusals = Counter("mailrelay_policy_refusals", "Steps refused or "
                                       "slowed by a limit", ["reason"], registry=r)
        self.directory_calls = Counter("mailrelay_directory_requests", "Calls to the LDAP "
                                       "directory by result", ["result"], registry=r)
        self.directory_seconds = Histogram("mailrelay_directory_request_seconds", "Time of "
                                           "a call to the LDAP directory",
                                           buckets=DIRECTORY_BUCKETS, registry=r)
        self._refusal_children: dict[tuple[int, str | None], object] = {}
        self._logins = {(m, res): self.logins.labels(m, res)
                        for m in LOGIN_METHODS for res in LOGIN_RESULTS}
        self._policy = {reason: self.policy_refusals.labels(reason) for reason in POLICY_REASONS}
        self._directory = {True: self.directory_calls.labels("ok"),
                           False: self.directory_calls.labels("error")}
        # What the delivery process counts: replaced, never changed in place, so that a
        # scrape (in a thread) reads whole values.
        # Every known series from the start, at 0: rate() then sees the first increase.
        self._attempts = {(o, d): 0 for o in OUTCOMES for d in DESTINATIONS}
        self._notifications = dict.fromkeys(NOTIFICATIONS, 0)
        self._latency: tuple[list[int], float] = ([0] * (len(DELIVERY_BUCKETS) + 1), 0.0)
        self._reported_at: float | None = None
        self._spool = spool
        self._process = delivery
        self._clock = clock
        self._queue_cache = queue_cache
        self._queue: tuple[float, dict[str, tuple[int, float | None]]] | None = None
        self._queue_lock = threading.Lock()
        r.register(_Collected(self))

    # -- IMetrics

    def listener(self, name: str) -> ListenerMetrics:
        return ListenerMetrics(self, name)

    def login(self, method: str, result: str) -> None:
        child = self._logins.get((method, result))
        if child is None:
            child = self.logins.labels(bounded(method, LOGIN_METHODS),
                                       bounded(result, LOGIN_RESULTS))
        child.inc()

    def policyRefusal(self, reason: str) -> None:
        (self._policy.get(reason) or self.policy_refusals.labels("other")).inc()

    def notification(self, kind: str) -> None:
        self._notifications = self._counted([[kind, 1]])

    def delivery(self, outcome: str, destination: str, latency: float | None) -> None:
        self._add({"attempts": [[outcome, destination, 1]]})
        if latency is not None:
            self.delivery_latency(latency)

    def directory(self, seconds: float, ok: bool) -> None:
        self._directory[bool(ok)].inc()
        self.directory_seconds.observe(seconds)

    def refusal(self, code: int, status: str | None) -> None:
        key = (code, status)
        child = self._refusal_children.get(key)
        if child is None:
            if len(self._refusal_children) >= MAX_REFUSAL_KINDS:
                key, code, status = ("other", "other"), "other", "other"
            child = self._refusal_children[key] = self.refusals.labels(str(code), status or "")
        child.inc()

    # -- the delivery process's records

    def absorb(self, text: str) -> None:
        """Add one record of the delivery process (forward.DeltaMetrics.record, as JSON)."""
        self._reported_at = self._clock()
        try:
            self._add(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warn("delivery process: an unreadable metrics record {record!r}",
                     record=text[:200])

    def _add(self, record: dict) -> None:
        """Everything of ``record`` or nothing (a malformed one raises before any change)."""
        attempts = dict(self._attempts)
        for outcome, destination, n in record.get("attempts", ()):
            key = (bounded(outcome, OUTCOMES), bounded(destination, DESTINATIONS))
            attempts[key] = attempts.get(key, 0) + int(n)
        latency = self._latency
        if "latency" in record:
            old, total = latency
            counts = [a + int(b) for a, b in zip(old, record["latency"]["buckets"], strict=True)]
            latency = (counts, total + float(record["latency"]["sum"]))
        notifications = self._counted(record.get("notifications", ()))
        self._attempts, self._latency, self._notifications = attempts, latency, notifications

    def _counted(self, counts) -> dict[str, int]:
        notifications = dict(self._notifications)
        for kind, n in counts:
            kind = bounded(kind, NOTIFICATIONS)
            notifications[kind] = notifications.get(kind, 0) + int(n)
        return notifications

    def delivery_latency(self, seconds: float) -> None:
        """One delivery latency counted here (tests; the process sends them counted)."""
        counts, total = self._latency
        counts = list(counts)
        counts[bisect_left(DELIVERY_BUCKETS, seconds)] += 1
        self._latency = (counts, total + seconds)

    # -- read when scraped (in a thread)

    def queue(self) -> dict[str, tuple[int, float | None]]:
        """Messages and the oldest one's time by state, read at most once per
        ``queue_cache`` seconds."""
        with self._queue_lock:
            now = self._clock()
            if self._queue is None or now - self._queue[0] >= self._queue_cache:
                self._queue = (now, self._census())
            return self._queue[1]

    def _census(self) -> dict[str, tuple[int, float | None]]:
        queued, tried, held = self._spool.queued(), self._spool.tried(), self._spool.held()
        ready = [i for i in queued if i not in tried]
        deferred = [i for i in queued if i in tried]
        return {state: (len(ids), min(map(time_of, ids)) if ids else None)
                for state, ids in (("ready", ready), ("deferred", deferred), ("held", held))}


class _Collected:
    """The values prometheus-client does not keep: read from PrometheusMetrics."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._m = metrics

    def describe(self):
        return []  # values read at scrape time: not read at registration

    def collect(self):
        m = self._m
        attempts = CounterMetricFamily("mailrelay_delivery_attempts", "Delivery attempts per "
                                       "recipient, by outcome and destination class",
                                       labels=["outcome", "destination"])
        for (outcome, destination), n in sorted(m._attempts.items()):
            attempts.add_metric([outcome, destination], n)
        yield attempts
        notices = CounterMetricFamily("mailrelay_notifications_queued", "Bounces and delay "
                                      "DSNs (from the delivery process) and sender "
                                      "notifications queued", labels=["kind"])
        for kind, n in sorted(m._notifications.items()):
            notices.add_metric([kind], n)
        yield notices
        counts, total = m._latency
        cumulative, buckets = 0, []
        for bound, n in zip([*map(_bound, DELIVERY_BUCKETS), "+Inf"], counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("mailrelay_delivery_seconds", "Time from a message's "
                                    "reception to the remote 250, per recipient delivered",
                                    buckets=buckets, sum_value=total)
        if m._process is not None:
            yield GaugeMetricFamily("mailrelay_delivery_process_up", "1 while the delivery "
                                    "process runs", value=1 if m._process.pid else 0)
            yield CounterMetricFamily("mailrelay_delivery_process_restarts", "Times the "
                                      "delivery process ended and was restarted",
                                      value=m._process.restarts)
            if m._reported_at is not None:
                yield GaugeMetricFamily("mailrelay_delivery_process_report_age_seconds",
                                        "Seconds since the delivery process last reported "
                                        "(it does once a second)",
                                        value=max(0.0, m._clock() - m._reported_at))
        if m._spool is not None:
            queue = m.queue()
            now = m._clock()
            size = GaugeMetricFamily("mailrelay_queue_messages", "Messages in the spool by "
                                     "state: ready (never tried), deferred (tried, waiting "
                                     "for a retry), held (sandboxed)", labels=["state"])
            oldest = GaugeMetricFamily("mailrelay_queue_oldest_seconds", "Age of the oldest "
                                       "message by state (0: none)", labels=["state"])
            for state in QUEUE_STATES:
                count, first = queue[state]
                size.add_metric([state], count)
                oldest.add_metric([state], 0.0 if first is None else max(0.0, now - first))
            yield size
            yield oldest


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _bound(value: float) -> str:
    return repr(float(value))
