"""The queue as management sees it: entries and documents (``queue list|show``, the API,
the panel), and retry, flush and delete.

Looking is blocking reading of the spool (the CLI calls it directly, the daemon in a
thread: QueueReader); it never opens the spool, so a running relay is undisturbed. Acting
goes to the running relay over the control socket (control.py), whose QueueControl asks
its delivery process; with no relay running, the CLI acts on the spool itself
(``offline_*``) and the change takes effect when the relay starts.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, threads
from zope.interface import implementer

from mailrelay.control import DeliveryNotRunning, DeliveryOff
from mailrelay.interfaces import IHeldMail, IQueueControl
from mailrelay.model import Envelope, utc_text
from mailrelay.spool.spool import Snapshot, Spool
from mailrelay.spool.state import DeliveryState, RecipientState


def ids(spool: Spool, place: str) -> list[str]:
    """The ids in ``place`` ("queue", in delivery order, or "hold"); none before the
    spool was ever made."""
    try:
        return spool.queued() if place == "queue" else spool.held()
    except FileNotFoundError:
        return []


def entry(spool: Spool, queue_id: str, state: DeliveryState | None,
          now: float) -> tuple[dict[str, Any], Snapshot] | None:
    """A message's line in ``queue list --json``, and what it was read from; None when it
    is not (or no longer) in the spool."""
    try:
        snap = spool.snapshot(queue_id)
    except (KeyError, FileNotFoundError):  # delivered meanwhile
        return None
    envelope, place = snap.envelope, snap.place
    attempts = state.attempts if state else 0
    if place == "hold":
        next_attempt = None
    elif state is None or state.next_attempt is None:
        next_attempt = now
    else:
        next_attempt = state.next_attempt
    held = None
    if place == "hold":
        held = "quota" if envelope.quota_held else "sandbox"
    return {
        "id": queue_id,
        "state": "held" if place == "hold" else "queued",
        # Why it is held: "sandbox" (never delivered) or "quota" (until held_until).
        "held": held,
        "held_until": envelope.held_until if held == "quota" else None,
        "held_quota": envelope.held_quota if held == "quota" else None,
        "priority": envelope.priority,
        "user": envelope.user,
        "account": envelope.account,
        "sender": envelope.sender,
        "recipients": envelope.recipients,
        "pending": state.pending() if state else list(envelope.recipients),
        "size": snap.size,
        "received_at": envelope.received_at,
        "age": max(0.0, now - envelope.received_at),
        "attempts": attempts,
        "next_attempt": next_attempt,
        "last_error": state.last_error if state else "",
    }, snap


def entries(spool: Spool, now: float, limit: int | None = None,
            account: str | None = None) -> tuple[list[dict], int]:  # fmt: skip
    """The first ``limit`` entries, queued (in delivery order) then held, and how many
    messages there are; with ``account``, only that account's messages (each envelope is
    read to know it)."""
    try:
        states = spool.all_states()
    except FileNotFoundError:
        states = {}
    found = ids(spool, "queue") + ids(spool, "hold")
    if account is None:
        shown = (entry(spool, i, states.get(i), now) for i in found[:limit])
        return [e[0] for e in shown if e is not None], len(found)
    mine = [e[0] for e in (entry(spool, i, states.get(i), now) for i in found)
            if e is not None and e[0]["account"] == account]
    return mine[:limit], len(mine)


def state_text(entry: dict[str, Any]) -> str:
    """``queued``, ``held: sandbox`` (never delivered) or ``held: quota until 2026-12-07
    00:00 UTC`` (released then: policy/quotahold.py)."""
    if entry["held"] == "quota":
        return f"held: quota until {utc_text(entry['held_until'])}"
    if entry["held"] == "sandbox":
        return "held: sandbox"
    return entry["state"]


def recipients(envelope: Envelope, state: DeliveryState | None) -> list[dict]:
    states = state.recipients if state else {}
    return [{"address": rcpt, **states.get(rcpt, RecipientState()).to_json()}
            for rcpt in envelope.recipients]


def document(spool: Spool, queue_id: str, now: float) -> dict[str, Any] | None:
    """``queue show --json``: the entry, envelope, delivery state, each recipient's
    status and the header section; None when the message is not in the spool."""
    state = spool.read_state(queue_id)
    found = entry(spool, queue_id, state, now)
    if found is None:
        return None
    doc, snap = found
    return {**doc, "envelope": snap.envelope.to_json(),
            "delivery": state.to_json() if state else None,
            "recipient_status": recipients(snap.envelope, state),
            "headers": snap.headers.decode("utf-8", "replace")}


class QueueReader:
    """The spool as the panel shows it (entries and documents, as above), read through
    ``call``: a thread of the daemon (manage.stores.threaded). Never opens the spool (the
    daemon's Spool service does)."""

    def __init__(self, spool: Spool, clock, call) -> None:
        self.spool = spool
        self.clock = clock
        self.call = call

    def list(self, limit: int = 500, account: str | None = None
             ) -> defer.Deferred[tuple[list[dict], int]]:  # fmt: skip
        """Fires with (entries, total): the first ``limit`` in delivery order, then held
        (only ``account``'s messages when given)."""
        return self.call(entries, self.spool, self.clock.seconds(), limit, account)

    def show(self, queue_id: str) -> defer.Deferred[dict[str, Any] | None]:
        """Fires with the message's document (as ``queue show --json``), or None."""
        return self.call(document, self.spool, queue_id, self.clock.seconds())


@implementer(IQueueControl, IHeldMail)
class QueueControl:
    """The running relay's retry, flush, delete and release, for the panel and the control
    socket.

    ``delivery`` (the DeliveryProcess, or None when ``[delivery] enabled = no``) does them.
    Without delivery, retry and flush fail with DeliveryOff and a delete removes the
    files; so does a delete while the delivery process restarts (the next one lists the
    queue without them).
    """

    def __init__(self, spool: Spool, reactor, delivery=None, holds=None) -> None:
        self.spool = spool
        self.reactor = reactor
        self.delivery = delivery
        self.holds = holds  # policy.quotahold.QuotaRelease: releases mail held over quota

    @property
    def can_retry(self) -> bool:
        """Whether retry and flush can be done (the panel offers them only then)."""
        return self.delivery is not None

    def retry(self, queue_id: str) -> defer.Deferred:
        if self.delivery is None:
            return defer.fail(DeliveryOff("delivery is off in this relay"))
        return self.delivery.retry(queue_id)

    def flush(self) -> defer.Deferred:
        if self.delivery is None:
            return defer.fail(DeliveryOff("delivery is off in this relay"))
        return self.delivery.flush()

    def delete(self, queue_id: str) -> defer.Deferred:
        if self.delivery is None:
            return self._delete_files(queue_id)
        def restarting(failure):
            failure.trap(DeliveryNotRunning)
            return self._delete_files(queue_id)

        return self.delivery.delete(queue_id).addErrback(restarting)

    def release(self, queue_id: str | None = None) -> defer.Deferred:
        """Deliver a message held over its quota now (None: all of them), counted in the
        current period; fires with the ids released (policy/quotahold.py)."""
        if self.holds is None:
            return defer.fail(KeyError(queue_id))
        return self.holds.release(queue_id)

    def _delete_files(self, queue_id: str) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         self.spool.delete, queue_id)


# ---- with no relay running: the spool itself, blocking

def offline_retry(spool: Spool, queue_id: str) -> bool:
    """Make a queued message due now; False when it is not in queue/."""
    if spool.locate(queue_id) != "queue":
        return False
    state = spool.read_state(queue_id)
    if state is not None and state.next_attempt is not None:
        state.next_attempt = time.time()
        spool.write_state(queue_id, state)
    return True


def offline_flush(spool: Spool) -> int:
    """Make every deferred message due now; how many were waiting."""
    now, count = time.time(), 0
    try:
        states = spool.all_states()
    except FileNotFoundError:
        return 0
    for queue_id in ids(spool, "queue"):
        state = states.get(queue_id)
        if state is not None and state.next_attempt is not None and state.next_attempt > now:
            state.next_attempt = now
            spool.write_state(queue_id, state)
            count += 1
    return count
