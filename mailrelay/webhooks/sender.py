"""Sends the outbox (store.py) to the endpoints: a service of the delivery process
(service.make_delivery_worker), not of the relay, so that its requests take none of the
CPU that SMTP sessions need; the relay restarts that process, and the new one goes on
from the outbox.

Every ``poll_interval`` it takes what is due (at most ``concurrency`` requests at a time)
and, while a look finds more than it has room for, looks again as soon as half its
requests are answered instead of waiting for the next tick (a backlog is not held to
``concurrency`` events a ``poll_interval``); it POSTs each body, signed (signing.py),
through an Agent whose connections reach only allowed addresses (targetcheck.py) and are
kept open between requests (keepalive.py);
``timeout`` bounds a request from connecting to the end of the answer. The answer decides:

- 2xx: sent (the row goes);
- 5xx, 408, 429, a timeout, a connection that fails: tried again after the next of
  ``retry_delays`` (5s, 5m, 30m, 2h, 5h by default: about 8 hours), failed after the last;
- 410 Gone: the endpoint is disabled, its pending events fail, and the account's
  notification address is told by mail;
- anything else (other 4xx, 3xx: redirects are not followed, a refused target): failed
  at once.

Failed rows wait in the failed-events view (mailrelay-admin webhook failed, the API, the
panel) until sent again by hand or pruned after ``failed_retention``. Answers are
recorded together: those that come while one transaction is written go in the next
(features/batch.py), and a row goes only once its 2xx is written. A row being sent when
the delivery process stops (or dies), or answered 2xx but not yet recorded, is still
pending and is sent again: an endpoint may see an event twice, with the same
``webhook-id``.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO

from twisted.application.service import Service
from twisted.internet import defer, protocol, task
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from mailrelay.features.batch import Coalescing
from mailrelay.metrics import NO_METRICS
from mailrelay.webhooks import signing
from mailrelay.webhooks.keepalive import KeepAlivePool, KeptConnectionLost
from mailrelay.webhooks.store import FAILED, PENDING, Delivery, Endpoint, WebhookStore
from mailrelay.webhooks.targetcheck import CheckedEndpoints, TargetRefused

log = Logger()

DEFAULT_DELAYS = (5.0, 300.0, 1800.0, 7200.0, 18000.0)
SENT, RETRY, PERMANENT, GONE = "sent", "retry", "permanent", "gone"
MAX_SNIPPET = 200  # bytes of an error answer kept with the row


def classify(status: int | None) -> str:
    """What an answer means; None: no answer (timeout, connection failed)."""
    if status is None or status >= 500 or status in (408, 429):
        return RETRY
    if 200 <= status < 300:
        return SENT
    if status == 410:
        return GONE
    return PERMANENT


class _Snippet(protocol.Protocol):
    """Reads the start of an answer's body and drops the rest; ``done`` fires with it
    (cancelled: the connection is closed)."""

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred(self._abort)
        self.data = b""

    def _abort(self, _) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < MAX_SNIPPET:
            self.data += data[:MAX_SNIPPET - len(self.data)]

    def connectionLost(self, reason=None) -> None:
        if not self.done.called:
            self.done.callback(self.data)


class WebhookSender(Service):
    """``call`` runs the store's blocking methods (a thread); ``gone(account, endpoint)``
    tells an account its endpoint answered 410 and is disabled; ``metrics`` (IMetrics)
    counts each request's outcome."""

    name = "webhooks"

    def __init__(self, store: WebhookStore, call, reactor, *, allowed=(),
                 retry_delays=DEFAULT_DELAYS, timeout: float = 10.0,
                 poll_interval: float = 1.0, concurrency: int = 10,
                 failed_retention: float = 30 * 86400.0,
                 gone: Callable[[str, Endpoint], object] | None = None,
                 agent=None, metrics=NO_METRICS) -> None:  # fmt: skip
        self.store = store
        self.call = call
        self.reactor = reactor
        self.retry_delays = tuple(retry_delays)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.failed_retention = failed_retention
        self.gone = gone
        self.metrics = metrics  # IMetrics: each outcome counted
        self.pool = KeepAlivePool(reactor, per_host=concurrency)
        self.agent = agent or Agent.usingEndpointFactory(
            reactor, CheckedEndpoints(reactor, tuple(allowed), timeout), self.pool)
        # Answers are recorded together: one transaction for those that come while one
        # is written (features/batch.py). A row goes only once its 2xx is written, and
        # stays busy (not sent again) until its outcome is.
        self._record_outcome = Coalescing(store.record, lambda g: self.call(g), many=True)
        self._busy: dict[int, defer.Deferred] = {}
        self._polling: defer.Deferred | None = None
        self._more = False  # the last look filled its room: more may be due now
        self._loop: task.LoopingCall | None = None
        self._prune: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True).addErrback(
            lambda f: log.failure("webhook sender stopped", f))
        self._prune = task.LoopingCall(self._pruning)
        self._prune.clock = self.reactor
        self._prune.start(3600.0, now=True).addErrback(
            lambda f: log.failure("webhook pruning stopped", f))

    def stopService(self):
        super().stopService()
        for loop in (self._loop, self._prune):
            if loop is not None and loop.running:
                loop.stop()
        for d in list(self._busy.values()):  # still pending in the file: sent after restart
            d.cancel()
        waiting = [d for d in [self._polling] if d is not None]
        waiting.append(self.pool.closeCachedConnections())
        return defer.DeferredList(waiting, consumeErrors=True)

    def poll(self) -> defer.Deferred | None:
        """Send what is due (one look at a time)."""
        if self._polling is not None or not self.running:
            return None
        room = self.concurrency - len(self._busy)
        if room <= 0:
            return None
        d = self.call(self.store.due, self.reactor.seconds(), room, set(self._busy))
        d.addCallback(self._start, room)
        d.addErrback(lambda f: log.failure("cannot read the webhook outbox", f))

        def done(_):
            self._polling = None

        d.addBoth(done)
        self._polling = d
        return d

    def _start(self, due: list[tuple[Delivery, Endpoint]], room: int) -> None:
        self._more = len(due) >= room
        for delivery, endpoint in due:
            if not self.running:
                return
            d = defer.ensureDeferred(self.send(delivery, endpoint))
            self._busy[delivery.id] = d
            d.addErrback(lambda f: f.trap(defer.CancelledError))
            d.addErrback(lambda f: log.failure("webhook delivery failed", f))
            d.addBoth(self._answered, delivery.id)

    def _answered(self, _, delivery_id: int) -> None:
        self._busy.pop(delivery_id, None)
        # Half the room free again and more due: look now rather than at the next tick.
        if self._more and len(self._busy) <= self.concurrency // 2:
            self.poll()

    async def send(self, delivery: Delivery, endpoint: Endpoint) -> str:
        """One attempt and its outcome recorded; the outcome (classify's)."""
        status, error = None, ""
        d = self._post(delivery, endpoint)
        expired: list[bool] = []
        timer = self.reactor.callLater(self.timeout, lambda: expired.append(True) or d.cancel())
        try:
            status, snippet = await d
            if not 200 <= status < 300:
                error = f"HTTP {status}: {snippet.decode('utf-8', 'replace').strip()}"
        except TargetRefused as e:
            return await self._record(delivery, endpoint, PERMANENT, None, str(e.osError or e))
        except Exception as e:
            if not expired and not self.running:  # the process stops: sent after restart
                raise defer.CancelledError()
            if expired:
                error = f"timed out after {self.timeout:g}s"
            elif isinstance(e, ConnectError):
                error = f"cannot connect: {e.osError or e}"
            else:
                error = f"{type(e).__name__}: {e}"
        finally:
            if timer.active():
                timer.cancel()
        return await self._record(delivery, endpoint, classify(status), status, error)

    def _post(self, delivery: Delivery, endpoint: Endpoint) -> defer.Deferred:
        """The request; sent again at once, on a new connection, if a kept connection
        was closed by the endpoint under it (keepalive.py)."""

        def again(failure):
            failure.trap(KeptConnectionLost)
            log.debug("webhook {id} to {url}: {why}; sent again on a new connection",
                      id=delivery.event_id, url=endpoint.url, why=failure.value)
            return self._request(delivery, endpoint)

        return self._request(delivery, endpoint).addErrback(again)

    def _request(self, delivery: Delivery, endpoint: Endpoint) -> defer.Deferred:
        now = int(self.reactor.seconds())
        secrets = endpoint.active_secrets(now)
        headers = Headers({b"content-type": [b"application/json"],
                           b"user-agent": [b"mailrelay-webhooks"]})
        for name, value in signing.headers(secrets, delivery.event_id, now,
                                           delivery.body).items():
            headers.addRawHeader(name.encode(), value.encode())
        d = self.agent.request(b"POST", endpoint.url.encode(), headers,
                               FileBodyProducer(BytesIO(delivery.body)))

        def answered(response):
            snippet = _Snippet()
            response.deliverBody(snippet)
            return snippet.done.addCallback(lambda data: (response.code, data))

        return d.addCallback(answered)

    async def _record(self, delivery: Delivery, endpoint: Endpoint, outcome: str,
                      status: int | None, error: str) -> str:  # fmt: skip
        now = self.reactor.seconds()
        where = dict(id=delivery.event_id, kind=delivery.kind, url=endpoint.url)
        if outcome == SENT:
            await self._record_outcome(delivery.id, None, now, status, error)
            self.metrics.webhook("sent")
            log.info("webhook {id} ({kind}) sent to {url}: {status}", status=status, **where)
            return outcome
        if outcome == RETRY and delivery.attempts < len(self.retry_delays):
            delay = self.retry_delays[delivery.attempts]
            await self._record_outcome(delivery.id, PENDING, now + delay, status, error)
            self.metrics.webhook("retried")
            log.info("webhook {id} ({kind}) to {url}: {error}; again in {delay:g}s",
                     error=error, delay=delay, **where)
            return outcome
        await self._record_outcome(delivery.id, FAILED, now, status, error)
        self.metrics.webhook("failed")
        log.warn("webhook {id} ({kind}) to {url} failed: {error}", error=error, **where)
        if outcome == GONE:
            reason = f"answered 410 Gone ({error})"
            if await self.call(self.store.set_enabled, endpoint.id, None, False, reason):
                log.warn("webhook endpoint {endpoint} of {account} ({url}) disabled: {why}",
                         endpoint=endpoint.id, account=endpoint.account, url=endpoint.url,
                         why=reason)
                if self.gone is not None:
                    await defer.maybeDeferred(self.gone, endpoint.account, endpoint)
        return outcome

    async def _pruning(self) -> None:
        try:
            await self.call(self.store.prune, self.reactor.seconds() - self.failed_retention)
        except Exception:
            log.failure("cannot prune failed webhook events")
