"""What a report that came back to a VERP address does, through the features that exist.

- a DSN with Action ``failed``: counted as ``bounced`` for the sending user; a hard bounce
  (features/hooks.py HARD_BOUNCE, as at delivery) puts the recipient on the user's
  suppression list; the user gets a bounce notification;
- a DSN with Action ``delayed``: counted as ``deferred``, nothing else;
- an ARF complaint (abuse, fraud, virus): counted as ``complaints``, the recipient goes
  on the user's suppression list (reason ``complaint``);
- anything else (an auto-reply, a success DSN, a bounce in free text): logged, dropped.

Each of the first three is reported too (mailrelay/events.py): ``message.bounced``,
``message.deferred`` (``source``: ``dsn``) and ``message.complained``.

The recipient is the one the VERP token names (authenticated, and looked up in the
return-path store), not whatever the report says: a report can only act on the address
the relay really sent to. The notification is the relay's own DSN (delivery/dsn.py), from
the null sender to where the user's bounces went when the message was accepted
(``bounce_notify``: the client's envelope sender by default, another address, or none),
with the client's envelope sender written back wherever the VERP address was in the
returned headers. Nothing is delivered onward and the report itself is
not kept: each effect is made durable (the suppression row, the notification in the
spool) before the listener answers 250, and a failure answers 451 so that the remote
server tries again.
"""

from __future__ import annotations

import re

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailrelay import events
from mailrelay.bounces.parse import RecipientReport, Report, parse
from mailrelay.bounces.store import ReturnPath, ReturnPathStore
from mailrelay.bounces.verp import PREFIX, Token
from mailrelay.delivery import dsn
from mailrelay.events import NO_EVENTS, EventKind
from mailrelay.features.hooks import HARD_BOUNCE
from mailrelay.features.stats import Event
from mailrelay.features.suppressions import Reason
from mailrelay.model import Envelope
from mailrelay.spool.queueid import time_of
from mailrelay.spool.state import RecipientState, RecipientStatus
from mailrelay.text import printable

log = Logger()


class BounceFeed:
    def __init__(self, reactor, features, spool, store: ReturnPathStore, hostname: str,
                 postmaster: str, events=NO_EVENTS) -> None:
        self.reactor = reactor
        self.features = features  # features.hooks.MessageFeatures: its stores
        self.spool = spool
        self.store = store
        self.hostname = hostname
        self.postmaster = postmaster
        self.events = events  # IEventSink

    def _thread(self, f, *args) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    async def received(self, tokens: list[Token], data: bytes) -> None:
        """A message for ``tokens`` (RCPTs that passed); raises when an effect could not
        be made durable (the listener then answers 451)."""
        report = await self._thread(parse, data)
        for token in tokens:
            path = await self._thread(self.store.resolve, token)
            if path is None:
                log.info("bounces: a report about {queue_id} dropped: no record of it (older "
                         "than [bounces] retention?)", queue_id=token.queue_id)
                continue
            await self._apply(path, report)

    async def _apply(self, path: ReturnPath, report: Report) -> None:
        what = {"queue_id": path.queue_id, "recipient": path.recipient, "user": path.user}
        if report.kind == "complaint":
            self.features.stats.record(Event.COMPLAINTS, path.account, path.user)
            await self._suppress(path, Reason.COMPLAINT)
            self._emit(EventKind.COMPLAINED, path,
                       {"feedback_type": report.feedback_type or None})
            log.info("{queue_id}: complaint ({type}) from <{recipient}> for {user}: "
                     "suppressed", type=printable(report.feedback_type or ""), **what)
            return
        if report.kind not in ("failed", "delayed"):
            log.info("{queue_id}: message to the return path of <{recipient}> for {user} "
                     "discarded: {why}", why=report.reason or f"a {report.kind} report",
                     **what)
            return
        block = _block(report, path.recipient)
        if report.kind == "delayed":
            self.features.stats.record(Event.DEFERRED, path.account, path.user)
            self._emit(EventKind.DEFERRED, path, _reported(block))
            log.info("{queue_id}: delayed at {remote} for <{recipient}> ({user}): {status}",
                     remote=printable(block.remote or "-"), status=block.status, **what)
            return
        self.features.stats.record(Event.BOUNCED, path.account, path.user)
        hard = block.status in HARD_BOUNCE
        if hard:
            await self._suppress(path, Reason.HARD_BOUNCE)
        log.info("{queue_id}: bounced by {remote} for <{recipient}> ({user}): {status} "
                 "{diagnostic}{suppressed}", remote=printable(block.remote or "-"),
                 status=block.status, diagnostic=printable(block.diagnostic, 500),
                 suppressed="; suppressed" if hard else "", **what)
        await self._notify(path, block, report.headers)
        # Last, once every effect is durable: a failure before it gets the report again.
        self._emit(EventKind.BOUNCED, path, {**_reported(block),
                                             "bounce": "hard" if hard else "soft"})

    def _emit(self, kind: EventKind, path: ReturnPath, data: dict) -> None:
        self.events.emit(kind, path.account, path.user, events.known(
            {"queue_id": path.queue_id, "sender": path.sender, "recipient": path.recipient},
            data))

    async def _suppress(self, path: ReturnPath, reason: Reason) -> None:
        await self._thread(self.features.suppressions.add, path.recipient, path.account,
                           path.user, reason)

    async def _notify(self, path: ReturnPath, block: RecipientReport, headers: bytes) -> None:
        now = self.reactor.seconds()
        envelope = Envelope(id=path.queue_id, sender=path.sender, recipients=[path.recipient],
                            user=path.user, account=path.account, client_ip=None, helo=None,
                            tls=False, received_at=time_of(path.queue_id),
                            bounce_to=path.bounce_to)
        to = dsn.notify_address(envelope)
        if to is None:
            log.info("{queue_id}: no bounce for <{recipient}> (notifications off for {user})",
                     queue_id=path.queue_id, recipient=path.recipient, user=path.user)
            return
        state = RecipientState(RecipientStatus.FAILED, block.code, _reply_text(block),
                               block.remote)
        data = dsn.build(envelope=envelope, recipients=[(path.recipient, state)],
                         action="failed", headers=restore_sender(headers, path),
                         hostname=self.hostname, postmaster=self.postmaster, to=to, now=now)
        notice = Envelope(id="", sender="", recipients=[to], user=None, account=path.account,
                          client_ip=None, helo=None, tls=False, received_at=now, priority=2)
        new_id = await self.spool.submit(notice, data)
        log.info("{queue_id}: bounce {dsn_id} queued for <{to}>", queue_id=path.queue_id,
                 dsn_id=new_id, to=to)


def _block(report: Report, recipient: str) -> RecipientReport:
    """The recipient block about ``recipient`` (the first of the report's kind if none
    names it: forwarding may have changed the address)."""
    wanted = [r for r in report.recipients if r.action == report.kind]
    for block in wanted:
        if (block.recipient or "").lower() == recipient.lower():
            return block
    return wanted[0]


def _reported(block: RecipientReport) -> dict:
    """The delivery fields of what a DSN says of a recipient (source ``dsn``)."""
    return {**events.next_hop_reply(block.code, _reply_text(block)),
            "remote": block.remote, "source": "dsn"}


def _reply_text(block: RecipientReport) -> str:
    """The remote reply as delivery keeps one: the text after the code, starting with the
    enhanced status (``5.1.1 <bob@example.net>: Recipient address rejected``)."""
    text = re.sub(r"^[245]\d\d[\s-]+", "", block.diagnostic)
    return text if text.startswith(block.status + " ") else f"{block.status} {text}".strip()


def restore_sender(headers: bytes, path: ReturnPath) -> bytes:
    """The returned headers with the VERP address (Return-Path, Received ... envelope-from)
    written back to the client's envelope sender, which is what the user sent with."""
    verp = re.compile(re.escape(PREFIX.encode()) + rb"[a-z2-7]+@"
                      + re.escape(path.domain.encode()), re.IGNORECASE)
    sender = path.sender.encode("utf-8", "replace")
    return verp.sub(lambda _: sender, headers)
