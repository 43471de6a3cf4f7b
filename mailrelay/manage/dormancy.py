"""Dormant users: with ``[policy] dormant_after`` set, a user that has not logged in for
that long is disabled (status ``blocked``: its mail is refused), once, with a log line,
a notice to its account's notification address and a ``credential.disabled`` event
(mailrelay/events.py; ``reason``: ``dormant``).

A user that never logged in counts from its last change, and so does one changed since its
last login: an administrator who sets a disabled user back to ``allowed`` gives it a new
``dormant_after`` to log in. Only the users file can be changed so; with LDAP the relay
logs each dormant user once and leaves it to the directory's administrator.

With ``[cluster] postgres`` the users and last logins are every node's, so one node a
round looks (the one that claims the round in the database: postgres/logins.py); and
the disabling itself re-reads the user under the users' lock, so two nodes never both
disable one user or both send its notice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate, make_msgid

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailrelay.directory.filedir import UnknownEntry
from mailrelay.events import NO_EVENTS, EventKind, rfc3339
from mailrelay.manage.stores import NothingToChange, threaded, user_store
from mailrelay.model import Account, SmtpUser, Status
from mailrelay.text import printable

log = Logger()

MAX_CHECK_INTERVAL = 3600.0  # seconds between two looks, at most


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


class DormancyJob(Service):
    """Looks every ``interval`` (a tenth of ``dormant_after``, at most an hour) at the users
    of ``directory`` and the last logins of ``recorder`` (a LoginRecorder), and disables the
    dormant ones. ``submit(sender, recipients, bytes)`` queues a notice; ``clock`` gives the
    time (default: ``reactor``, whose thread pool reads and writes the files); ``events``
    (an IEventSink) hears of each user disabled."""

    def __init__(self, directory, users_file: str, recorder, dormant_after: float,
                 submit: Callable, postmaster: str, hostname: str, reactor,
                 clock=None, events=NO_EVENTS) -> None:
        self.directory = directory
        self.recorder = recorder
        self.dormant_after = dormant_after
        self.submit = submit
        self.postmaster = postmaster
        self.hostname = hostname
        self.reactor = reactor
        self.clock = clock or reactor  # the time and the timer; reactor runs the threads
        self.events = events
        self.interval = min(MAX_CHECK_INTERVAL, max(1.0, dormant_after / 10))
        self._store = user_store(directory, users_file, threaded(reactor))
        self._told: set[str] = set()  # read-only directory: dormant users already logged
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("dormant-user check stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    @defer.inlineCallbacks
    def check(self):
        """One look; a failure is logged and the next look tries again."""
        try:
            claim = getattr(self.recorder.store, "claim", None)  # shared: one node a round
            if claim is not None and not (yield threaded(self.reactor)(
                    claim, "dormancy", self.clock.seconds(), self.interval)):
                return
            yield self.recorder.flush()  # logins of the last seconds count too
            logins = yield threaded(self.reactor)(self.recorder.store.all)
            users = yield self.directory.listUsers()
            now = self.clock.seconds()
            for user in users:
                last = logins.get(user.username)
                if user.status is not Status.BLOCKED and self._dormant(user, last, now):
                    yield self._disable(user, last)
        except Exception:
            log.failure("dormant-user check failed")

    def _dormant(self, user: SmtpUser, last: tuple[float, str] | None, now: float) -> bool:
        since = max(user.updated, last[0] if last else 0.0)
        return now - since >= self.dormant_after

    @defer.inlineCallbacks
    def _disable(self, user: SmtpUser, last: tuple[float, str] | None):
        if not self._store.writable:
            if user.username not in self._told:
                self._told.add(user.username)
                log.warn("user {user} is dormant (last login: {last}); the directory is "
                         "read-only here: disable it there", user=printable(user.username),
                         last=_utc(last[0]) if last else "never")
            return
        now = self.clock.seconds()

        def block(current: SmtpUser) -> dict:
            # Changed or gone quiet since the look: decide again on what is there now.
            if current.status is Status.BLOCKED or not self._dormant(current, last, now):
                return {}
            return {"status": Status.BLOCKED}

        try:
            yield self._store.updateUser(user.username, block)
        except (NothingToChange, UnknownEntry):  # logged in or deleted meanwhile
            return
        log.warn("user {user} disabled (status blocked): no login for {days:g} days "
                 "(last login: {last})", user=printable(user.username),
                 days=round(self.dormant_after / 86400, 3),
                 last=f"{_utc(last[0])} from {last[1]}" if last else "never")
        self.events.emit(EventKind.CREDENTIAL_DISABLED, user.account, user.username, {
            "reason": "dormant", "last_login": rfc3339(last[0]) if last else None,
            "last_login_ip": last[1] if last else None})
        account = yield self.directory.getAccount(user.account)
        if account is not None and account.notify:
            message = self.compose(account, user, last)
            yield defer.maybeDeferred(self.submit, "", [account.notify], message).addErrback(
                lambda f: log.failure("cannot queue the dormancy notice to {to}", f,
                                      to=account.notify))

    def compose(self, account: Account, user: SmtpUser,
                last: tuple[float, str] | None) -> bytes:  # fmt: skip
        name = printable(user.username)
        msg = EmailMessage(policy=SMTP)
        msg["From"] = formataddr(("Mail relay", self.postmaster))
        msg["To"] = account.notify
        msg["Subject"] = f"SMTP login {name} disabled: not used for a long time"
        msg["Date"] = formatdate(self.clock.seconds(), usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        when = f"{_utc(last[0])} from {last[1]}" if last else "never"
        msg.set_content("\n".join([
            f"The SMTP login {name} (account {account.name}) has not logged in for",
            f"{self.dormant_after / 86400:g} days (last login: {when}).",
            "The relay has disabled it (status blocked): its mail is refused.",
            "",
            "If it is still needed, an administrator can enable it again:",
            f"  mailrelay-admin user set {name} --status allowed",
        ]) + "\n")
        return msg.as_bytes()
