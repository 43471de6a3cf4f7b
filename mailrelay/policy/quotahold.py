"""Mail held over a quota, and its release.

A user whose ``quota_action`` is ``hold`` is not refused past a quota: its message is
accepted, and the ``250`` says it is held and when it is released; the session puts it
in the spool's ``hold/`` with ``held_until`` (the quota's reset) and ``held_quota`` (which
quota) in its envelope. It counts in no quota then.

QuotaRelease moves such messages into ``queue/`` for delivery:

- by itself, when the UTC day changes (every quota resets at a UTC midnight) and when the
  relay starts (a reset passed while it was down): each message whose ``held_until`` has
  passed counts in the period it is released in, taking a place as a new message would.
  When that period's quota is already full (the user sent more meanwhile, or more
  messages were held than the quota holds) the message stays held until the next reset:
  a release never takes a quota over its limit;
- when an admin asks (``mailrelay-admin queue release``, the API, the panel): the
  message goes at once and counts in the current period even beyond its limit (the
  admin's decision; the counts and warnings show it).

Messages of sandboxed users are in ``hold/`` too and are never released here.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.control import NotQuotaHeld
from mailrelay.interfaces import IHeldMail
from mailrelay.model import Envelope, utc_text
from mailrelay.policy.quota import QuotaExceeded, period_end, period_id

log = Logger()


def quota_held(spool) -> list[Envelope]:
    """Blocking: the envelopes of the messages in hold/ held over a quota, oldest first."""
    out = []
    for queue_id in spool.held():
        try:
            envelope = spool.held_envelope(queue_id)
        except (KeyError, ValueError):  # gone meanwhile, or not a message of ours
            continue
        if envelope.quota_held:
            out.append(envelope)
    return out


@implementer(IHeldMail)
class QuotaRelease(Service):
    """Releases the relay's messages held over a quota (see the module's docstring).

    ``quotas``: the IQuotaCounter (None: quotas off, a release counts nowhere);
    ``directory``: the IDirectory the users' quotas are read from; ``warner``: the
    quotawarn.QuotaWarner told of the thresholds a release crosses (None: nobody);
    ``call(f, *args)``: runs the spool's blocking reads and renames off the reactor
    (a thread of the daemon) and fires with the result."""

    name = "quota-release"

    def __init__(self, spool, quotas, directory, warner, clock, call) -> None:
        self.spool = spool
        self.quotas = quotas
        self.directory = directory
        self.warner = warner
        self.clock = clock
        self.call = call
        self._timer = None
        self._busy: set[str] = set()  # ids being released: the timer and an admin race

    # -- the timer

    def startService(self) -> None:
        super().startService()
        self._timer = self.clock.callLater(0, self._tick)  # what passed while stopped

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _tick(self) -> None:
        self._timer = None
        d = self.release_due()
        d.addErrback(lambda f: log.failure("cannot release the messages held over quota", f))
        d.addBoth(lambda _: self._schedule())

    def _schedule(self) -> None:
        if not self.running:
            return
        now = self.clock.seconds()
        self._timer = self.clock.callLater(period_end("day", period_id("day", now)) - now,
                                           self._tick)

    # -- releasing

    def release_due(self) -> Deferred:
        """Release every message whose quota has reset, counted in the new period; fires
        with the ids released."""
        return ensureDeferred(self._release_due())

    async def _release_due(self) -> list[str]:
        now = self.clock.seconds()
        released = []
        for envelope in await self.call(quota_held, self.spool):
            if envelope.held_until > now:
                continue
            try:
                if await self._release(envelope, force=False):
                    released.append(envelope.id)
            except Exception:  # the directory away, the disk: the next reset tries again
                log.failure("quota: cannot release {queue_id}", queue_id=envelope.id)
        if released:
            log.info("quota: released {count} held messages", count=len(released))
        return released

    def release(self, queue_id: str | None = None) -> Deferred:
        """An admin's release of one message (``queue_id``) or of all held over a quota
        (None), whatever their quotas say; fires with the ids released. KeyError: not in
        hold/; NotQuotaHeld: held for another reason (a sandboxed user's)."""
        return ensureDeferred(self._release_asked(queue_id))

    async def _release_asked(self, queue_id: str | None) -> list[str]:
        if queue_id is None:
            envelopes = await self.call(quota_held, self.spool)
        else:
            envelope = await self.call(self.spool.held_envelope, queue_id)
            if not envelope.quota_held:
                raise NotQuotaHeld(f"{queue_id} is held because its user is sandboxed: it "
                                   "is never delivered")
            envelopes = [envelope]
        released = []
        for envelope in envelopes:
            try:
                if await self._release(envelope, force=True):
                    released.append(envelope.id)
            except KeyError:
                if queue_id is not None:
                    raise
                # Of all of them, one deleted (or released) meanwhile: the others go on.
        return released

    async def _release(self, envelope: Envelope, force: bool) -> bool:
        if envelope.id in self._busy:
            return False
        self._busy.add(envelope.id)
        try:
            return await self._move(envelope, force)
        finally:
            self._busy.discard(envelope.id)

    async def _move(self, envelope: Envelope, force: bool) -> bool:
        user = await self.directory.getUser(envelope.user) if envelope.user else None
        if user is None and not force:
            log.warn("quota: {queue_id} stays held: its user {user} is unknown; release or "
                     "delete it (mailrelay-admin queue)", queue_id=envelope.id,
                     user=envelope.user)
            return False
        account = await self.directory.getAccount(user.account) if user is not None else None
        counting = self.quotas is not None and user is not None
        place = None
        if counting and not force:
            try:
                place = await maybeDeferred(self.quotas.reserve, user, account)
            except QuotaExceeded as full:
                self._warn(account, user, [full.crossing] if full.crossing else [])
                log.info("quota: {queue_id} stays held: the {quota} is full, until "
                         "{until}", queue_id=envelope.id, quota=full.quota.describe(),
                         until=utc_text(full.resets))
                return False
        try:
            await self.call(self.spool.release, envelope.id)
        except BaseException:
            if place is not None:
                place.release()
            raise
        self.spool.announce(envelope)
        if counting:
            counted = place.commit() if place is not None else self.quotas.count(user, account)
            self._warn(account, user, await maybeDeferred(lambda: counted))
        log.info("quota: released {queue_id} of {user}{how}", queue_id=envelope.id,
                 user=envelope.user, how=" (asked by an admin)" if force else "")
        return True

    def _warn(self, account, user, crossings) -> None:
        if crossings and self.warner is not None:
            self.warner.warn(account, user.username, crossings, user.quota_action == "hold")
