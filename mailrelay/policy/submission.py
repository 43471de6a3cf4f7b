"""The submission policy the session calls: connection limits, failed-login defence, rate
limits and sender notifications composed behind ISubmissionPolicy / ISessionPolicy.

Everything here is synchronous and runs in the reactor thread, so the shared counters are
exact however many sessions interleave. Each refusal (and each login slowed down) is
counted in ``metrics`` by its reason.
"""

from __future__ import annotations

from zope.interface import implementer

from mailrelay.interfaces import ISessionPolicy, ISubmissionPolicy
from mailrelay.metrics import NO_METRICS
from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.policy.connections import ConnectionLimits, Ticket
from mailrelay.policy.notify import SenderNotifier
from mailrelay.policy.ratelimit import RateLimiter, Reservation
from mailrelay.reply import Reply


@implementer(ISubmissionPolicy)
class SubmissionPolicy:
    """One per daemon, shared by every listener. ``notifier`` None: no notifications.
    ``metrics``: the IMetrics that counts the refusals."""

    metrics = NO_METRICS

    def __init__(
        self,
        connections: ConnectionLimits,
        rates: RateLimiter,
        logins: LoginGuard,
        notifier: SenderNotifier | None = None,
    ) -> None:
        self.connections = connections
        self.rates = rates
        self.logins = logins
        self.notifier = notifier

    def connect(self, client_ip: str) -> SessionPolicy:
        """Raises Reply(421, "4.7.0") over the total or per-address connection limit."""
        with self.counting("connections"):
            ticket = self.connections.open(client_ip)
        return SessionPolicy(self, client_ip, ticket)

    def counting(self, reason: str) -> _Counting:
        return _Counting(self.metrics, reason)


class _Counting:
    """Counts a Reply raised inside it as a refusal for ``reason``; a 451 4.7.1 (a rate
    limit) is counted as rate_limit whatever the step."""

    __slots__ = ("_metrics", "_reason")

    def __init__(self, metrics, reason: str) -> None:
        self._metrics = metrics
        self._reason = reason

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        if isinstance(value, Reply):
            self._metrics.policyRefusal("rate_limit" if value.status == "4.7.1"
                                        else self._reason)
        return False


@implementer(ISessionPolicy)
class SessionPolicy:
    """One connection's places in the shared counters."""

    def __init__(self, policy: SubmissionPolicy, client_ip: str, ticket: Ticket) -> None:
        self.policy = policy
        self.client_ip = client_ip
        self.ticket = ticket
        self.reservation: Reservation | None = None

    def authAttempt(self, username: str) -> float:
        """Raises Reply(421, "4.7.0") for a blocked address; else the seconds to wait."""
        with self.policy.counting("login_blocked"):
            wait = self.policy.logins.check(self.client_ip)
        if wait:
            self.policy.metrics.policyRefusal("login_delayed")
        return wait

    def authFailed(self, username: str) -> None:
        # No wait before the 535: authAttempt already slowed a suspicious address, before
        # the check, where the wait tells the client nothing about the outcome.
        self.policy.logins.failed(self.client_ip, username)

    def authSucceeded(self, avatar) -> None:
        """Raises Reply(421, "4.7.0") when the user has too many connections."""
        user = avatar.user
        with self.policy.counting("user_connections"):
            self.policy.connections.bind_user(self.ticket, user.username, user.max_connections)
        if avatar.method == "password":
            self.policy.logins.succeeded(self.client_ip, user.username)

    def mailFrom(self, avatar, sender: str) -> None:
        """Raises Reply(451, "4.7.0") past the messages per connection, Reply(451,
        "4.7.1") over the user's rate limit."""
        self.reset()  # a session that forgot reset() must not leak a reservation
        with self.policy.counting("messages_per_connection"):
            self.policy.connections.count_message(self.ticket)
            user = avatar.user
            self.reservation = self.policy.rates.transaction(user.username,
                                                             per_hour=user.rate_limit)

    def senderRefused(self, avatar, address: str, header: bool) -> None:
        if self.policy.notifier is not None:
            self.policy.notifier.refused(
                avatar.account, avatar.user.username, address, self.client_ip, header
            )

    def rcptTo(self, avatar, recipient: str, count: int) -> None:
        """Raises Reply(451, "4.7.1") over the rate limit when counting recipients."""
        if self.reservation is None:
            raise RuntimeError("RCPT without a successful mailFrom()")
        with self.policy.counting("rate_limit"):
            self.reservation.recipient()

    def data(self, avatar, envelope) -> None:
        """Nothing left to check: the units were reserved at MAIL and RCPT."""

    def accepted(self, avatar, envelope) -> None:
        if self.reservation is not None:
            self.reservation.commit()
            self.reservation = None

    def reset(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None

    def disconnect(self) -> None:
        self.reset()
        self.ticket.close()
