"""Waiting for an answer in mailrelay-admin, a short-lived synchronous process.

The user file answers at once (its store runs in the calling thread, so its Deferreds
have fired when returned); LDAP and the relay's control socket need the reactor. ``run``
starts the reactor only for those, and the reactor runs at most once per process: a
command calls ``run`` once, with everything it needs to ask in one coroutine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")


def run(start: Callable[[Any], Awaitable[T]], timeout: float | None = None) -> T:
    """The result of ``start(reactor)`` (a coroutine or a Deferred), or its exception
    (defer.TimeoutError after ``timeout`` seconds)."""
    from twisted.internet import reactor

    d = defer.ensureDeferred(start(reactor))
    if not d.called and timeout is not None:
        d.addTimeout(timeout, reactor)
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if not outcome:
        d.addBoth(lambda _: reactor.stop())
        reactor.run(installSignalHandlers=False)
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result
