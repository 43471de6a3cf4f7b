"""Where loaded messages wait for a connection: routes, destinations, connection slots.

A message's recipients are grouped by domain and each domain routed (the answer cached
for ``route_ttl``, shared by every message that asks meanwhile; a temporary failure is
asked again by the next one). Recipients whose domains route to the same set of hops
share a destination: a heap of jobs (priority, then age) that its connections pull from,
one message after another over the same connection.

A destination gets a connection of its own at once, and another while it has more than
``SPREAD`` jobs queued per open connection, up to ``max_per_host``; all of them together
open at most ``max_concurrency``. A destination with jobs and no free slot waits in the
backlog for the next connection to close anywhere.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.delivery.client import Job, Result
from mailrelay.delivery.router import PermanentRouteError, RouteError

# The queue runner's lines keep the one namespace the log has always shown for them.
log = Logger(namespace="mailrelay.delivery.manager")

SPREAD = 20  # queued jobs per open connection before another one to the same destination
MAX_ROUTES = 4096  # cached domain routes before expired ones are dropped

# (hops, recipients) by the set of hops they route to
Groups = dict[frozenset, tuple[list, list[str]]]


class Destination:
    """Jobs waiting for a connection to one set of hops."""

    def __init__(self, key: frozenset, hops: list) -> None:
        self.key = key
        self.hops = hops
        self.jobs: list[tuple[str, int, Job]] = []
        self.active = 0  # open connections
        self.idle: list[defer.Deferred] = []  # connections kept open, waiting for a job
        self._seq = 0

    def push(self, job: Job) -> None:
        self._seq += 1
        heapq.heappush(self.jobs, (job.queue_id, self._seq, job))

    def pop(self) -> Job | None:
        return heapq.heappop(self.jobs)[2] if self.jobs else None

    def wait_for_job(self, clock, seconds: float) -> defer.Deferred:
        """A connection stays open for ``seconds``: the Deferred fires True when a job
        arrives (the connection asks again), False when the time is up or delivery stops
        (it says QUIT). A connection that closes meanwhile cancels it."""

        def cancel(d: defer.Deferred) -> None:
            if d in self.idle:
                self.idle.remove(d)
            if timer.active():
                timer.cancel()

        waiting: defer.Deferred = defer.Deferred(cancel)

        def expire() -> None:
            if waiting in self.idle:
                self.idle.remove(waiting)
                waiting.callback(False)

        def done(more: bool) -> bool:
            if timer.active():
                timer.cancel()
            return more

        timer = clock.callLater(seconds, expire)
        waiting.addCallback(done)
        self.idle.append(waiting)
        return waiting

    def release(self) -> None:
        """Every connection kept open for this destination says QUIT."""
        idle, self.idle = self.idle, []
        for waiting in idle:
            waiting.callback(False)


class Destinations:
    """The destinations with jobs or connections, and the connection slots they share.

    ``connect(dest)`` opens a connection that pulls ``dest``'s jobs; the caller calls
    ``closed(dest)`` when it closes, then ``settle(dest)``.
    """

    def __init__(self, connect: Callable[[Destination], object], *, max_per_host: int,
                 max_concurrency: int) -> None:
        self._connect = connect
        self.max_per_host = max_per_host
        self.max_concurrency = max_concurrency
        self.running = False  # no connection is opened while False
        self.connections = 0
        self._by_key: dict[frozenset, Destination] = {}
        self._backlog: dict[frozenset, None] = {}  # destinations waiting for a free slot

    def __iter__(self):
        return iter(list(self._by_key.values()))

    def add(self, key: frozenset, hops: list, job: Job) -> None:
        """Queue ``job`` for the hops ``key`` and open a connection if one may be."""
        dest = self._by_key.get(key)
        if dest is None:
            dest = self._by_key[key] = Destination(key, hops)
        dest.push(job)
        self.dispatch(dest)

    def dispatch(self, dest: Destination) -> None:
        while dest.idle and dest.jobs:  # a connection kept open takes it at once
            dest.idle.pop(0).callback(True)
        while (self.running and dest.jobs and dest.active < self.max_per_host
               and self.connections < self.max_concurrency
               and (dest.active == 0 or len(dest.jobs) > dest.active * SPREAD)):
            dest.active += 1
            self.connections += 1
            self._connect(dest)
        if dest.jobs and dest.active == 0:
            self._backlog[dest.key] = None  # no free connection slot: wait for one

    def closed(self, dest: Destination) -> None:
        """A connection of ``dest`` has closed: its slot is free."""
        dest.active -= 1
        self.connections -= 1

    def settle(self, dest: Destination) -> None:
        """After ``closed``: ``dest`` is forgotten if nothing is left of it, else it gets
        connections again; then destinations in the backlog take the free slots."""
        if not dest.jobs and dest.active == 0:
            self._by_key.pop(dest.key, None)
            self._backlog.pop(dest.key, None)
        else:
            self.dispatch(dest)
        for key in list(self._backlog):
            if self.connections >= self.max_concurrency:
                break
            waiting = self._by_key.get(key)
            del self._backlog[key]
            if waiting is not None:
                self.dispatch(waiting)


_UNSET = object()


class _Route:
    """A domain's route, shared by every message that asks while it is fresh."""

    def __init__(self) -> None:
        self.result: object = _UNSET
        self.expires = 0.0
        self.waiters: list[defer.Deferred] = []

    def get(self) -> defer.Deferred:
        if self.result is _UNSET:
            d: defer.Deferred = defer.Deferred()
            self.waiters.append(d)
            return d
        if isinstance(self.result, Failure):
            return defer.fail(self.result)
        return defer.succeed(self.result)

    def set(self, result, expires: float) -> None:
        self.result, self.expires = result, expires
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class Routes:
    """The router's answers by domain, cached for ``ttl`` seconds."""

    def __init__(self, router, clock, ttl: float) -> None:
        self.router = router
        self.clock = clock
        self.ttl = ttl
        self._routes: dict[str, _Route] = {}

    def route(self, domain: str) -> defer.Deferred:
        now = self.clock.seconds()
        entry = self._routes.get(domain)
        if entry is None or (entry.result is not _UNSET and entry.expires <= now):
            if len(self._routes) >= MAX_ROUTES:
                self._routes = {k: v for k, v in self._routes.items()
                                if v.result is _UNSET or v.expires > now}
            entry = self._routes[domain] = _Route()
            d = defer.maybeDeferred(self.router.route, domain)

            def settle(result, entry=entry):
                # A temporary failure is asked again by the next message that needs it.
                temporary = isinstance(result, Failure) and not result.check(
                    PermanentRouteError)
                entry.set(result, self.clock.seconds() + (0 if temporary else self.ttl))

            d.addBoth(settle)
        return entry.get()

    async def group(self, recipients: list[str],
                    queue_id: str) -> tuple[Groups, list[Result]]:
        """``recipients`` grouped by the hops their domains route to, and the results of
        those that cannot be routed (refused or deferred)."""
        by_domain: dict[str, list[str]] = {}
        for rcpt in recipients:
            by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
        domains = [d for d in by_domain if d]
        routed = await defer.DeferredList([self.route(d) for d in domains],
                                          consumeErrors=True)
        failures = [Result(r, 550, "5.1.3 recipient address has no domain")
                    for r in by_domain.get("", [])]
        groups: Groups = {}
        for domain, (ok, value) in zip(domains, routed, strict=True):
            if not ok:
                failures += _unroutable(value, queue_id, by_domain[domain])
            elif value:
                groups.setdefault(frozenset(value), (value, []))[1].extend(by_domain[domain])
            else:
                failures += [Result(r, 451, "4.4.3 no route") for r in by_domain[domain]]
        return groups, failures


def _unroutable(failure: Failure, queue_id: str, rcpts: list[str]) -> list[Result]:
    error = failure.value
    if isinstance(error, RouteError):
        return [Result(r, error.code, error.text) for r in rcpts]
    log.failure("routing failed for {queue_id}", failure, queue_id=queue_id)
    return [Result(r, 451, f"4.4.3 routing failed: {error}") for r in rcpts]
