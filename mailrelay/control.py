"""The one channel to a running relay: AMP over a UNIX socket, <data_dir>/control.sock
(``config.server.control_socket``).

The relay listens there (mode 0600: only its own user may act on the queue) and answers
with an IQueueControl: its delivery process, which the same commands reach over the
socket pair the two share (delivery/process.py). ``mailrelay-admin queue retry|flush|
delete|release`` and the control panel thus ask delivery the same questions the same way. When
nobody listens, ``ask`` raises RelayNotRunning and the caller acts on the spool itself.
"""

from __future__ import annotations

import json

from twisted.internet import error, protocol
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.protocols import amp

from mailrelay.reply import Reply

log = Logger()


class DeliveryOff(Exception):
    """This relay runs without delivery ([delivery] enabled = no)."""


class DeliveryNotRunning(Exception):
    """The delivery process is between a crash and its restart: ask again shortly."""


class NotQuotaHeld(Exception):
    """The message is in hold/ for another reason than a quota: its user is sandboxed."""


class RelayNotRunning(Exception):
    """No relay answers on the control socket."""


_ERRORS = {DeliveryOff: b"DELIVERY_OFF", DeliveryNotRunning: b"DELIVERY_NOT_RUNNING"}


class Retry(amp.Command):
    """One message is due now; False: it is not in the queue."""

    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"queued", amp.Boolean())]
    errors = _ERRORS


class Delete(amp.Command):
    """Stop delivering a message and remove it; the place it was in (queue or hold)."""

    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"place", amp.Unicode())]
    errors = {KeyError: b"UNKNOWN_MESSAGE", **_ERRORS}


class Release(amp.Command):
    """Deliver a message held over its quota now (no queue_id: every such message); the
    ids released."""

    arguments = [(b"queue_id", amp.Unicode(optional=True))]
    response = [(b"released", amp.ListOf(amp.Unicode()))]
    errors = {KeyError: b"UNKNOWN_MESSAGE", NotQuotaHeld: b"NOT_QUOTA_HELD"}


class Flush(amp.Command):
    """Every deferred message is due now; how many were waiting."""

    response = [(b"count", amp.Integer())]
    errors = _ERRORS


class LimitState(amp.Command):
    """A user's rate-limit state, for ``mailrelay-admin explain``: the units counted in
    the last hour and minute (-1: this limiter does not say) and the reply its next MAIL
    FROM would get from the rate limit ("" when it passes). The question is asked the way
    a session asks it (a reservation, given back at once), so nothing is counted. With
    ``ip``, also what AUTH from that address would meet (the failed-login defence): the
    refusal ("" for none) or the seconds the password check would wait. With ``quotas``
    (JSON: the user's account and the quota settings of the user and of the account), the
    quotas' state (``quota``, JSON) and the refusal the next MAIL would get from them, read
    without changing them (a refusal there may be the one that reports a quota full)."""

    arguments = [(b"user", amp.Unicode()), (b"rate_limit", amp.Integer(optional=True)),
                 (b"ip", amp.Unicode(optional=True)),
                 (b"quotas", amp.Unicode(optional=True))]
    response = [(b"used_hour", amp.Integer()), (b"used_minute", amp.Integer()),
                (b"refusal", amp.Unicode()), (b"login_refusal", amp.Unicode()),
                (b"login_wait", amp.Float()), (b"quota", amp.Unicode()),
                (b"quota_refusal", amp.Unicode())]


class QueueResponder(amp.AMP):
    """Answers Retry, Delete, Release and Flush with ``queue`` (an IQueueControl), LimitState with
    ``rates``, ``logins`` and ``quotas`` (the IRateLimiter, ILoginGuard and quota counter
    of the sessions)."""

    def __init__(self, queue, rates=None, logins=None, quotas=None) -> None:
        super().__init__()
        self._queue = queue
        self._rates = rates
        self._logins = logins
        self._quotas = quotas

    @LimitState.responder
    async def limit_state(self, user: str, rate_limit: int | None = None,
                          ip: str | None = None, quotas: str | None = None):  # fmt: skip
        rates = self._rates
        usage = getattr(rates, "usage", None)  # the in-process limiter counts here
        used = usage(user) if usage is not None else (-1, -1)
        refusal = login_refusal = ""
        try:
            reservation = await maybeDeferred(rates.transaction, user, rate_limit)
        except Reply as e:
            refusal = _line(e)
        else:
            await maybeDeferred(reservation.release)
        wait = 0.0
        if ip:
            try:
                wait = float(await maybeDeferred(self._logins.check, ip) or 0)
            except Reply as e:
                login_refusal = _line(e)
        quota, quota_refusal = [], ""
        if quotas and self._quotas is not None:
            from mailrelay.policy.quota import first_full

            usage = await maybeDeferred(self._quotas.usage, *quota_subjects(user, quotas))
            quota = [u.to_json() for u in usage]
            full = first_full(usage)
            quota_refusal = _line(full) if full is not None else ""
        return {"used_hour": used[0], "used_minute": used[1], "refusal": refusal,
                "login_refusal": login_refusal, "login_wait": wait,
                "quota": json.dumps(quota), "quota_refusal": quota_refusal}

    @Retry.responder
    def retry(self, queue_id: str):
        return self._queue.retry(queue_id).addCallback(lambda queued: {"queued": queued})

    @Delete.responder
    def delete(self, queue_id: str):
        return self._queue.delete(queue_id).addCallback(lambda place: {"place": place})

    @Release.responder
    def release(self, queue_id: str | None = None):
        return self._queue.release(queue_id).addCallback(lambda ids: {"released": ids})

    @Flush.responder
    def flush(self):
        return self._queue.flush().addCallback(lambda count: {"count": count})


def _line(reply: Reply) -> str:
    return f"{reply.code} {reply.line()}"


def quota_subjects(user: str, quotas: str):
    """LimitState's ``quotas`` JSON -> the (SmtpUser, Account) a counter reads quotas of."""
    from mailrelay.model import Account, SmtpUser

    doc = json.loads(quotas)
    account = doc.get("account")
    return (SmtpUser(user, account=account or "default", quota_day=doc.get("quota_day"),
                     quota_month=doc.get("quota_month")),
            Account(account, quota_day=doc.get("account_quota_day"),
                    quota_month=doc.get("account_quota_month")) if account else None)


class _Factory(protocol.Factory):
    noisy = False  # no "Starting factory" line per mailrelay-admin call

    def __init__(self, queue, rates, logins, quotas) -> None:
        self._queue = queue
        self._rates = rates
        self._logins = logins
        self._quotas = quotas

    def buildProtocol(self, addr) -> QueueResponder:
        return QueueResponder(self._queue, self._rates, self._logins, self._quotas)


def control_service(path: str, queue, reactor, rates=None, logins=None, quotas=None):
    """Listens on ``path`` while the relay runs; ``queue`` (an IQueueControl) answers. A
    stale socket left by a relay that died is replaced (the lock file beside it tells a
    live relay from a dead one); a second relay on the same data_dir does not start."""
    # Imported here: twisted's endpoints bring OpenSSL, which most mailrelay-admin
    # commands (every one imports this module) never need.
    from twisted.internet.endpoints import quoteStringArgument

    from mailrelay.listener import ListenerService

    endpoint = f"unix:{quoteStringArgument(path)}:mode=600:lockfile=1"
    return ListenerService("control", endpoint, _Factory(queue, rates, logins, quotas),
                           reactor)


async def ask(reactor, path: str, command: type[amp.Command], **arguments) -> dict:
    """Send one command to the relay listening on ``path``; its answer. RelayNotRunning
    when there is no socket or nobody listens on it."""
    from twisted.internet import endpoints

    endpoint = endpoints.UNIXClientEndpoint(reactor, path, timeout=10)
    try:
        channel = await endpoints.connectProtocol(endpoint, amp.AMP())
    except (error.ConnectError, error.ConnectionRefusedError, FileNotFoundError) as e:
        raise RelayNotRunning(f"no relay answers on {path}") from e
    try:
        return await channel.callRemote(command, **arguments)
    finally:
        channel.transport.loseConnection()
