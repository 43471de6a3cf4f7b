"""What the session and delivery call, per message and per recipient; reactor-safe.

Blocking work (SQLite, the archive file, reading and parsing a message) runs in a thread
pool; statistics are counted in memory by the StatsRecorder. A delivery attempt::

    deliver, suppressed = yield features.filter_recipients(envelope, recipients)
    if features.needs_copies(envelope):      # footer or tracking on: one copy per recipient
        parsed = yield features.prepare(envelope, open_body)
        for rcpt in deliver (audit BCC recipients excepted: they get the original):
            copy = yield features.copy_for(parsed, envelope, rcpt)
            ...send copy.open() to rcpt...
    else:
        ...send the spooled body once to all of deliver...
    features.result(envelope, rcpt, Event.DELIVERED)   # or DEFERRED, BOUNCED with status
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailrelay.features.archive import Archive
from mailrelay.features.batch import Coalescing
from mailrelay.features.copy import Copy
from mailrelay.features.links import Recipient
from mailrelay.features.personalize import Options, Parsed, Personalizer
from mailrelay.features.stats import Event, StatsRecorder
from mailrelay.features.suppressions import Reason, SuppressionStore
from mailrelay.model import Envelope, SmtpUser

log = Logger()

# Permanent failures that say the address cannot receive mail at all (RFC 3463): worth
# suppressing. Policy refusals (5.7.x) and full mailboxes are not.
HARD_BOUNCE = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"})

OpenBody = Callable[[], BinaryIO]  # the spooled message, positioned at its body


class MessageFeatures:
    """``personalizer`` None: footer and tracking off relay-wide (no tracking listener:
    messages go out unchanged, logged once per user); ``archive`` None: no archive.
    Copies of messages up to ``inline_size`` bytes are made in the reactor thread (a
    fraction of a millisecond); bigger ones in the pool."""

    def __init__(
        self,
        reactor,
        suppressions: SuppressionStore,
        stats: StatsRecorder,
        personalizer: Personalizer | None = None,
        archive: Archive | None = None,
        threadpool=None,
        inline_size: int = 256 * 1024,
    ) -> None:
        self.reactor = reactor
        self.suppressions = suppressions
        self.stats = stats
        self.personalizer = personalizer
        self.archive = archive
        self.threadpool = threadpool
        self.inline_size = inline_size
        self._warned: set[str] = set()  # users told about footer/tracking being off
        self._suppressed = Coalescing(suppressions.suppressed, self._thread)

    def _thread(self, f, *args) -> defer.Deferred:
        pool = self.threadpool or self.reactor.getThreadPool()
        return threads.deferToThreadPool(self.reactor, pool, f, *args)

    # ---- in the session ----

    def accepted(self, envelope: Envelope, user: SmtpUser, open_body: OpenBody) -> defer.Deferred:
        """The message is durable in the spool: count it, and archive a copy when the
        user has archiving on. ``open_body`` is called at once, before delivery can remove
        the message; the body is read in a thread. Fires with None; an archive failure is
        logged, never passed on (the message is safe in the spool)."""
        account = envelope.account or user.account
        self.stats.record(Event.ACCEPTED, account, user.username)
        if envelope.sandboxed:
            self.stats.record(Event.SANDBOXED, account, user.username)
        if not (user.archive and self.archive is not None):
            return defer.succeed(None)
        try:
            body = open_body()
        except (OSError, KeyError):
            log.failure("archive copy of {queue_id} failed", queue_id=envelope.id)
            return defer.succeed(None)

        def store() -> str:
            with body:
                data = body.read()
            return self.archive.store(
                user.username,
                envelope.id,
                data,
                envelope.sender,
                list(envelope.recipients),
                envelope.received_at,
            )

        def failed(failure) -> None:
            log.failure("archive copy of {queue_id} failed", failure, queue_id=envelope.id)

        return self._thread(store).addCallbacks(lambda _: None, failed)

    def rejected(self, user: SmtpUser) -> None:
        """The session refused a message or sender of ``user``."""
        self.stats.record(Event.REJECTED, user.account, user.username)

    # ---- at delivery ----

    def filter_recipients(
        self, envelope: Envelope, recipients: list[str]
    ) -> defer.Deferred[tuple[list[str], list[str]]]:
        """Fires with ``(to deliver, suppressed)``; suppressed ones are counted and logged
        and must be treated as done (not delivered, not bounced). Errbacks when the list
        cannot be read: treat that as a temporary failure, never as "not suppressed"."""
        if envelope.user is None or envelope.account is None:  # the relay's own bounces
            return defer.succeed((list(recipients), []))
        if getattr(self.suppressions, "loaded", False):  # in memory (postgres/suppressions.py)
            d = defer.succeed(self.suppressions.suppressed(envelope.account, envelope.user,
                                                           recipients))
        else:
            d = self._suppressed(envelope.account, envelope.user, recipients)

        def split(suppressed: set[str]) -> tuple[list[str], list[str]]:
            for rcpt in recipients:
                if rcpt in suppressed:
                    log.info(
                        "{queue_id}: {recipient} is suppressed for {user}, not delivered",
                        queue_id=envelope.id,
                        recipient=rcpt,
                        user=envelope.user,
                    )
                    self.stats.record(Event.SUPPRESSED, envelope.account, envelope.user)
            return [r for r in recipients if r not in suppressed], [
                r for r in recipients if r in suppressed
            ]

        return d.addCallback(split)

    def needs_copies(self, envelope: Envelope) -> bool:
        """True when each recipient must get its own copy (footer or tracking on)."""
        if not envelope.personalize or envelope.user is None:
            return False
        if self.personalizer is None:
            if envelope.user not in self._warned:
                self._warned.add(envelope.user)
                log.warn(
                    "user {user} has {features} on but [tracking] is disabled: "
                    "their mail is sent without footer and tracking",
                    user=envelope.user,
                    features=", ".join(envelope.personalize),
                )
            return False
        return True

    def prepare(self, envelope: Envelope, open_body: OpenBody) -> defer.Deferred[Parsed]:
        """Read and parse a message once for all its recipients, in a thread; a message
        that cannot be changed is logged here, once."""
        assert self.personalizer is not None

        def read_and_parse() -> Parsed:
            with open_body() as body:
                return self.personalizer.prepare(body.read())

        def check(parsed: Parsed) -> Parsed:
            if parsed.prepared is None:
                log.info(
                    "{queue_id}: sent without footer/tracking: {reason}",
                    queue_id=envelope.id,
                    reason=parsed.reason,
                )
            return parsed

        return self._thread(read_and_parse).addCallback(check)

    def copy_for(self, parsed: Parsed, envelope: Envelope, recipient: str) -> defer.Deferred[Copy]:
        """What to send to ``recipient``: the footer and tracking of the envelope applied,
        or the message unchanged (the reason is logged) when that cannot be done safely."""
        assert self.personalizer is not None and envelope.user is not None
        r = Recipient(envelope.id, envelope.account or "", envelope.user, recipient)
        options = _options(envelope)
        if len(parsed.raw) <= self.inline_size:
            d = defer.succeed(self.personalizer.copy(parsed, r, options))
        else:
            d = self._thread(self.personalizer.copy, parsed, r, options)

        def done(copy: Copy) -> Copy:
            if not copy.changed and parsed.prepared is not None:
                log.info(
                    "{queue_id}: sent to {recipient} without footer/tracking: {reason}",
                    queue_id=envelope.id,
                    recipient=recipient,
                    reason=copy.reason,
                )
            return copy

        return d.addCallback(done)

    def result(
        self, envelope: Envelope, recipient: str, event: Event, status: str | None = None
    ) -> defer.Deferred:
        """Count a delivery result (DELIVERED, DEFERRED or BOUNCED, with the enhanced status
        of a bounce); a hard bounce puts the recipient on the user's suppression list."""
        if envelope.user is None or envelope.account is None:
            return defer.succeed(None)
        self.stats.record(event, envelope.account, envelope.user)
        if event is not Event.BOUNCED or status not in HARD_BOUNCE:
            return defer.succeed(None)
        d = self._thread(
            self.suppressions.add,
            recipient,
            envelope.account,
            envelope.user,
            Reason.HARD_BOUNCE,
        )

        def failed(failure) -> None:
            log.failure("suppressing {recipient} failed", failure, recipient=recipient)

        return d.addCallbacks(lambda _: None, failed)


def _options(envelope: Envelope) -> Options:
    on = set(envelope.personalize)
    return Options("footer" in on, "opens" in on, "clicks" in on)
