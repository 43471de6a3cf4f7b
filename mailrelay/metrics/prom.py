"""IMetrics for Prometheus: the relay's counts, served at /metrics (web.py) through
prometheus-client's registry and exposition.

Counting is a plain integer addition on the reactor thread (prometheus-client's own
metrics take a lock and cost a few microseconds an update: too much for a session's
path); a collector turns the integers into metric families when scraped. What the
delivery process counts arrives in its records (``absorb``, about once a second) and is
added to the same kind of integers; the queue's sizes and the delivery process's health
are read when scraped. Scrapes run in the reactor's thread pool (prometheus-client's
Twisted resource): they read integers the reactor may be adding to, which is safe in
CPython (a dict only ever gains keys by being replaced), and read the spool's directories
at most once per ``queue_cache`` seconds, so a large queue never blocks the reactor.
"""

from __future__ import annotations

import json
import threading
import time

from prometheus_client import CollectorRegistry
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
    WEBHOOK_OUTCOMES,
    Buckets,
    bounded,
)
from mailrelay.spool.queueid import time_of

log = Logger()

QUEUE_CACHE = 5.0  # seconds a reading of the spool's directories is shown again
QUEUE_STATES = ("ready", "deferred", "held")
MAX_REFUSAL_KINDS = 200  # distinct (code, status) pairs; more are counted as "other"
_OTHER = "other"


@implementer(IListenerMetrics)
class ListenerMetrics:
    """One listener's counters (lists indexed by the tls flag: False 0, True 1)."""

    __slots__ = ("name", "open", "total", "starttls", "messages", "bytes", "_relay")

    def __init__(self, relay: PrometheusMetrics, name: str) -> None:
        self.name = name
        self.open = [0, 0]
        self.total = [0, 0]
        self.starttls = 0
        self.messages = 0
        self.bytes = 0
        self._relay = relay

    def opened(self, tls: bool) -> None:
        self.open[tls] += 1
        self.total[tls] += 1

    def startedTLS(self) -> None:
        self.open[False] -= 1
        self.open[True] += 1
        self.starttls += 1

    def closed(self, tls: bool) -> None:
        self.open[tls] -= 1

    def accepted(self, size: int, commit_seconds: float) -> None:
        self.messages += 1
        self.bytes += size
        self._relay.commits.observe(commit_seconds)

    def refused(self, code: int, status: str | None) -> None:
        self._relay.refusal(code, status)

    def login(self, method: str, result: str) -> None:
        self._relay.login(method, result)


@implementer(IMetrics)
class PrometheusMetrics:
    """The relay's IMetrics and its ``registry``. ``spool``: the queue shown by state
    (None: not shown); ``delivery``: the delivery.process.DeliveryProcess whose health is
    shown (None: no delivery process)."""

    def __init__(self, spool=None, delivery=None, clock=time.time,
                 queue_cache: float = QUEUE_CACHE) -> None:
        self.listeners: list[ListenerMetrics] = []
        # Every series of a fixed set exists from the start, at 0 (rate() then sees the
        # first increase); "other" ones are shown once counted.
        self.logins = {(m, r): 0 for m in (*LOGIN_METHODS, _OTHER)
                       for r in (*LOGIN_RESULTS, _OTHER)}
        self.policy = dict.fromkeys((*POLICY_REASONS, _OTHER), 0)
        self.refusals: dict[tuple[str, str], int] = {}
        self.commits = Buckets(COMMIT_BUCKETS)
        self.directory_calls = {"ok": 0, "error": 0}
        self.directory_seconds = Buckets(DIRECTORY_BUCKETS)
        self.attempts = {(o, d): 0 for o in (*OUTCOMES, _OTHER)
                         for d in (*DESTINATIONS, _OTHER)}
        self.notifications = dict.fromkeys((*NOTIFICATIONS, _OTHER), 0)
        self.latency = Buckets(DELIVERY_BUCKETS)
        self.webhooks = dict.fromkeys((*WEBHOOK_OUTCOMES, _OTHER), 0)
        self.outbox = None  # the webhook outbox (webhooks/store.py) whose backlog is shown
        self.reported_at: float | None = None
        self._spool = spool
        self.process = delivery
        self.clock = clock
        self._queue_cache = queue_cache
        self._queue: tuple[float, dict[str, tuple[int, float | None]]] | None = None
        self._queue_lock = threading.Lock()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_Collector(self))

    # -- IMetrics

    def listener(self, name: str) -> ListenerMetrics:
        listener = ListenerMetrics(self, name)
        self.listeners.append(listener)
        return listener

    def login(self, method: str, result: str) -> None:
        key = (method, result)
        if key not in self.logins:
            key = (bounded(method, LOGIN_METHODS), bounded(result, LOGIN_RESULTS))
        self.logins[key] += 1

    def policyRefusal(self, reason: str) -> None:
        self.policy[reason if reason in self.policy else _OTHER] += 1

    def notification(self, kind: str) -> None:
        self.notifications[bounded(kind, NOTIFICATIONS)] += 1

    def delivery(self, outcome: str, destination: str, latency: float | None) -> None:
        self.attempts[bounded(outcome, OUTCOMES), bounded(destination, DESTINATIONS)] += 1
        if latency is not None:
            self.latency.observe(latency)

    def directory(self, seconds: float, ok: bool) -> None:
        self.directory_calls["ok" if ok else "error"] += 1
        self.directory_seconds.observe(seconds)

    def webhook(self, outcome: str) -> None:
        self.webhooks[bounded(outcome, WEBHOOK_OUTCOMES)] += 1

    def refusal(self, code: int, status: str | None) -> None:
        key = (str(code), status or "")
        if key in self.refusals:
            self.refusals[key] += 1
        else:
            if len(self.refusals) >= MAX_REFUSAL_KINDS:
                key = (_OTHER, _OTHER)
            self.refusals = {**self.refusals, key: self.refusals.get(key, 0) + 1}

    # -- the delivery process's records

    def absorb(self, text: str) -> None:
        """Add one record of the delivery process (forward.DeltaMetrics.record, as JSON):
        all of it, or nothing when it cannot be read."""
        self.reported_at = self.clock()
        try:
            record = json.loads(text)
            attempts = [(bounded(o, OUTCOMES), bounded(d, DESTINATIONS), int(n))
                        for o, d, n in record.get("attempts", ())]
            notices = [(bounded(k, NOTIFICATIONS), int(n))
                       for k, n in record.get("notifications", ())]
            webhooks = [(bounded(k, WEBHOOK_OUTCOMES), int(n))
                        for k, n in record.get("webhooks", ())]
            latency = record.get("latency")
            if latency is not None:
                latency = ([int(n) for n in latency["buckets"]], float(latency["sum"]))
                if len(latency[0]) != len(self.latency.counts):
                    raise ValueError("buckets of other bounds")
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warn("delivery process: an unreadable metrics record {record!r}",
                     record=text[:200])
            return
        for outcome, destination, n in attempts:
            self.attempts[outcome, destination] += n
        for kind, n in notices:
            self.notifications[kind] += n
        for outcome, n in webhooks:
            self.webhooks[outcome] += n
        if latency is not None:
            self.latency.add(*latency)

    # -- read when scraped (in a thread)

    def queue(self) -> dict[str, tuple[int, float | None]]:
        """Messages and the oldest one's time by state, read at most once per
        ``queue_cache`` seconds."""
        with self._queue_lock:
            now = self.clock()
            if self._queue is None or now - self._queue[0] >= self._queue_cache:
                self._queue = (now, self._census())
            return self._queue[1]

    def _census(self) -> dict[str, tuple[int, float | None]]:
        queued, tried, held = self._spool.queued(), self._spool.tried(), self._spool.held()
        ready = [i for i in queued if i not in tried]
        deferred = [i for i in queued if i in tried]
        return {state: (len(ids), min(map(time_of, ids)) if ids else None)
                for state, ids in (("ready", ready), ("deferred", deferred), ("held", held))}


class _Collector:
    """Metric families from PrometheusMetrics' integers, made when scraped."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._m = metrics

    def describe(self):
        return []  # nothing to read at registration

    def collect(self):
        m = self._m
        yield from self._sessions(m)
        yield _counter("mailrelay_smtp_logins", "Logins by method and result",
                       ["method", "result"], m.logins)
        yield _counter("mailrelay_smtp_refusals", "4xx and 5xx replies: refused commands "
                       "and messages, by code and enhanced status", ["code", "status"],
                       m.refusals)
        yield _histogram("mailrelay_spool_commit_seconds", "Time from the end of a "
                         "message's data to its durable commit", m.commits)
        yield _counter("mailrelay_policy_refusals", "Steps refused or slowed by a limit",
                       ["reason"], {(k,): n for k, n in m.policy.items()})
        yield _counter("mailrelay_directory_requests", "Calls to the LDAP directory by "
                       "result", ["result"], {(k,): n for k, n in m.directory_calls.items()})
        yield _histogram("mailrelay_directory_request_seconds", "Time of a call to the LDAP "
                         "directory", m.directory_seconds)
        yield _counter("mailrelay_delivery_attempts", "Delivery attempts per recipient, by "
                       "outcome and destination class", ["outcome", "destination"],
                       m.attempts)
        yield _histogram("mailrelay_delivery_seconds", "Time from a message's reception to "
                         "the remote 250, per recipient delivered", m.latency)
        yield _counter("mailrelay_notifications_queued", "Bounces and delay DSNs (from the "
                       "delivery process) and sender notifications queued", ["kind"],
                       {(k,): n for k, n in m.notifications.items()})
        yield _counter("mailrelay_webhook_deliveries", "Webhook requests by outcome: sent "
                       "(2xx), retried (to be tried again), failed (given up)", ["outcome"],
                       {(k,): n for k, n in m.webhooks.items()})
        if m.outbox is not None:
            yield from self._outbox(m)
        if m.process is not None:
            yield from self._process(m)
        if m._spool is not None:
            yield from self._queue(m)

    def _sessions(self, m: PrometheusMetrics):
        families = (
            (GaugeMetricFamily, "mailrelay_smtp_sessions_open", "SMTP sessions open now "
             "(tls: in TLS now)", ["listener", "tls"]),
            (CounterMetricFamily, "mailrelay_smtp_sessions", "SMTP sessions started (tls: "
             "implicit TLS)", ["listener", "tls"]),
            (CounterMetricFamily, "mailrelay_smtp_starttls", "SMTP sessions that started "
             "TLS with STARTTLS", ["listener"]),
            (CounterMetricFamily, "mailrelay_smtp_messages_accepted", "Messages accepted "
             "(durable in the spool)", ["listener"]),
            (CounterMetricFamily, "mailrelay_smtp_received_bytes", "Bytes of the messages "
             "accepted, as stored", ["listener"]),
        )
        made = [kind(name, text, labels=labels) for kind, name, text, labels in families]
        sessions_open, sessions, starttls, messages, received = made
        for listener in m.listeners:
            for tls in (False, True):
                yes = "yes" if tls else "no"
                sessions_open.add_metric([listener.name, yes], listener.open[tls])
                sessions.add_metric([listener.name, yes], listener.total[tls])
            starttls.add_metric([listener.name], listener.starttls)
            messages.add_metric([listener.name], listener.messages)
            received.add_metric([listener.name], listener.bytes)
        return made

    def _process(self, m: PrometheusMetrics):
        yield GaugeMetricFamily("mailrelay_delivery_process_up", "1 while the delivery "
                                "process runs", value=1 if m.process.pid else 0)
        yield CounterMetricFamily("mailrelay_delivery_process_restarts", "Times the delivery "
                                  "process ended and was restarted", value=m.process.restarts)
        if m.reported_at is not None:
            yield GaugeMetricFamily("mailrelay_delivery_process_report_age_seconds",
                                    "Seconds since the delivery process last reported (it "
                                    "does once a second)",
                                    value=max(0.0, m.clock() - m.reported_at))

    def _outbox(self, m: PrometheusMetrics):
        try:  # a count over an index of the outbox's SQLite file
            pending = m.outbox.pending_count()
        except Exception:
            log.failure("cannot count the webhook outbox")
            return
        yield GaugeMetricFamily("mailrelay_webhook_outbox_pending", "Webhook events waiting "
                                "to be sent (due now or to be tried again)", value=pending)

    def _queue(self, m: PrometheusMetrics):
        queue, now = m.queue(), m.clock()
        size = GaugeMetricFamily("mailrelay_queue_messages", "Messages in the spool by "
                                 "state: ready (never tried), deferred (tried, waiting for a "
                                 "retry), held (sandboxed, or over a quota)", labels=["state"])
        oldest = GaugeMetricFamily("mailrelay_queue_oldest_seconds", "Age of the oldest "
                                   "message by state (0: none)", labels=["state"])
        for state in QUEUE_STATES:
            count, first = queue[state]
            size.add_metric([state], count)
            oldest.add_metric([state], 0.0 if first is None else max(0.0, now - first))
        return size, oldest


def _counter(name: str, text: str, labels: list[str], counts: dict[tuple, int]):
    family = CounterMetricFamily(name, text, labels=labels)
    for key, n in sorted(counts.items()):
        if n or _OTHER not in key:  # an "other" series once something was counted there
            family.add_metric(list(key), n)
    return family


def _histogram(name: str, text: str, buckets: Buckets):
    counts, total = list(buckets.counts), buckets.sum
    cumulative, rows = 0, []
    for bound, n in zip([*map(repr, map(float, buckets.bounds)), "+Inf"], counts, strict=True):
        cumulative += n
        rows.append((bound, cumulative))
    return HistogramMetricFamily(name, text, buckets=rows, sum_value=total)
