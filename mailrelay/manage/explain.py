"""What the relay would answer a login, step by step, and which rule decided: ``mailrelay-
admin explain``, ``POST /api/v1/explain`` and the panel's /explain page.

The answers come from the code the session runs, not from a copy of its rules: the sender
checks (policy/sender.py: status, null sender, scope, verification, the From: header) and
the session's own limits (smtp/server.py: SIZE, the number of recipients). Only the rule
named beside each reply is worked out here, to say *why*. A password is not checked: the
explanation starts from a successful AUTH.

Limit state (the user's rate-limit window, the daily and monthly quotas of the user and
its account; with a client address, the failed-login defence's block or delay for it)
lives in the running relay: ``limit_state`` asks it over
the control socket (control.py), and when no relay answers the explanation says so
instead of guessing.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mailrelay.auth.avatar import Submitter
from mailrelay.model import Account, SmtpUser, Status
from mailrelay.policy.sender import SenderChecks
from mailrelay.reply import Reply
from mailrelay.scope import domain_of, to_ascii_address
from mailrelay.smtp.server import check_recipient_count, check_size

NOT_RUNNING = "relay not running: limit state unknown"


class UnknownUser(LookupError):
    """No user of that name: a mistake, not a refusal."""


@dataclass(frozen=True)
class Step:
    """One command and the reply the relay would send to it."""

    step: str  # "AUTH", "MAIL FROM", "RCPT TO", "DATA", "From:", "end of data"
    reply: str  # the reply line: "250 2.1.0 Ok"
    rule: str  # what decided it, in words

    @property
    def code(self) -> int:
        return int(self.reply[:3])

    @property
    def refused(self) -> bool:
        return self.code >= 400


@dataclass
class Explanation:
    user: str
    sender: str
    steps: list[Step] = field(default_factory=list)
    limits: dict[str, Any] | None = None  # the relay's limit state; None: not running

    @property
    def accepted(self) -> bool:
        return not any(s.refused for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "sender": self.sender, "accepted": self.accepted,
                "steps": [asdict(s) for s in self.steps],
                "limits": self.limits if self.limits is not None else NOT_RUNNING}


@dataclass(frozen=True)
class Settings:
    """The relay settings the session answers by ([limits], [admin] verify_senders)."""

    max_message_size: int
    max_recipients: int
    verify_senders: bool

    @classmethod
    def of(cls, config) -> Settings:
        return cls(config.limits.max_message_size, config.limits.max_recipients,
                   config.admin.enabled and config.admin.verify_senders)


def client_address(text: str) -> str:
    """An IPv4 or IPv6 address as the relay writes it; ValueError names a bad one."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address")


def _line(reply: Reply) -> str:
    return f"{reply.code} {reply.status} {reply.text}"


def _reply_of(line: str) -> Reply:
    """A reply line the running relay sent back, as the Reply it was."""
    code, status, text = line.split(" ", 2)
    return Reply(int(code), status, text)


def covering_entry(user: SmtpUser, account: Account | None, address: str) -> str:
    """The scope entry that lets ``user`` send as ``address``, as people read it."""
    scope = user.effective_scope(account)
    address = to_ascii_address(address.strip()) or address
    entry = address if address in scope.addresses else "*@" + domain_of(address)
    return f"scope entry {entry} of user {user.username}"


def _refusal_rule(user: SmtpUser, account: Account | None, address: str, reply: Reply,
                  header: bool = False) -> str:  # fmt: skip
    """Why the sender checks refused ``address``: which of their rules the reply is."""
    if not header and user.status is Status.BLOCKED:
        return f"status blocked of user {user.username}"
    if not address:
        return "the null sender is never allowed to a login"
    if reply.status in ("5.1.7", "5.6.0"):
        return "quoted local part: scopes hold plain addresses"
    scope = user.effective_scope(account)
    if scope.allows(address):
        return f"{covering_entry(user, account, address)} awaits confirmation (verify_senders)"
    where = f"account {account.name}'s domains" if account is not None else "no account"
    return (f"no scope entry of user {user.username} covers it (senders: "
            f"{scope or 'nothing'}; within {where})")


def _rate(user: SmtpUser) -> str:
    return "the default" if user.rate_limit is None else f"{user.rate_limit} per hour"


async def relay_limits(reactor, control_socket: str, user: SmtpUser, ip: str | None = None,
                       account: Account | None = None) -> dict[str, Any] | None:
    """The running relay's rate-limit and quota state for ``user`` of ``account``
    (control.LimitState), and its failed-login defence's for ``ip`` when given; None when
    no relay answers on ``control_socket``."""
    from mailrelay.control import LimitState, RelayNotRunning, ask

    quotas = {"account": user.account, "quota_day": user.quota_day,
              "quota_month": user.quota_month,
              "account_quota_day": account.quota_day if account is not None else None,
              "account_quota_month": account.quota_month if account is not None else None}
    try:
        answer = await ask(reactor, control_socket, LimitState, user=user.username,
                           rate_limit=user.rate_limit, quotas=json.dumps(quotas),
                           **({"ip": ip} if ip else {}))
    except RelayNotRunning:
        return None
    out = {key: answer[key] for key in ("used_hour", "used_minute", "refusal",
                                        "login_refusal", "login_wait", "quota_refusal")}
    out["quota"] = json.loads(answer["quota"])
    return out


def quota_text(quota: dict[str, Any]) -> str:
    """``daily quota of user app: 7 of 10 (1 open), resets at 2026-12-07 00:00 UTC``."""
    kind = "daily" if quota["period"] == "day" else "monthly"
    held = f" ({quota['held']} open)" if quota["held"] else ""
    return (f"{kind} quota of {quota['subject']} {quota['name']}: {quota['used']} of "
            f"{quota['limit']}{held}, resets at {quota['resets']}")


def _held(user: SmtpUser) -> str:
    return (f"status sandboxed of user {user.username}: accepted and held, not delivered"
            if user.status is Status.SANDBOXED else "")


async def explain(
    user: SmtpUser | None,
    account: Account | None,
    settings: Settings,
    sender: str,
    from_header: str | None = None,
    recipients: int = 1,
    size: int | None = None,
    limit_state: Callable[[SmtpUser, Account | None],
                          Awaitable[dict[str, Any] | None]] | None = None,
    ip: str | None = None,
) -> Explanation:
    """The steps of one submission by ``user`` (found with ``account``) from ``sender``:
    AUTH, MAIL FROM (with SIZE=``size``), ``recipients`` (at least 1) RCPT TO, DATA and
    the From: header (``from_header``; none given: the envelope sender, as most clients
    write it). The steps stop at the first refusal, as a client would."""
    if user is None:
        raise UnknownUser("unknown user")
    limits = await limit_state(user, account) if limit_state is not None else None
    out = Explanation(user.username, sender, limits=limits)
    steps = out.steps
    avatar = Submitter.for_user(user, account)
    checks = SenderChecks(None, settings.verify_senders)
    mail = f"SIZE={size}" if size is not None else ""
    try:
        login = f"user {user.username} (account {user.account}, status {user.status})"
        if ip and limits is not None:
            if limits["login_refusal"]:
                raise _Refused(_reply_of(limits["login_refusal"]),
                               f"client address {ip} blocked after failed logins", "AUTH")
            if limits["login_wait"]:
                login += (f"; the password is checked after {limits['login_wait']:g} s "
                          f"(earlier failed logins from {ip})")
        steps.append(Step("AUTH", "235 2.7.0 Authentication successful",
                          f"{login}; the password is not checked here"))
        if size is not None:
            try:
                check_size(str(size), settings.max_message_size)
            except Reply as refusal:
                raise _Refused(refusal, f"SIZE {size} over [limits] max_message_size "
                                        f"{settings.max_message_size}")
        try:
            checks.mailFrom(avatar, sender)
        except Reply as refusal:
            raise _Refused(refusal, _refusal_rule(user, account, sender, refusal))
        quotas = limits.get("quota", []) if limits is not None else []
        held = ""  # over a quota with quota_action hold: what the 250 adds
        if limits is not None and limits.get("quota_refusal"):  # the session asks them first
            full = next(q for q in quotas if q["used"] + q["held"] >= q["limit"])
            if user.quota_action != "hold":
                raise _Refused(_reply_of(limits["quota_refusal"]), quota_text(full))
            # "451 4.7.1 daily quota of ... reached, it resets at <when>"
            what, _, when = _reply_of(limits["quota_refusal"]).text.partition(
                " reached, it resets at ")
            held = f", held: {what} reached, released at {when}"
        if limits is not None and limits["refusal"]:  # the running relay's own reply
            raise _Refused(_reply_of(limits["refusal"]),
                           f"rate limit of user {user.username} ({_rate(user)}): "
                           f"{limits['used_hour']} counted this hour")
        steps.append(Step(f"MAIL FROM:<{sender}> {mail}".strip(), "250 2.1.0 Ok",
                          "; ".join([covering_entry(user, account, sender),
                                     *map(quota_text, quotas)])))
        for n in range(recipients):
            try:
                check_recipient_count(n, settings.max_recipients)
            except Reply as refusal:
                raise _Refused(refusal, f"recipient {n + 1} over [limits] max_recipients "
                                        f"{settings.max_recipients}", "RCPT TO")
            steps.append(Step("RCPT TO", "250 2.1.5 Ok", f"recipient {n + 1} of at most "
                                                         f"{settings.max_recipients}"))
        steps.append(Step("DATA", "354 End data with <CR><LF>.<CR><LF>", ""))
        header = from_header if from_header is not None else sender
        try:
            checks.headerFrom(avatar, header)
        except Reply as refusal:
            raise _Refused(refusal, _refusal_rule(user, account, header, refusal, True),
                           "end of data")
        steps.append(Step("end of data", f"250 2.0.0 Ok: queued as <queue id>{held}",
                          _held(user) or (held and f"quota_action hold of user "
                                          f"{user.username}: accepted and held until the "
                                          "quota resets, then delivered")
                          or f"From: {header}: " + covering_entry(user, account, header)))
    except _Refused as refused:
        step = refused.step or f"MAIL FROM:<{sender}> {mail}".strip()
        steps.append(Step(step, _line(refused.reply), refused.rule))
    return out


class _Refused(Exception):
    def __init__(self, reply: Reply, rule: str, step: str = "") -> None:
        super().__init__(rule)
        self.reply, self.rule, self.step = reply, rule, step
