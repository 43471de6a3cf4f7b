"""Simultaneous connections (in total, per client address, per user) and messages per
connection.

The session takes a Ticket when the connection opens and closes it in connectionLost;
everything counted against the ticket is given back then, so the counters cannot leak.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.interfaces import IConnectionLimits
from mailrelay.net import client_key
from mailrelay.reply import Reply
from mailrelay.text import printable

log = Logger()


class Ticket:
    """One open connection's place in the counters."""

    def __init__(self, limits: ConnectionLimits, ip: str, key: str) -> None:
        self.ip = ip
        self.user: str | None = None
        self.messages = 0
        self._limits = limits
        self._key = key
        self.closed = False

    def close(self) -> None:
        """The connection is gone: free its places. Safe to call more than once."""
        if not self.closed:
            self.closed = True
            self._limits._close(self)


@implementer(IConnectionLimits)
class ConnectionLimits:
    """Counters for all listeners of one daemon. 0 switches a limit off.

    Per-address limits count an IPv6 client by its /``ipv6_prefix`` network.
    """

    def __init__(
        self,
        max_total: int = 500,
        max_per_ip: int = 50,
        max_per_user: int = 40,
        max_messages: int = 2500,
        ipv6_prefix: int = 64,
    ) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_per_user = max_per_user
        self.max_messages = max_messages
        self.ipv6_prefix = ipv6_prefix
        self.total = 0
        self._per_ip: dict[str, int] = {}
        self._per_user: dict[str, int] = {}

    def open(self, ip: str) -> Ticket:
        """A new connection from ``ip``. Raises Reply(421, "4.7.0") over the total or the
        per-address limit; the session sends it as its greeting and closes."""
        key = client_key(ip, self.ipv6_prefix)
        if self.max_total and self.total >= self.max_total:
            log.warn("refused a connection from {ip}: {total} open", ip=ip, total=self.total)
            raise Reply(421, "4.7.0", "too many connections, try again later")
        if self.max_per_ip and self._per_ip.get(key, 0) >= self.max_per_ip:
            log.warn(
                "refused a connection from {ip}: {count} open from {key}",
                ip=ip,
                count=self._per_ip[key],
                key=key,
            )
            raise Reply(421, "4.7.0", "too many connections from your address, try again later")
        self.total += 1
        self._per_ip[key] = self._per_ip.get(key, 0) + 1
        return Ticket(self, ip, key)

    def bind_user(self, ticket: Ticket, username: str, limit: int | None = None) -> None:
        """The connection logged in (by password or IP) as ``username``, whose own limit is
        ``limit`` (None: the default; 0: none). Raises Reply(421, "4.7.0"); the session
        sends it and closes. Binding again (a new login) moves the ticket to the new user."""
        if ticket.closed:
            raise RuntimeError("ticket already closed")
        user = username.lower()
        if ticket.user == user:
            return
        limit = self.max_per_user if limit is None else limit
        if limit and self._per_user.get(user, 0) >= limit:
            log.warn(
                "refused a connection from {ip} for {user}: {limit} open",
                ip=ticket.ip,
                user=printable(user),
                limit=limit,
            )
            raise Reply(421, "4.7.0", "too many connections for this user")
        self._unbind(ticket)
        ticket.user = user
        self._per_user[user] = self._per_user.get(user, 0) + 1

    def count_message(self, ticket: Ticket) -> None:
        """At MAIL FROM, after the other MAIL checks: one more transaction on this
        connection. Raises Reply(451, "4.7.0") past ``max_messages``; the client has to
        reconnect (RSET does not help: every MAIL counts)."""
        if self.max_messages and ticket.messages >= self.max_messages:
            log.info(
                "{ip} ({user}) reached {limit} messages on one connection",
                ip=ticket.ip,
                user=ticket.user,
                limit=self.max_messages,
            )
            raise Reply(451, "4.7.0", "too many messages on this connection, reconnect and retry")
        ticket.messages += 1

    def connections(self, ip: str | None = None, user: str | None = None) -> int:
        """Open connections: in total, from ``ip`` (its counting key) or for ``user``."""
        if ip is not None:
            return self._per_ip.get(client_key(ip, self.ipv6_prefix), 0)
        if user is not None:
            return self._per_user.get(user.lower(), 0)
        return self.total

    def _unbind(self, ticket: Ticket) -> None:
        if ticket.user is not None:
            _decrement(self._per_user, ticket.user)
            ticket.user = None

    def _close(self, ticket: Ticket) -> None:
        self._unbind(ticket)
        _decrement(self._per_ip, ticket._key)
        self.total -= 1


def _decrement(counts: dict[str, int], key: str) -> None:
    """Count one less; a key at zero is dropped, so memory follows open connections."""
    if counts[key] == 1:
        del counts[key]
    else:
        counts[key] -= 1
