"""What the API and the web page read off the reactor thread: QueueReader looks at the
spool with manage.queue's blocking readers, in a thread. (Users and accounts: the
IUserStore of manage.stores.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads

from mailrelay.manage import queue as manage_queue

T = TypeVar("T")


def in_thread(reactor, f: Callable[..., T], *args: Any, **kwargs: Any):
    """Run blocking ``f`` in the reactor's thread pool; a Deferred of its result."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)


class QueueReader:
    """The spool as the panel shows it, in the JSON of ``mailrelay-admin queue list|show
    --json`` (manage.queue makes both), read in a thread. Never opens the spool (the
    daemon's Spool service does)."""

    def __init__(self, spool, reactor) -> None:
        self.spool = spool
        self.reactor = reactor

    def list(self, limit: int = 500):
        """Fires with (entries, total): the first ``limit`` in delivery order, then held."""
        return in_thread(self.reactor, manage_queue.entries, self.spool,
                         self.reactor.seconds(), limit)

    def show(self, queue_id: str):
        """Fires with the message's document (as ``queue show --json``), or None."""
        return in_thread(self.reactor, manage_queue.document, self.spool, queue_id,
                         self.reactor.seconds())


