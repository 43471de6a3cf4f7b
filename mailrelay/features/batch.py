"""Blocking calls made in a thread pool, coalesced under load.

Delivery asks the suppression list once per message; one thread hop each would cost more
than the SQLite lookup itself. A call made while another is under way waits for it, and
then every call that waited runs in one thread hop: one hop per burst, and no added
latency when the relay is idle.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.python.failure import Failure


class Coalescing:
    """``in_thread(g)`` runs ``g()`` in a thread and returns a Deferred of its result.
    With ``many``, ``f`` takes the list of the waiting calls' argument tuples and returns
    their results in order: one call (one transaction) for the whole burst; if it
    raises, every call of the burst fails."""

    def __init__(self, f: Callable, in_thread: Callable[[Callable], defer.Deferred],
                 many: bool = False) -> None:  # fmt: skip
        self._f = f
        self._in_thread = in_thread
        self._many = many
        self._queued: list[tuple[tuple, defer.Deferred]] = []
        self._busy = False

    def __call__(self, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._queued.append((args, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._queued = self._queued, []
        self._busy = bool(batch)
        if not batch:
            return

        def run() -> list[tuple[bool, object]]:
            if self._many:
                try:
                    return [(True, r) for r in self._f([args for args, _ in batch])]
                except Exception:
                    return [(False, Failure())] * len(batch)
            results: list[tuple[bool, object]] = []
            for args, _ in batch:
                try:
                    results.append((True, self._f(*args)))
                except Exception:
                    results.append((False, Failure()))
            return results

        def fire(results: list[tuple[bool, object]]) -> None:
            for (ok, value), (_, waiter) in zip(results, batch, strict=True):
                (waiter.callback if ok else waiter.errback)(value)

        def failed(failure: Failure) -> None:  # the pool itself failed (stopped)
            for _, waiter in batch:
                waiter.errback(failure)

        self._in_thread(run).addCallbacks(fire, failed).addBoth(lambda _: self._next())
