"""What the spool and delivery call, per message and per recipient; reactor-safe.

Blocking work (SQLite, the archive file, parsing a big message) runs in a thread pool;
statistics are counted in memory by the StatsRecorder. A typical delivery run::

    deliver, suppressed = yield features.filter_recipients(envelope, recipients)
    if features.needs_copies(user):          # footer or tracking on: one copy per recipient
        parsed = yield features.prepare(envelope, data)
        for rcpt in deliver:
            copy = yield features.copy_for(parsed, envelope, rcpt, user)
            ...send copy to rcpt...
    else:
        ...send data once to all of deliver...
    features.result(envelope, rcpt, Event.DELIVERED)   # or DEFERRED, BOUNCED with status
"""

from __future__ import annotations

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailrelay.features.archive import Archive
from mailrelay.features.links import Recipient
from mailrelay.features.personalize import Options, Parsed, Personalizer
from mailrelay.features.stats import Event, StatsRecorder
from mailrelay.features.suppressions import Reason, SuppressionStore
from mailrelay.model import Envelope, SmtpUser

log = Logger()

# Permanent failures that say the address cannot receive mail at all (RFC 3463): worth
# suppressing. Policy refusals (5.7.x) and full mailboxes are not.
HARD_BOUNCE = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"})


class MessageFeatures:
    """``personalizer`` None: footer and tracking off relay-wide (no tracking listener);
    ``archive`` None: no archive. Messages up to ``inline_size`` bytes are personalized
    in the reactor thread (a fraction of a millisecond); bigger ones in the pool."""

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

    def _thread(self, f, *args) -> defer.Deferred:
        pool = self.threadpool or self.reactor.getThreadPool()
        return threads.deferToThreadPool(self.reactor, pool, f, *args)

    # ---- at acceptance (after the spool commit) ----

    def accepted(self, envelope: Envelope, data: bytes, user: SmtpUser) -> defer.Deferred:
        """Count the message and archive a copy when the user has archiving on. Fires
        with None; an archive failure is logged, never passed on (the message is safe in
        the spool)."""
        account = envelope.account or user.account
        self.stats.record(Event.ACCEPTED, account, user.username)
        if envelope.sandboxed:
            self.stats.record(Event.SANDBOXED, account, user.username)
        if not (user.archive and self.archive is not None):
            return defer.succeed(None)
        d = self._thread(
            self.archive.store,
            user.username,
            envelope.id,
            data,
            envelope.sender,
            list(envelope.recipients),
            envelope.received_at,
        )

        def failed(failure) -> None:
            log.failure("archive copy of {queue_id} failed", failure, queue_id=envelope.id)

        return d.addCallbacks(lambda _: None, failed)

    # ---- at delivery ----

    def filter_recipients(
        self, envelope: Envelope, recipients: list[str]
    ) -> defer.Deferred[tuple[list[str], list[str]]]:
        """Fires with ``(to deliver, suppressed)``; suppressed ones are counted and logged
        and must be treated as done (not delivered, not bounced). Errbacks when the list
        cannot be read: treat that as a temporary failure, never as "not suppressed"."""
        if envelope.user is None or envelope.account is None:  # the relay's own bounces
            return defer.succeed((list(recipients), []))
        d = self._thread(self.suppressions.suppressed, envelope.account, envelope.user, recipients)

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

    def needs_copies(self, user: SmtpUser | None) -> bool:
        """True when each recipient must get its own copy (footer or tracking on)."""
        return self.personalizer is not None and user is not None and _options(user).any

    def prepare(self, envelope: Envelope, data: bytes) -> defer.Deferred[Parsed]:
        """Parse a message once for all its recipients (in a thread when big); a message
        that cannot be changed is logged here, once."""
        assert self.personalizer is not None
        if len(data) <= self.inline_size:
            d = defer.succeed(self.personalizer.prepare(data))
        else:
            d = self._thread(self.personalizer.prepare, data)

        def check(parsed: Parsed) -> Parsed:
            if parsed.prepared is None:
                log.info(
                    "{queue_id}: sent without footer/tracking: {reason}",
                    queue_id=envelope.id,
                    reason=parsed.reason,
                )
            return parsed

        return d.addCallback(check)

    def copy_for(
        self, parsed: Parsed, envelope: Envelope, recipient: str, user: SmtpUser
    ) -> defer.Deferred[bytes]:
        """The bytes to send to ``recipient``: the footer and tracking of ``user`` applied,
        or the message unchanged (the reason is logged) when that cannot be done safely."""
        assert self.personalizer is not None
        r = Recipient(envelope.id, envelope.account or user.account, user.username, recipient)
        options = _options(user)
        if len(parsed.raw) <= self.inline_size:
            d = defer.succeed(self.personalizer.for_recipient(parsed, r, options))
        else:
            d = self._thread(self.personalizer.for_recipient, parsed, r, options)

        def done(result) -> bytes:
            if not result.changed and parsed.prepared is not None:
                log.info(
                    "{queue_id}: sent to {recipient} without footer/tracking: {reason}",
                    queue_id=envelope.id,
                    recipient=recipient,
                    reason=result.reason,
                )
            return result.data

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


def _options(user: SmtpUser) -> Options:
    return Options(user.unsubscribe_footer, user.open_tracking, user.click_tracking)
