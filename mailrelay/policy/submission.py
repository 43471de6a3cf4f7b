"""The submission policy the session calls: connection limits, failed-login defence, rate
limits, quotas and notifications composed behind ISubmissionPolicy / ISessionPolicy.

With the in-process limiters everything here is synchronous and runs in the reactor
thread, so the counters are exact however many sessions interleave. The limiters shared by
several nodes (mailrelay/cluster/) answer with Deferreds; each step then waits for its
answer, and what arrives after the connection is gone is given back. Each refusal (and
each login slowed down) is counted in ``metrics`` by its reason.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.interfaces import ISessionPolicy, ISubmissionPolicy
from mailrelay.metrics import NO_METRICS
from mailrelay.policy.notify import SenderNotifier
from mailrelay.policy.quota import QuotaExceeded, utc_text
from mailrelay.reply import Reply

log = Logger()


def _then(result, step):
    """``step(result)`` now, or once ``result`` fires when it is a Deferred."""
    if isinstance(result, Deferred):
        return result.addCallback(step)
    return step(result)


@implementer(ISubmissionPolicy)
class SubmissionPolicy:
    """One per daemon, shared by every listener: ``connections`` (IConnectionLimits),
    ``rates`` (IRateLimiter), ``logins`` (ILoginGuard). ``notifier`` None: none.
    ``quotas`` (a policy.quota.QuotaCounter or cluster's RedisQuotaCounter) and ``warner``
    (a quotawarn.QuotaWarner): None, no quotas, no warnings.
    ``metrics``: the IMetrics that counts the refusals."""

    metrics = NO_METRICS

    def __init__(
        self,
        connections,
        rates,
        logins,
        notifier: SenderNotifier | None = None,
        quotas=None,
        warner=None,
    ) -> None:
        self.connections = connections
        self.rates = rates
        self.logins = logins
        self.notifier = notifier
        self.quotas = quotas
        self.warner = warner

    def warn(self, avatar, crossings) -> None:
        """Report the quota thresholds a message (or a refusal) crossed."""
        if crossings and self.warner is not None:
            self.warner.warn(avatar.account, avatar.user.username, crossings,
                             avatar.user.quota_action == "hold")

    def connect(self, client_ip: str):
        """Raises Reply(421, "4.7.0") over the total or per-address connection limit."""
        return _then(self.counted("connections", self.connections.open, client_ip),
                     lambda ticket: SessionPolicy(self, client_ip, ticket))

    def counted(self, reason: str, call, *args):
        """``call(*args)``; a Reply it raises (or its Deferred fails with) is counted as a
        refusal for ``reason`` (a 451 4.7.1, a rate limit, as rate_limit whatever the
        step)."""
        try:
            result = call(*args)
        except Reply as refusal:
            self._refused(reason, refusal)
            raise
        if isinstance(result, Deferred):
            result.addErrback(self._failed, reason)
        return result

    def _failed(self, failure: Failure, reason: str) -> Failure:
        if failure.check(Reply):
            self._refused(reason, failure.value)
        return failure

    def _refused(self, reason: str, refusal: Reply) -> None:
        if refusal.status == "4.7.1" and not isinstance(refusal, QuotaExceeded):
            reason = "rate_limit"
        self.metrics.policyRefusal(reason)


@implementer(ISessionPolicy)
class SessionPolicy:
    """One connection's places in the shared counters."""

    def __init__(self, policy: SubmissionPolicy, client_ip: str, ticket) -> None:
        self.policy = policy
        self.client_ip = client_ip
        self.ticket = ticket
        self.reservation = None  # the open transaction's IReservation
        self.quota = None  # its places in the quotas
        self.held = None  # the QuotaExceeded its message is held for (quota_action hold)

    def authAttempt(self, username: str):
        """Raises Reply(421, "4.7.0") for a blocked address; else the seconds to wait."""

        def waited(wait):
            if wait:
                self.policy.metrics.policyRefusal("login_delayed")
            return wait

        return _then(self.policy.counted("login_blocked", self.policy.logins.check,
                                         self.client_ip), waited)

    def authFailed(self, username: str):
        # No wait before the 535: authAttempt already slowed a suspicious address, before
        # the check, where the wait tells the client nothing about the outcome.
        return self.policy.logins.failed(self.client_ip, username)

    def authSucceeded(self, avatar):
        """Raises Reply(421, "4.7.0") when the user has too many connections."""
        user = avatar.user

        def bound(_):
            if avatar.method == "password":
                return self.policy.logins.succeeded(self.client_ip, user.username)
            return None

        return _then(self.policy.counted("user_connections", self.policy.connections.bind_user,
                                         self.ticket, user.username, user.max_connections),
                     bound)

    def mailFrom(self, avatar, sender: str):
        """Raises Reply(451, "4.7.0") past the messages per connection, Reply(451,
        "4.7.1") over a quota or the user's rate limit."""
        self.reset()  # a session that forgot reset() must not leak a reservation
        self.policy.counted("messages_per_connection", self.policy.connections.count_message,
                            self.ticket)
        user = avatar.user

        def rated(_):
            try:
                result = _then(self.policy.counted("rate_limit", self.policy.rates.transaction,
                                                   user.username, user.rate_limit),
                               self._reserved)
            except BaseException:
                self._release_quota()
                raise
            if isinstance(result, Deferred):
                result.addErrback(self._release_quota)
            return result

        return _then(self._reserve_quota(avatar), rated)

    def _reserve_quota(self, avatar):
        quotas = self.policy.quotas
        if quotas is None:
            return None
        # A user whose mail over quota is held is not refused: no refusal is counted.
        hold = avatar.user.quota_action == "hold"
        try:
            if hold:
                result = quotas.reserve(avatar.user, avatar.account)
            else:
                result = self.policy.counted("quota", quotas.reserve, avatar.user,
                                             avatar.account)
        except QuotaExceeded as refusal:
            self.policy.warn(avatar, [refusal.crossing] if refusal.crossing else [])
            if not hold:
                raise
            return self._hold(avatar, refusal)
        if isinstance(result, Deferred):
            result.addErrback(self._quota_refused, avatar, hold)
        return _then(result, self._quota_reserved)

    def _quota_refused(self, failure: Failure, avatar, hold: bool):
        if failure.check(QuotaExceeded):
            if failure.value.crossing:
                self.policy.warn(avatar, [failure.value.crossing])
            if hold:
                return self._hold(avatar, failure.value)
        return failure

    def _hold(self, avatar, refusal: QuotaExceeded) -> None:
        """The message goes on, to be held until the quota resets; it counts only when it
        is released (policy/quotahold.py), in the period it is released in."""
        log.info("quota: {user} is over its {quota}: its message is held until {until}",
                 user=avatar.user.username, quota=refusal.quota.describe(),
                 until=utc_text(refusal.resets))
        self.held = refusal
        return None

    def _quota_reserved(self, reservation) -> None:
        if reservation is None:  # held: no place taken
            return
        if self.ticket.closed:
            reservation.release()
        else:
            self.quota = reservation

    def holding(self):
        return self.held

    def _release_quota(self, failure: Failure | None = None):
        quota, self.quota = self.quota, None
        if quota is not None:
            quota.release()
        return failure

    def _reserved(self, reservation) -> None:
        if self.ticket.closed:  # the connection went while the counters answered
            reservation.release()
        else:
            self.reservation = reservation

    def senderRefused(self, avatar, address: str, header: bool) -> None:
        if self.policy.notifier is not None:
            self.policy.notifier.refused(
                avatar.account, avatar.user.username, address, self.client_ip, header
            )

    def rcptTo(self, avatar, recipient: str, count: int):
        """Raises Reply(451, "4.7.1") over the rate limit when counting recipients."""
        if self.reservation is None:
            raise RuntimeError("RCPT without a successful mailFrom()")
        return self.policy.counted("rate_limit", self.reservation.recipient)

    def data(self, avatar, envelope) -> None:
        """Nothing left to check: the units were reserved at MAIL and RCPT."""

    def accepted(self, avatar, envelope):
        self.held = None
        quota, self.quota = self.quota, None
        if quota is not None:  # the message counts once, now that it is spooled
            d = _then(quota.commit(), lambda crossings: self.policy.warn(avatar, crossings))
            if isinstance(d, Deferred):
                d.addErrback(lambda f: log.failure("quota not counted for {user}", f,
                                                   user=avatar.user.username))
        reservation, self.reservation = self.reservation, None
        if reservation is not None:
            return reservation.commit()
        return None

    def reset(self):
        self.held = None
        self._release_quota()
        reservation, self.reservation = self.reservation, None
        if reservation is not None:
            return reservation.release()
        return None

    def disconnect(self) -> None:
        self.reset()
        self.ticket.close()
