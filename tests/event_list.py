"""An IEventSink that keeps the events it is given in a list, for the tests to read: the
sink of a relay whose webhooks would deliver nothing but remember everything."""

from __future__ import annotations

import json

from zope.interface import implementer

from mailrelay.interfaces import IEventSink


@implementer(IEventSink)
class EventList(list):
    """Each event as ``(kind, account, user, data)``; ``data`` must survive JSON, as the
    webhooks send it."""

    def emit(self, kind: str, account: str | None, user: str | None, data: dict) -> None:
        self.append((str(kind), account, user, json.loads(json.dumps(data))))

    def of(self, kind: str) -> list[tuple[str | None, str | None, dict]]:
        """``(account, user, data)`` of the events of ``kind``, in order."""
        return [(account, user, data) for k, account, user, data in self if k == kind]
