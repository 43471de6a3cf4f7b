"""Connections to the endpoints kept open between requests.

Each request over a new connection costs a TCP handshake and teardown, more than the
request itself; the sender's Agent keeps up to ``concurrency`` idle connections per
endpoint for ``IDLE_TIMEOUT`` seconds (nginx keeps an idle connection 75 s by default,
Apache 5 s: a server that closes first is handled below). The target check
(targetcheck.py) is made when a connection is opened, so a kept connection goes to an
address that was checked.

A server may close a kept connection just as a request is sent on it (its keep-alive
ran out). Twisted sends such a request again only for idempotent methods, never for a
POST: here the request fails with ``KeptConnectionLost`` and the next connection to
that endpoint is a new one, so the sender can send the event again at once rather than
count it as a failed attempt. The endpoint may then see the event twice (if it had read
it before closing), with the same ``webhook-id``: at least once, as Standard Webhooks
expects.
"""

from __future__ import annotations

import weakref

from twisted.internet import defer
from twisted.web.client import (
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)

IDLE_TIMEOUT = 30.0  # seconds an idle connection is kept
_LOST = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)


class KeptConnectionLost(Exception):
    """A request on a kept connection got no answer: the server had closed it."""

    def __init__(self, reason) -> None:
        super().__init__(f"kept connection closed by the server: {reason.value!r}")
        self.reason = reason


class _Fresh:
    """An endpoint whose connections are noted as new (not yet used)."""

    def __init__(self, endpoint, fresh: weakref.WeakSet) -> None:
        self._endpoint = endpoint
        self._fresh = fresh

    def connect(self, factory):
        def made(protocol):
            self._fresh.add(protocol)
            return protocol

        return self._endpoint.connect(factory).addCallback(made)

    def __repr__(self) -> str:
        return repr(self._endpoint)


class _Request:
    """A connection whose failure to answer, if it was a kept one, is KeptConnectionLost."""

    def __init__(self, protocol, lost) -> None:
        self._protocol = protocol
        self._lost = lost

    def request(self, request) -> defer.Deferred:
        return self._protocol.request(request).addErrback(self._lost)


class KeepAlivePool(HTTPConnectionPool):
    """An HTTPConnectionPool keeping ``per_host`` idle connections per endpoint."""

    retryAutomatically = False  # only idempotent requests would be; the sender decides

    def __init__(self, reactor, per_host: int, idle_timeout: float = IDLE_TIMEOUT) -> None:
        super().__init__(reactor, persistent=True)
        self.maxPersistentPerHost = per_host
        self.cachedConnectionTimeout = idle_timeout
        self._fresh: weakref.WeakSet = weakref.WeakSet()
        self._renew: set = set()  # endpoints whose next connection must be new

    def getConnection(self, key, endpoint) -> defer.Deferred:
        fresh = _Fresh(endpoint, self._fresh)
        if key in self._renew:
            # The endpoint closed a kept connection: the others it kept may be closed as
            # well. Closing every kept connection (a rare event, public API only) makes
            # this one new.
            self._renew.discard(key)
            d = self.closeCachedConnections()
            d.addCallback(lambda _: super(KeepAlivePool, self).getConnection(key, fresh))
        else:
            d = super().getConnection(key, fresh)
        return d.addCallback(self._wrap, key)

    def _wrap(self, protocol, key):
        if protocol in self._fresh:  # its first request: a failure is the request's own
            self._fresh.discard(protocol)
            return protocol

        def lost(failure):
            if failure.check(*_LOST) and not _cancelled(failure):
                self._renew.add(key)
                raise KeptConnectionLost(failure)
            return failure

        return _Request(protocol, lost)


def _cancelled(failure) -> bool:
    return any(f.check(defer.CancelledError) for f in getattr(failure.value, "reasons", []))
