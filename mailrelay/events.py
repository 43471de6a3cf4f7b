"""The kinds of event the relay reports (IEventSink), as accounts see them in webhooks.

Places that see something happen call ``events.emit(kind, account, user, data)`` on the
IEventSink they were given; ``NO_EVENTS`` is the sink of a relay without webhooks.
"""

from __future__ import annotations

import enum

from zope.interface import implementer

from mailrelay.interfaces import IEventSink


class EventKind(enum.StrEnum):
    PROCESSED = "message.processed"  # accepted and spooled
    DELIVERED = "message.delivered"
    DEFERRED = "message.deferred"
    BOUNCED = "message.bounced"  # data["bounce"]: "hard" or "soft"
    REJECTED = "message.rejected"  # refused at submission, with the reply
    SUPPRESSED = "message.suppressed"
    OPENED = "message.opened"
    CLICKED = "message.clicked"
    UNSUBSCRIBED = "message.unsubscribed"
    COMPLAINED = "message.complained"
    QUOTA_APPROACHING = "quota.approaching"  # data["percent"]: 80 or 90
    QUOTA_EXCEEDED = "quota.exceeded"
    CREDENTIAL_DISABLED = "credential.disabled"


@implementer(IEventSink)
class NoEvents:
    """Drops every event."""

    def emit(self, kind: str, account: str | None, user: str | None, data: dict) -> None:
        pass


NO_EVENTS = NoEvents()
