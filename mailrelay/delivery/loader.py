"""Reading queued messages for the queue runner, off the reactor, in batches.

A message is read only when it is about to be sent: its envelope, its delivery state and,
when the read-ahead budget has room, its body if that is small (client.SMALL_BODY), so the
reactor neither opens its file nor streams it. The bodies held at once, from the read
until the message is concluded, stay under ``budget`` bytes; a message read without its
body streams it from the file.

Every message asked for in one reactor turn (a group commit concludes many at once) is
read in the next, ``batch`` per trip to the reactor's thread pool. Trips run in parallel
but their results are taken in the order they were asked for, so the first of the
schedule (priority, then age) are the first to be routed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.delivery.client import SMALL_BODY
from mailrelay.model import Envelope
from mailrelay.spool.state import DeliveryState

# The queue runner's lines keep the one namespace the log has always shown for them.
log = Logger(namespace="mailrelay.delivery.manager")


class Loadable(Protocol):
    """What the loader reads for: the queue runner's attempt of one message."""

    queue_id: str
    body: bytes | None  # the body read ahead, or None to stream it from the file
    held: int  # bytes of the budget it holds (SMALL_BODY while being read)


Loaded = Callable[[Loadable, Envelope, DeliveryState | None], None]
Failed = Callable[[Loadable, Failure], None]


class Loader:
    """``loaded`` is called with each message read (its body set on it), ``failed`` with
    each one that could not be (KeyError: no longer queued), in the order they were
    asked for."""

    def __init__(self, spool, reactor, *, loaded: Loaded, failed: Failed, budget: int,
                 batch: int) -> None:
        self.spool = spool
        self.reactor = reactor
        self.budget = budget
        self.batch = batch
        self.preloaded = 0  # bytes of the budget held
        self._loaded = loaded
        self._failed = failed
        self._wanted: list[Loadable] = []
        self._call = None  # the reactor turn's _load, once something is to be read
        self._reading: defer.Deferred = defer.succeed(None)  # the trips' results, in order

    def add(self, item: Loadable) -> None:
        """Read ``item`` in the next reactor turn, its body too if the budget has room."""
        item.held = SMALL_BODY if self.preloaded < self.budget else 0
        self.preloaded += item.held
        self._wanted.append(item)
        if self._call is None:
            self._call = self.reactor.callLater(0, self._load)

    def release(self, item: Loadable) -> None:
        """``item`` is done with: its body leaves the budget."""
        self.preloaded -= item.held
        item.held, item.body = 0, None

    def _load(self) -> None:
        self._call = None
        wanted, self._wanted = self._wanted, []
        for i in range(0, len(wanted), self.batch):
            batch = wanted[i:i + self.batch]
            read = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                             self._read_all,
                                             [(item.queue_id, item.held) for item in batch])
            self._reading.addBoth(lambda _, read=read: read)
            self._reading.addBoth(self._read_done, batch)
            self._reading.addErrback(lambda f: log.failure("cannot route what was read", f))

    def _read_all(self, wanted: list[tuple[str, int]]) -> list:
        """In a thread: _read of each (queue id, limit), or the Failure it raised."""
        results: list = []
        for queue_id, limit in wanted:
            try:
                results.append(self._read(queue_id, limit))
            except Exception:
                results.append(Failure())
        return results

    def _read(self, queue_id: str,
              limit: int) -> tuple[Envelope, DeliveryState | None, bytes | None]:
        """In a thread: the envelope, the state, and the body if it has at most ``limit``
        bytes (else None; 0: not read)."""
        envelope, state = self.spool.envelope(queue_id), self.spool.read_state(queue_id)
        if not limit:
            return envelope, state, None
        with self.spool.open_body(queue_id) as f:
            body = f.read(limit + 1)
        return envelope, state, body if len(body) <= limit else None

    def _read_done(self, results: list | Failure, batch: list[Loadable]) -> None:
        if isinstance(results, Failure):
            results = [results] * len(batch)
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, Failure):
                self._failed(item, result)
                continue
            envelope, state, item.body = result
            size = len(item.body or b"")
            self.preloaded += size - item.held
            item.held = size
            self._loaded(item, envelope, state)
