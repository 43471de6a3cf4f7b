"""The relay's IEventSink with webhooks on: each event becomes a JSON body at once and is
appended to the outbox (store.py) in batches, in a thread, one row per endpoint of the
event's account that wants it (its users, its kinds).

The relay and its delivery process each have one, writing to the same file; only the
delivery process sends (sender.py). A batch is written every ``interval`` seconds
(``[webhooks] flush_interval``, 0.1 s by default) and when the process stops: a ``kill
-9`` loses the events of the last interval at most, and what is in the file survives it
(WAL). Events
without an account (a refusal before any login) have no endpoint and are dropped here.

The body, as every endpoint gets it::

    {"id": "evt_...", "type": "message.delivered", "timestamp": "2026-12-06T10:00:00.123Z",
     "data": {"account": ..., "user": ..., "auth_method": ..., "queue_id": ...,
              "recipient": ..., "remote_reply": ..., <what else the event carries>}}

``auth_method``, ``queue_id``, ``recipient`` and ``remote_reply`` are taken from the data
the event was emitted with under those names (null when it has none).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from datetime import UTC, datetime

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.flushing import BatchWriter
from mailrelay.interfaces import IEventSink
from mailrelay.webhooks.store import Event, WebhookStore

log = Logger()

COMMON = ("auth_method", "queue_id", "recipient", "remote_reply")
MAX_PENDING = 100_000  # events held while the file cannot be written; the oldest go first


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def new_event_id() -> str:
    """Unique and ordered by time, so that ids sort as events happened."""
    return f"evt_{time.time_ns() // 1000:016x}{os.urandom(6).hex()}"


def event_body(event_id: str, kind: str, account: str, user: str | None, data: dict,
               when: float) -> bytes:  # fmt: skip
    fields = {"account": account, "user": user, **{k: data.get(k) for k in COMMON}}
    fields.update((k, v) for k, v in data.items() if k not in fields)
    doc = {"id": event_id, "type": str(kind), "timestamp": rfc3339(when), "data": fields}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), default=str).encode()


@implementer(IEventSink)
class WebhookSink(BatchWriter):
    what = "webhook events"

    def __init__(self, store: WebhookStore, reactor, interval: float = 0.1, clock=None,
                 max_pending: int = MAX_PENDING) -> None:  # fmt: skip
        super().__init__(reactor, clock, interval)
        self.store = store
        self._pending: deque[Event] = deque()
        self.max_pending = max_pending

    def emit(self, kind: str, account: str | None, user: str | None, data: dict) -> None:
        if account is None:
            return
        try:
            now = self._clock.seconds()
            event_id = new_event_id()
            body = event_body(event_id, kind, account, user, data, now)
            self._pending.append(Event(event_id, account, user, str(kind), body, now))
            if len(self._pending) > self.max_pending:
                dropped = self._pending.popleft()
                log.warn("webhook event {id} ({kind}) dropped: {n} events wait to be "
                         "written", id=dropped.id, kind=dropped.kind, n=self.max_pending)
        except Exception:
            log.failure("webhook event {kind} for {account} not kept", kind=str(kind),
                        account=account)

    def _take(self) -> list[Event] | None:
        if not self._pending:
            return None
        batch, self._pending = list(self._pending), deque()
        return batch

    def _write(self, batch: list[Event]) -> None:
        self.store.append(batch)

    def _put_back(self, batch: list[Event]) -> None:
        self._pending.extendleft(reversed(batch))
        while len(self._pending) > self.max_pending:
            self._pending.popleft()
