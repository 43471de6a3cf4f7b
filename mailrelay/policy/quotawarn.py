"""Quota warnings: tell an account when it, or one of its users, reaches 80 %, 90 % and
100 % of a daily or monthly quota (policy/quota.py says when that happens, once per
threshold per period).

Each warning is a mail to the account's notification address (``--notify``), queued
through the spool with the null envelope sender like the sender notifications
(notify.py), and a webhook event on the IEventSink: ``quota.approaching`` at 80 and 90 %,
``quota.exceeded`` at 100 %. An account without a notification address gets the event
and the log line only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr, make_msgid

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailrelay.events import NO_EVENTS, EventKind
from mailrelay.model import Account
from mailrelay.policy.notify import Submit
from mailrelay.policy.quota import Crossing, utc_text
from mailrelay.text import printable

log = Logger()


class QuotaWarner:
    """``submit(sender, recipients, message_bytes)`` queues a message; ``postmaster`` is
    the From: address, ``hostname`` the Message-ID domain; ``events`` the IEventSink."""

    def __init__(self, clock: IReactorTime, submit: Submit, postmaster: str, hostname: str,
                 events=NO_EVENTS) -> None:
        self.clock = clock
        self.submit = submit
        self.postmaster = postmaster
        self.hostname = hostname
        self.events = events

    def warn(self, account: Account | None, username: str, crossings: list[Crossing],
             hold: bool = False) -> None:
        """Report each crossing; never raises (a failure is logged). ``hold``: the user's
        mail over quota is held, not refused (its ``quota_action``): the mail says so."""
        for crossing in crossings:
            try:
                self._warn(account, username, crossing, hold)
            except Exception:
                log.failure("cannot report the quota crossing {what}",
                            what=crossing.quota.describe())

    def _warn(self, account: Account | None, username: str, crossing: Crossing,
              hold: bool = False) -> None:
        q = crossing.quota
        log.warn("quota: {subject} {name} reached {percent}% ({used} of {limit} messages per "
                 "{period})", subject=q.subject, name=printable(q.name),
                 percent=crossing.percent, used=crossing.used, limit=q.limit, period=q.period)
        kind = EventKind.QUOTA_EXCEEDED if crossing.percent >= 100 else EventKind.QUOTA_APPROACHING
        self.events.emit(kind, account.name if account is not None else None, username,
                         {"percent": crossing.percent, "period": q.period, "limit": q.limit,
                          "used": crossing.used, "quota": q.subject})
        if account is None or not account.notify:
            return
        d = maybeDeferred(self.submit, "", [account.notify],
                          self.compose(account, crossing, hold))
        d.addErrback(lambda f: log.failure("cannot queue the quota warning to {to}", f,
                                           to=account.notify))

    def compose(self, account: Account, crossing: Crossing, hold: bool = False) -> bytes:
        q = crossing.quota
        msg = EmailMessage(policy=SMTP)
        msg["From"] = formataddr(("Mail relay", self.postmaster))
        msg["To"] = account.notify
        full = crossing.percent >= 100
        msg["Subject"] = (f"{q.describe().capitalize()} "
                          f"{'reached' if full else f'at {crossing.percent}%'}")
        msg["Date"] = format_datetime(datetime.fromtimestamp(self.clock.seconds(), UTC))
        msg["Message-ID"] = make_msgid(domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        whose = (f"the SMTP login {printable(q.name)} (account {account.name})"
                 if q.subject == "user" else f"the account {account.name}")
        lines = [
            f"Messages sent by {whose} this {q.period}:",
            f"{crossing.used} of {q.limit} ({crossing.percent}%).",
            "",
        ]
        if full and hold:
            lines += ["Further messages are accepted and held until the quota resets at",
                      f"{utc_text(crossing.resets)}; they are delivered then, counted in the",
                      "new period."]
        elif full:
            lines += ["Further messages are refused (451 4.7.1) until the quota resets at",
                      f"{utc_text(crossing.resets)}; clients keep them and retry."]
        else:
            lines += [f"The quota resets at {utc_text(crossing.resets)}. When it is used up,",
                      "further messages are held until then." if hold else
                      "further messages are refused (451 4.7.1) until then."]
        msg.set_content("\n".join(lines) + "\n")
        return msg.as_bytes()
