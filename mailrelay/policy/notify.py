"""Domain sender notifications: tell an account when one of its logins tries a sender
outside its scope (who, which sender, from where, when).

At most one notification per (account, login) every ``interval`` seconds: the first attempt
is reported at once, later ones are collected and reported together when the interval
ends, so an attack with a stolen password yields a handful of messages, not thousands.
The messages go through the spool like any other mail, with the null envelope sender, so
an unreachable notification address can never start a bounce loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr, make_msgid

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailrelay.model import Account
from mailrelay.text import printable

log = Logger()

Submit = Callable[[str, list[str], bytes], Deferred]


@dataclass(frozen=True)
class Attempt:
    when: float
    sender: str
    client_ip: str
    header: bool  # the From: header (True) or the envelope MAIL FROM (False)


@dataclass
class _Pending:
    """A (account, login) inside its quiet interval, with what it tried meanwhile."""

    account: Account  # as last seen: a changed notification address applies at once
    timer: IDelayedCall | None = None
    listed: list[Attempt] = field(default_factory=list)
    count: int = 0


class SenderNotifier:
    """Composes and submits domain sender notifications.

    ``submit(sender, recipients, message_bytes)`` queues a message (the spool); ``postmaster``
    is the From: address and ``hostname`` the Message-ID domain.
    """

    def __init__(
        self,
        clock: IReactorTime,
        submit: Submit,
        postmaster: str,
        hostname: str,
        interval: float = 600.0,
        max_listed: int = 20,
    ) -> None:
        self.clock = clock
        self.submit = submit
        self.postmaster = postmaster
        self.hostname = hostname
        self.interval = interval
        self.max_listed = max_listed
        self._pending: dict[tuple[str, str], _Pending] = {}

    def refused(
        self,
        account: Account | None,
        username: str,
        sender: str,
        client_ip: str,
        header: bool = False,
    ) -> None:
        """The session refused ``sender`` for the login ``username`` of ``account``."""
        if account is None or not account.notify:
            return
        attempt = Attempt(self.clock.seconds(), printable(sender), client_ip, header)
        key = (account.name, username.lower())
        pending = self._pending.get(key)
        if pending is not None:  # inside the quiet interval: report it when it ends
            pending.account = account
            pending.count += 1
            if len(pending.listed) < self.max_listed:
                pending.listed.append(attempt)
            return
        # The quiet interval starts before the message is made: whatever becomes of it,
        # the timer is what brings the next report.
        pending = self._pending[key] = _Pending(account)
        pending.timer = self.clock.callLater(self.interval, self._flush, username, key)
        self._send(account, username, [attempt], 1)

    def stop(self) -> None:
        """The relay is stopping: cancel the timers; collected attempts are only logged."""
        for key, pending in self._pending.items():
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
            if pending.count:
                log.info(
                    "stopping: {count} refused sender attempts by {user} not notified",
                    count=pending.count,
                    user=printable(key[1]),
                )
        self._pending.clear()

    def _flush(self, username: str, key: tuple[str, str]) -> None:
        pending = self._pending[key]
        if not pending.count:  # a quiet interval without attempts: back to immediate reports
            del self._pending[key]
            return
        self._pending[key] = _Pending(
            pending.account, self.clock.callLater(self.interval, self._flush, username, key)
        )
        self._send(pending.account, username, pending.listed, pending.count)

    def _send(self, account: Account, username: str, listed: list[Attempt], count: int) -> None:
        """Compose and queue one notification; never raises (a failure is logged), so no
        attempt can stop the reports of the attempts after it."""
        assert account.notify
        try:
            message = self.compose(account, username, listed, count)
        except Exception:
            log.failure("cannot compose the sender notification to {to} about {user}",
                        to=account.notify, user=printable(username))
            return
        log.info(
            "sender notification to {to}: {user} tried {count} refused senders",
            to=account.notify,
            user=printable(username),
            count=count,
        )
        d = maybeDeferred(self.submit, "", [account.notify], message)
        d.addErrback(
            lambda f: log.failure(
                "cannot queue the sender notification to {to}", f, to=account.notify
            )
        )

    def compose(self, account: Account, username: str, listed: list[Attempt], count: int) -> bytes:
        """The notification as RFC 5322 bytes with CRLF line ends."""
        user = printable(username)
        msg = EmailMessage(policy=SMTP)
        msg["From"] = formataddr(("Mail relay", self.postmaster))
        msg["To"] = account.notify
        # The sender is left to the body: a long Subject folds badly in some readers.
        plural = f"s: {count} attempts" if count > 1 else ""
        msg["Subject"] = f"Refused sender{plural} for login {user}"
        msg["Date"] = format_datetime(datetime.fromtimestamp(self.clock.seconds(), UTC))
        msg["Message-ID"] = make_msgid(domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(self._body(account, user, listed, count))
        return msg.as_bytes()

    def _body(self, account: Account, user: str, listed: list[Attempt], count: int) -> str:
        lines = [
            f"The SMTP login {user} (account {account.name}) tried to send mail",
            "from a sender address it is not authorized to use. The relay refused",
            f"{'it' if count == 1 else 'them'} (550 5.7.1); nothing was sent.",
            "",
            f"{count} attempt{'s' if count != 1 else ''}:",
            "",
        ]
        for a in listed:
            where = "header From:" if a.header else "envelope MAIL FROM"
            lines.append(f"  {_utc(a.when)}  from {a.client_ip}  {a.sender} ({where})")
        if count > len(listed):
            lines.append(f"  ... and {count - len(listed)} more")
        lines += [
            "",
            "If you did not expect this, someone else may know the login's",
            "password: change it, and check the program or device that uses it.",
            "",
            f"This relay sends at most one such message per login every {_span(self.interval)};",
            "attempts in between are collected into the next one.",
        ]
        return "\n".join(lines) + "\n"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _span(seconds: float) -> str:
    if seconds % 3600 == 0:
        n, unit = int(seconds // 3600), "hour"
    elif seconds % 60 == 0:
        n, unit = int(seconds // 60), "minute"
    else:
        n, unit = int(seconds), "second"
    return f"{n} {unit}{'s' if n != 1 else ''}"
