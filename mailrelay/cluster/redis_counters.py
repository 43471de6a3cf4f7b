"""The limits that must hold across several relays, counted in one Redis.

Each class here has the shape of an in-process limiter of mailrelay/policy/ (RateLimiter,
ConnectionLimits, LoginGuard) and is chosen by service.py when ``[cluster] redis`` is set;
its methods return Deferreds where the in-process ones answer at once. Every check is one
Lua script (scripts.py), atomic in Redis and timed by Redis's clock, so a limit holds
exactly however the clients are spread over the nodes:

- rate limits: a hash of fixed slots per user and window; a unit is reserved at MAIL (or
  RCPT), moved to the commit time when the message is spooled, given back on abort;
- connections per address and per user: leases in a sorted set, each expiring
  ``lease_time`` after its node last renewed it (every ``lease_time / 3``), so the places of
  a node that died are free again within ``lease_time``; the total per node and the
  messages per connection stay in process (they are one node's by nature);
- failed logins per address and per username, and the address blocks;
- quotas (messages per UTC day and month, per user and per account): a hash per quota
  holding its period, its count, the warnings reported and the open transactions' places.

When Redis does not answer (``timeout``, or no connection), ``[cluster] redis_down``
decides: ``refuse`` (the default) answers ``451 4.3.0`` (``421 4.3.0`` instead of a
greeting), ``local`` counts in process against each limit divided by ``[cluster] nodes``
until Redis is back. Each change between the two is logged once.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.cluster import scripts
from mailrelay.cluster.connection import RedisClient, RedisError, connect
from mailrelay.config import ConfigError
from mailrelay.interfaces import (
    IConnectionLimits,
    ILoginGuard,
    IQuotaCounter,
    IQuotaReservation,
    IRateLimiter,
    IReservation,
)
from mailrelay.net import client_key
from mailrelay.policy.bruteforce import BLOCKED, LoginGuard
from mailrelay.policy.connections import ConnectionLimits
from mailrelay.policy.quota import (
    Crossing,
    Quota,
    QuotaCounter,
    Usage,
    quotas_of,
    refusal_logged,
)
from mailrelay.policy.ratelimit import RateLimiter, Unit
from mailrelay.reply import Reply
from mailrelay.text import printable
from mailrelay.tls import TLSSetupError

log = Logger()
# The limiters' events under the in-process limiters' names, so that a log reader
# (fail2ban, "Password guessing" in the README) sees the same lines on one node or many.
_rates_log = Logger(namespace="mailrelay.policy.ratelimit")
_connections_log = Logger(namespace="mailrelay.policy.connections")
_logins_log = Logger(namespace="mailrelay.policy.bruteforce")

DOWN = "shared counters unavailable, try again later"
HOUR_US, MINUTE_US = 3600 * 10**6, 60 * 10**6  # the windows, as the scripts count them


class RedisDown(Exception):
    """Redis did not answer in time, or there is no connection to it."""


def share(limit: int | None, nodes: int) -> int | None:
    """One node's part of a limit while it counts alone (0 and None stay off)."""
    return max(1, limit // nodes) if limit else limit


_HASHES: dict[str, str] = {}  # script -> its SHA-1, for EVALSHA


def _unknown_script(failure, client: RedisClient, script: str, keys: list, args: list):
    """A Redis that does not know the script yet (its first use, or after a restart) gets
    it in full once; EVALSHA finds it from then on."""
    if not failure.check(RedisError) or "NOSCRIPT" not in failure.getErrorMessage():
        return failure
    return client.call("EVAL", script, len(keys), *keys, *args)


class RedisCounters:
    """The connection to Redis and what to do without it, shared by the limiters here.

    ``client`` is the connection.RedisClient (one connection: commands are pipelined on
    it in the order they were sent, which a lease's drop after its renewal needs).
    """

    def __init__(self, client: RedisClient, clock: IReactorTime, prefix: str = "mailrelay:",
                 timeout: float = 1.0, down: str = "refuse", nodes: int = 1,
                 node_id: str = "") -> None:
        if down not in ("refuse", "local"):
            raise ValueError(f"down must be 'refuse' or 'local', not {down!r}")
        self.client = client
        self.clock = clock
        self.prefix = prefix
        self.timeout = timeout
        self.down = down
        self.nodes = nodes
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.up = True
        self.closing = False  # the relay stops: what fails now is not Redis's doing

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def run(self, script: str, keys: list[str], args: list) -> defer.Deferred:
        """One script call; errbacks with RedisDown when Redis cannot answer now."""
        if self.client.connection is None and not self.up:
            return defer.fail(RedisDown("not connected"))  # no wait for the timeout
        # By the script's hash: Redis keeps the scripts it has seen.
        sha = _HASHES.get(script) or _HASHES.setdefault(
            script, hashlib.sha1(script.encode()).hexdigest())
        d = self.client.call("EVALSHA", sha, len(keys), *keys, *args)
        d.addErrback(_unknown_script, self.client, script, keys, args)
        d.addCallbacks(self._answered, self._failed)
        return d

    def _answered(self, result):
        if not self.up:
            self.up = True
            log.warn("Redis answers again: limits are shared across nodes again")
        return result

    def _failed(self, failure):
        if failure.check(Reply):
            return failure
        if failure.check(defer.TimeoutError, defer.CancelledError):
            reason = f"no answer within {self.timeout:g} s"
            if self.client.failure:
                reason += f"; {self.client.failure}"
        elif failure.check(ConnectionError):
            reason = failure.getErrorMessage() or failure.type.__name__
        else:
            return failure  # a script error: a bug, logged where it is caught
        self.went_down(reason)
        raise RedisDown(reason)

    def went_down(self, reason: str) -> None:
        if self.up and not self.closing:
            self.up = False
            if self.down == "local":
                log.error("Redis unreachable ({reason}): each limit counted on this node "
                          "alone, at 1/{nodes} of it", reason=reason, nodes=self.nodes)
            else:
                log.error("Redis unreachable ({reason}): refusing with 451 4.3.0 until it "
                          "answers", reason=reason)

    def fallback(self, failure, local, refusal: int = 451):
        """The errback of a check: ``local()`` in local mode, else the temporary refusal."""
        failure.trap(RedisDown)
        if self.down == "local":
            return local()
        raise Reply(refusal, "4.3.0", DOWN)


# ---- rate limits ----


@implementer(IRateLimiter)
class RedisRateLimiter:
    """RateLimiter's limits (per user, per hour and per minute) counted in Redis."""

    def __init__(self, counters: RedisCounters, per_hour: int | None = 200_000,
                 per_minute: int | None = None, unit: Unit = "messages",
                 slots: int = 60) -> None:
        if unit not in ("messages", "recipients"):
            raise ValueError(f"unit must be 'messages' or 'recipients', not {unit!r}")
        self.counters = counters
        self.clock = counters.clock
        self.per_hour = per_hour
        self.per_minute = per_minute
        self.unit: Unit = unit
        self.slots = slots
        self.local = RateLimiter(counters.clock, unit=unit, slots=slots)

    def transaction(self, user: str, per_hour: int | None = None,
                    per_minute: int | None = None) -> defer.Deferred:
        """Fires with a RedisReservation; errbacks with Reply(451, "4.7.1") over a limit."""
        n = 1 if self.unit == "messages" else 0
        return self.reserve(user, n, per_hour, per_minute)

    def reserve(self, user: str, n: int = 1, per_hour: int | None = None,
                per_minute: int | None = None) -> defer.Deferred:
        reservation = RedisReservation(
            self, user.lower(), self.per_hour if per_hour is None else per_hour,
            self.per_minute if per_minute is None else per_minute)
        return reservation.add(n).addCallback(lambda _: reservation)

    def _keys(self, user: str) -> list[str]:
        return [self.counters.key("rate", user, "hour"), self.counters.key("rate", user, "minute")]

    def _refuse(self, user: str, n: int, limits: tuple, answer: list) -> Reply:
        _, window, retry = answer
        limit, per = limits[window - 1], ("hour", "minute")[window - 1]
        text = f"rate limit of {limit} {self.unit} per {per} exceeded"
        _rates_log.info("rate limit: {user} over {limit} {unit} per {per}, retry in {retry} s",
                        user=user, limit=limit, unit=self.unit, per=per, retry=retry)
        if n > limit:
            return Reply(451, "4.7.1", text)
        return Reply(451, "4.7.1", f"{text}, try again in {max(1, retry)} seconds")


@implementer(IReservation)
class RedisReservation:
    """Units held in Redis for one transaction (or, while Redis is down in local mode, in
    the node's own RateLimiter at its share of the limits)."""

    def __init__(self, limiter: RedisRateLimiter, user: str, per_hour: int | None,
                 per_minute: int | None) -> None:
        self.user = user
        self.count = 0
        self._limiter = limiter
        self._limits = (per_hour or 0, per_minute or 0)
        self._held: list[tuple[str, str, int]] = []  # (hour slot, minute slot, n)
        self._since = (0, 0.0)  # Redis's time (us) at the last reservation, ours then
        self._local = None
        self._state = "open"

    def recipient(self):
        if self._limiter.unit == "recipients":
            return self.add(1)
        return None

    def add(self, n: int = 1) -> defer.Deferred:
        if self._state != "open":
            raise RuntimeError(f"reservation already {self._state}")
        if n <= 0:
            return defer.succeed(None)
        if self._local is not None:
            return defer.maybeDeferred(self._local.add, n).addCallback(self._added, n)
        if not any(self._limits):  # no limit: nothing to count
            self.count += n
            return defer.succeed(None)
        limiter = self._limiter
        d = limiter.counters.run(scripts.RATE_RESERVE, limiter._keys(self.user),
                                 [limiter.slots, n, *self._limits])
        d.addCallbacks(self._reserved, limiter.counters.fallback, callbackArgs=(n,),
                       errbackArgs=(lambda: self._add_locally(n),))
        return d

    def _reserved(self, answer: list, n: int) -> None:
        if not answer[0]:
            raise self._limiter._refuse(self.user, n, self._limits, answer)
        if self._state != "open":  # released while the script ran: give them back
            self._limiter.counters.run(scripts.RATE_GIVE_BACK, self._limiter._keys(self.user),
                                       [self._limiter.slots, 0, 0, answer[1], answer[2], n]
                                       ).addErrback(lambda f: None)
            return
        self._held.append((answer[1], answer[2], n))
        self._since = (answer[3], self._limiter.clock.seconds())
        self.count += n

    def _add_locally(self, n: int) -> None:
        """Redis is down: this transaction's further units count on this node alone."""
        nodes = self._limiter.counters.nodes
        if self._local is None:
            self._local = self._limiter.local.reserve(
                self.user, 0, share(self._limits[0], nodes) or 0,
                share(self._limits[1], nodes) or 0)
        self._local.add(n)
        self._added(None, n)

    def _added(self, _, n: int) -> None:
        self.count += n

    def commit(self):
        if self._state == "released":
            raise RuntimeError("reservation already released")
        if self._state == "committed":
            return None
        self._state = "committed"
        if self._local is not None:
            self._local.commit()
        if self._in_place():
            self._held = []
            return None
        n = sum(n for _, _, n in self._held)
        return self._give_back(*(n if limit else 0 for limit in self._limits))

    def _in_place(self) -> bool:
        """True when every unit is still in the slot of the commit time (then moving it to
        the commit time changes nothing, and costs no call): the usual case, as an hour's
        slots are a minute wide. Redis's time now is estimated from its time at the last
        reservation plus the time passed here since, with a margin of 100 ms."""
        redis_us, then = self._since
        now_us = redis_us + (self._limiter.clock.seconds() - then + 0.1) * 1e6
        slots = self._limiter.slots
        return all(slot == "" or int(slot) == int(now_us // (span / slots))
                   for hour, minute, _ in self._held
                   for slot, span in ((hour, HOUR_US), (minute, MINUTE_US)))

    def release(self):
        if self._state != "open":
            return None
        self._state = "released"
        if self._local is not None:
            self._local.release()
        self.count = 0
        return self._give_back(0, 0)

    def _give_back(self, hour: int, minute: int):
        """Give the units held back, and count ``hour`` and ``minute`` units now."""
        held, self._held = self._held, []
        if not held:
            return None
        limiter = self._limiter
        args = [limiter.slots, hour, minute, *itertools.chain.from_iterable(held)]
        d = limiter.counters.run(scripts.RATE_GIVE_BACK, limiter._keys(self.user), args)
        # Units not given back stay counted until their slot leaves the window: a refused
        # message may cost its sender one unit for an hour, never more than was reserved.
        return d.addErrback(lambda f: f.trap(RedisDown) and None)


# ---- quotas ----


class _ShareOfQuotas(QuotaCounter):
    """A node's own count while Redis is down (local mode): each quota divided by nodes."""

    def __init__(self, clock: IReactorTime, nodes: int) -> None:
        super().__init__(clock)
        self.nodes = nodes
        self.per = (0, 0)

    def quotas(self, user, account) -> list[Quota]:
        per_day, per_month = self.per
        return [Quota(q.subject, q.name, q.period, share(q.limit, self.nodes) or 0)
                for q in quotas_of(user, account, per_day, per_month)]


@implementer(IQuotaCounter)
class RedisQuotaCounter:
    """policy.quota.QuotaCounter's quotas counted in Redis: one script call at MAIL (the
    places, all or none), one at the commit (the count and the thresholds crossed, each
    reported by exactly one node), one when a transaction is aborted.

    A place is held for ``hold`` seconds at most: the places of a node that died are free
    again after that (a transaction open longer may then go one message over)."""

    def __init__(self, counters: RedisCounters, per_day: int | None = 0,
                 per_month: int | None = 0, hold: float = 3600.0) -> None:
        self.counters = counters
        self.clock = counters.clock
        self.per_day = per_day
        self.per_month = per_month
        self.hold_ms = int(hold * 1000)
        self.local = _ShareOfQuotas(counters.clock, counters.nodes)
        self._seq = itertools.count(1)

    def quotas(self, user, account) -> list[Quota]:
        return quotas_of(user, account, self.per_day, self.per_month)

    def key(self, quota: Quota) -> str:
        return self.counters.key("quota", quota.subject, quota.name.lower(), quota.period[0])

    def args(self, quotas: list[Quota]) -> list:
        return list(itertools.chain.from_iterable((q.period[0], q.limit) for q in quotas))

    def reserve(self, user, account) -> defer.Deferred:
        """Fires with a RedisQuotaReservation; errbacks with QuotaExceeded (451 4.7.1)."""
        quotas = self.quotas(user, account)
        if not quotas:
            return defer.succeed(RedisQuotaReservation(self, [], "", []))
        member = f"{self.counters.node_id}:{next(self._seq)}"
        d = self.counters.run(scripts.QUOTA_RESERVE, [self.key(q) for q in quotas],
                              [member, self.hold_ms, *self.args(quotas)])

        def answered(answer: list):
            if not answer[0]:
                _, i, used, pid, first = answer
                raise refusal_logged(quotas[i - 1], used, _text(pid), bool(first))
            usage = [Usage(q, answer[2 + 2 * i], _text(answer[1 + 2 * i]))
                     for i, q in enumerate(quotas)]
            return RedisQuotaReservation(self, quotas, member, usage)

        def locally():
            self.local.per = (self.per_day, self.per_month)
            return self.local.reserve(user, account)

        return d.addCallbacks(answered, self.counters.fallback, errbackArgs=(locally,))

    def count(self, user, account) -> defer.Deferred:
        """One message counted whatever the quotas say (an admin's release of a held
        message: policy/quotahold.py); fires with the Crossings. The commit script counts
        and gives up a place this member never took, which costs nothing."""
        quotas = self.quotas(user, account)
        member = f"{self.counters.node_id}:{next(self._seq)}"
        return RedisQuotaReservation(self, quotas, member, []).commit()

    def usage(self, user, account) -> defer.Deferred:
        """Fires with the quotas' Usage in Redis (read only)."""
        quotas = self.quotas(user, account)
        if not quotas:
            return defer.succeed([])
        d = self.counters.run(scripts.QUOTA_USAGE, [self.key(q) for q in quotas],
                              [q.period[0] for q in quotas])
        return d.addCallback(lambda answer: [
            Usage(q, answer[3 * i + 1], _text(answer[3 * i]), answer[3 * i + 2])
            for i, q in enumerate(quotas)])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@implementer(IQuotaReservation)
class RedisQuotaReservation:
    def __init__(self, counter: RedisQuotaCounter, quotas: list[Quota], member: str,
                 usage: list[Usage]) -> None:
        self.usage = usage
        self._counter = counter
        self._quotas = quotas
        self._member = member
        self._state = "open"

    def commit(self) -> defer.Deferred:
        """Fires with the Crossings of this message (each reported by one node only)."""
        if self._state != "open" or not self._quotas:
            self._state = "committed"
            return defer.succeed([])
        self._state = "committed"
        c = self._counter
        d = c.counters.run(scripts.QUOTA_COMMIT, [c.key(q) for q in self._quotas],
                           [self._member, c.hold_ms, *c.args(self._quotas)])

        def counted(answer: list) -> list[Crossing]:
            return [Crossing(q, answer[3 * i + 1], answer[3 * i], _text(answer[3 * i + 2]))
                    for i, q in enumerate(self._quotas) if answer[3 * i + 1]]

        def lost(failure):
            failure.trap(RedisDown)
            log.error("Redis unreachable: a message of {quota} was not counted",
                      quota=self._quotas[0].describe())
            return []

        return d.addCallbacks(counted, lost)

    def release(self):
        if self._state != "open":
            return None
        self._state = "released"
        if not self._quotas:
            return None
        c = self._counter
        d = c.counters.run(scripts.QUOTA_RELEASE, [c.key(q) for q in self._quotas],
                           [self._member])
        # A place not given back lapses after ``hold``.
        return d.addErrback(lambda f: f.trap(RedisDown) and None)


# ---- connections ----


class RedisTicket:
    """One open connection's leases (and its place in the node's own counters)."""

    def __init__(self, limits: RedisConnectionLimits, ip: str, key: str, seq: int) -> None:
        self.ip = ip
        self.user: str | None = None
        self.messages = 0
        self.closed = False
        self.member = f"{limits.counters.node_id}:{seq}"
        self.leases: dict[str, str] = {}  # set key -> "ip" or "user"
        self.local = None  # the node's own Ticket: the total, and the shares while down
        self._limits = limits
        self._key = key

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._limits._close(self)


@implementer(IConnectionLimits)
class RedisConnectionLimits:
    """ConnectionLimits with the per-address and per-user counts as leases in Redis;
    ``max_total`` (this node's connections) and the messages per connection stay here."""

    def __init__(self, counters: RedisCounters, max_total: int = 500, max_per_ip: int = 50,
                 max_per_user: int = 40, max_messages: int = 2500, ipv6_prefix: int = 64,
                 lease_time: float = 30.0) -> None:
        self.counters = counters
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_per_user = max_per_user
        self.max_messages = max_messages
        self.ipv6_prefix = ipv6_prefix
        self.lease_time = lease_time
        self.local = ConnectionLimits(max_total, 0, 0, max_messages, ipv6_prefix)
        self.open_tickets: set[RedisTicket] = set()
        self._seq = itertools.count(1)

    def open(self, ip: str):
        """Fires with a RedisTicket; errbacks with Reply(421, "4.7.0") over a limit."""
        key = client_key(ip, self.ipv6_prefix)
        local = self._local().open(ip)  # the node's total
        ticket = RedisTicket(self, ip, key, next(self._seq))
        ticket.local = local
        self.open_tickets.add(ticket)
        if not self.max_per_ip:
            return ticket

        def locally():  # this node's connections from there (this one included)
            if self.local.connections(ip=ip) > share(self.max_per_ip, self.counters.nodes):
                return False
            return None

        d = self._take(ticket, self.counters.key("conn", "ip", key), "ip", self.max_per_ip,
                       locally)
        d.addCallback(lambda taken: self._opened(ticket, taken))
        d.addErrback(self._undo, ticket)
        return d

    def _opened(self, ticket: RedisTicket, taken):
        if taken is False:
            _connections_log.warn(
                "refused a connection from {ip}: {limit} open from {key} on all nodes",
                ip=ticket.ip, limit=self.max_per_ip, key=ticket._key)
            raise Reply(421, "4.7.0", "too many connections from your address, try again later")
        return ticket

    def _undo(self, failure, ticket: RedisTicket):
        ticket.close()
        return failure

    def bind_user(self, ticket: RedisTicket, username: str, limit: int | None = None):
        """Errbacks with Reply(421, "4.7.0") when the user has too many connections."""
        if ticket.closed:
            raise RuntimeError("ticket already closed")
        user = username.lower()
        if ticket.user == user:
            return None
        limit = self.max_per_user if limit is None else limit
        old = [k for k, kind in ticket.leases.items() if kind == "user"]
        key = self.counters.key("conn", "user", user)

        def locally():  # this node's connections of the user
            self._local().bind_user(ticket.local, user, share(limit, self.counters.nodes))

        d = (self._take(ticket, key, "user", limit, locally, 451) if limit
             else defer.succeed(True))

        def bound(taken):
            if taken is False:
                _connections_log.warn(
                    "refused a connection from {ip} for {user}: {limit} open on all nodes",
                    ip=ticket.ip, user=printable(user), limit=limit)
                raise Reply(421, "4.7.0", "too many connections for this user")
            self._drop(ticket, [k for k in old if k != key])
            if ticket.local.user != user:  # counted here too, for the share without Redis
                self._local().bind_user(ticket.local, user, 0)
            ticket.user = user

        return d.addCallback(bound)

    def count_message(self, ticket: RedisTicket) -> None:
        self.local.count_message(ticket.local)
        ticket.messages = ticket.local.messages

    def connections(self, ip: str | None = None, user: str | None = None) -> int:
        """This node's own open connections (all nodes': the sorted sets in Redis)."""
        return self.local.connections(ip, user)

    def _local(self) -> ConnectionLimits:
        """The node's own counters of all its connections: the total is checked there; the
        shares of the other limits only while Redis is down in local mode."""
        self.local.max_total, self.local.ipv6_prefix = self.max_total, self.ipv6_prefix
        return self.local

    def _take(self, ticket: RedisTicket, key: str, kind: str, limit: int, locally,
              refusal: int = 421):
        """Take the ticket's lease in ``key``; fires with False over ``limit``. Without
        Redis: ``locally()``, or Reply(``refusal``, "4.3.0")."""
        ms = int(self.lease_time * 1000)
        d = self.counters.run(scripts.LEASE_TAKE, [key], [limit, ticket.member, ms])

        def answered(answer):
            if not answer[0]:
                return False
            ticket.leases[key] = kind
            if ticket.closed:  # gone while the script ran
                self._drop(ticket, [key])
            return True

        d.addCallbacks(answered, self.counters.fallback, errbackArgs=(locally, refusal))
        return d

    def _drop(self, ticket: RedisTicket, keys: list[str]) -> None:
        keys = [k for k in keys if ticket.leases.pop(k, None)]
        if keys:
            # Not dropped (Redis down): the lease expires within lease_time.
            self.counters.run(scripts.LEASE_DROP, keys, [ticket.member] * len(keys)
                              ).addErrback(lambda f: f.trap(RedisDown) and None)

    def _close(self, ticket: RedisTicket) -> None:
        self.open_tickets.discard(ticket)
        ticket.local.close()
        self._drop(ticket, list(ticket.leases))

    def renew(self) -> defer.Deferred:
        """Every node renews the leases of its open connections (the heartbeat)."""
        keys, members = [], []
        for ticket in self.open_tickets:
            for key in ticket.leases:
                keys.append(key)
                members.append(ticket.member)
        if not keys:
            return defer.succeed(0)
        d = self.counters.run(scripts.LEASE_RENEW, keys,
                              [int(self.lease_time * 1000), *members])
        d.addErrback(lambda f: f.trap(RedisDown) and None)
        # Anything else is logged; the heartbeat must go on.
        return d.addErrback(lambda f: log.failure("renewing the connection leases", f))


# ---- failed logins ----


@implementer(ILoginGuard)
class RedisLoginGuard:
    """LoginGuard's counters (failures per address and per username, address blocks) in
    Redis; the delays and thresholds are LoginGuard's."""

    def __init__(self, counters: RedisCounters, window: float = 600.0, delay_after: int = 3,
                 block_after: int = 10, block_time: float = 900.0, base_delay: float = 1.0,
                 max_delay: float = 16.0, user_alert_after: int = 20,
                 ipv6_prefix: int = 64) -> None:
        self.counters = counters
        self.clock = counters.clock
        self.base_delay = base_delay
        self.local = LoginGuard(counters.clock, base_delay=base_delay)
        self.configure(window, delay_after, block_after, block_time, max_delay,
                       user_alert_after, ipv6_prefix)

    def configure(self, window: float, delay_after: int, block_after: int, block_time: float,
                  max_delay: float, user_alert_after: int, ipv6_prefix: int) -> None:
        """New thresholds (a reload); the node's own guard, used while Redis is down in
        local mode, gets its share of them."""
        if not 0 < delay_after <= block_after:
            raise ValueError("need 0 < delay_after <= block_after")
        self.window, self.delay_after, self.block_after = window, delay_after, block_after
        self.block_time, self.max_delay = block_time, max_delay
        self.user_alert_after, self.ipv6_prefix = user_alert_after, ipv6_prefix
        n = self.counters.nodes
        self.local.configure(window, min(delay_after, share(block_after, n)),
                             share(block_after, n), block_time, max_delay,
                             share(user_alert_after, n), ipv6_prefix)

    def _keys(self, key: str) -> list[str]:
        return [self.counters.key("login", "ip", key), self.counters.key("login", "block", key)]

    def check(self, ip: str) -> defer.Deferred:
        """Fires with the seconds to wait; errbacks with Reply(421, "4.7.0") when blocked."""
        key = client_key(ip, self.ipv6_prefix)
        d = self.counters.run(scripts.LOGIN_CHECK, self._keys(key),
                              [int(self.window * 1000)])

        def answered(answer):
            if answer[0]:
                _logins_log.info("refused a login from blocked ip={ip}", ip=ip)
                raise Reply(*BLOCKED)
            return self._delay(answer[1])

        return d.addCallbacks(answered, self.counters.fallback,
                              errbackArgs=(lambda: self.local.check(ip),))

    def failed(self, ip: str, username: str) -> defer.Deferred:
        key = client_key(ip, self.ipv6_prefix)
        user = printable(username.lower())
        keys = [*self._keys(key), self.counters.key("login", "user", user),
                self.counters.key("login", "seq")]
        args = [int(self.window * 1000), self.block_after, int(self.block_time * 1000),
                self.user_alert_after + 1, user, key, self.user_alert_after]
        d = self.counters.run(scripts.LOGIN_FAILED, keys, args)
        d.addCallback(self._counted, ip, user)
        # Nothing to refuse (the 535 is due anyway): without Redis, this node counts it.
        return d.addErrback(lambda f: f.trap(RedisDown) and self.local.failed(ip, username))

    def _counted(self, answer: list, ip: str, user: str) -> None:
        count, blocked, user_count, addresses = answer
        say = _logins_log
        say.info("login failed: ip={ip} user={user} failures={count}", ip=ip, user=user,
                 count=count)
        if blocked:
            say.warn("login failures: blocked ip={ip} user={user} failures={count} for "
                     "{seconds:.0f} s", ip=ip, user=user, count=count, seconds=self.block_time)
        elif count == self.delay_after:
            say.warn("login failures: delaying ip={ip} user={user} failures={count}", ip=ip,
                     user=user, count=count)
        if user_count == self.user_alert_after:
            say.warn("login failures: user={user} failures={count} from {addresses} addresses "
                     "within {window:.0f} s, last ip={ip}", user=user, count=user_count,
                     addresses=addresses, window=self.window, ip=ip)

    def succeeded(self, ip: str, username: str) -> defer.Deferred:
        key = client_key(ip, self.ipv6_prefix)
        user = printable(username.lower())
        self.local.succeeded(ip, username)
        d = self.counters.run(scripts.LOGIN_FORGIVE,
                              [self._keys(key)[0], self.counters.key("login", "user", user)],
                              [user, key])
        return d.addErrback(lambda f: f.trap(RedisDown) and None)

    def _delay(self, failures: int) -> float:
        if failures < self.delay_after:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** (failures - self.delay_after))


class LeaseRenewal(Service):
    """This node's heartbeat: renews its connection leases every ``lease_time / 3``; on
    stop, closes the connection to Redis."""

    name = "cluster-leases"

    def __init__(self, limits: RedisConnectionLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self._loop = LoopingCall(limits.renew)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.limits.lease_time / 3, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.limits.counters.closing = True
        return self.limits.counters.client.disconnect()


def shared_limiters(config, reactor):
    """``(connections, rates, logins, quotas)`` counted in the Redis of ``[cluster]``,
    with the limits of ``[limits]`` and ``[policy]``."""
    c, limits, p = config.cluster, config.limits, config.policy
    try:
        client = connect(c.redis, reactor, c.redis_password, c.redis_timeout, c.redis_ca_file,
                         c.redis_certificate, c.redis_key, c.redis_sentinel_password)
    except TLSSetupError as e:
        ca = c.redis_ca_file and str(e).startswith(f"{c.redis_ca_file}:")
        key = "redis_ca_file" if ca else "redis_certificate"
        raise ConfigError(config.source, "cluster", key, str(e))
    counters = RedisCounters(client, reactor,
                             prefix=c.prefix, timeout=c.redis_timeout, down=c.redis_down,
                             nodes=c.nodes, node_id=c.node_id)
    log.info("limits shared through Redis at {url} as node {node}",
             url=c.redis.split("@")[-1], node=counters.node_id)
    connections = RedisConnectionLimits(
        counters, max_total=limits.max_connections, max_per_ip=limits.max_connections_per_ip,
        max_per_user=limits.max_connections_per_user, max_messages=0,
        ipv6_prefix=p.ipv6_prefix, lease_time=c.lease_time)
    rates = RedisRateLimiter(counters, per_hour=limits.rate_per_hour,
                             per_minute=limits.rate_per_minute or None, unit=limits.rate_counts)
    logins = RedisLoginGuard(counters, window=p.login_window, delay_after=p.login_delay_after,
                             block_after=p.login_block_after, block_time=p.login_block_time,
                             max_delay=p.login_max_delay,
                             user_alert_after=p.login_user_alert_after,
                             ipv6_prefix=p.ipv6_prefix)
    quotas = RedisQuotaCounter(counters, per_day=limits.quota_per_day,
                               per_month=limits.quota_per_month)
    return connections, rates, logins, quotas
