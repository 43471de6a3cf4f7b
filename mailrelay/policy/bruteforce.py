"""Brute-force defence for AUTH: failed logins counted per client address and per username.

The rules:

- Per client address (IPv6 by its /``ipv6_prefix``): after ``delay_after`` failures within
  ``window`` seconds, every further login attempt from that address waits before its
  credentials are checked (1, 2, 4 ... up to ``max_delay`` seconds). The wait comes
  *before* the check, so a client cannot learn the outcome early by timing the reply.
  After ``block_after`` failures the address is blocked for ``block_time`` seconds: AUTH
  gets ``421 4.7.0``.
- Per username: failures from all addresses are counted, and on reaching
  ``user_alert_after`` (0: never) within the window an alert is logged. A username is never
  delayed or locked (the soft rule): a lock by username would let anyone lock the real user
  out, and the real user logging in from another address is never slowed by failures from
  elsewhere.
- A successful login forgives that username's earlier failures from that address (a
  mistyped password), and nothing else: a valid login cannot launder failures for other
  usernames.

Every failure and every threshold crossing is logged with ``ip=`` and ``user=`` for
fail2ban. Memory is bounded: entries expire after the window (or the block), and at most
``max_entries`` addresses and usernames are tracked, the least recently seen dropped first.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailrelay.net import client_key
from mailrelay.reply import Reply
from mailrelay.text import printable

log = Logger()

# Reply(*BLOCKED): a new one each time, since a single exception raised again and again
# would keep the traceback of every raise, and every session it was raised in.
BLOCKED = (421, "4.7.0", "too many failed logins from your address, try again later")


class _Recent:
    """Recent failures for keys, each a deque of (time, other side) with the newest last."""

    def __init__(self, window: float, cap: int, max_entries: int) -> None:
        self.window = window
        self.cap = cap
        self.max_entries = max_entries
        self.entries: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()

    def add(self, key: str, now: float, other: str) -> int:
        """Record a failure; the number of failures of ``key`` within the window."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = deque(maxlen=self.cap)
            if len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        entry.append((now, other))
        return self.count(key, now)

    def count(self, key: str, now: float) -> int:
        entry = self.entries.get(key)
        if entry is None:
            return 0
        while entry and entry[0][0] <= now - self.window:
            entry.popleft()
        if not entry:
            del self.entries[key]
        return len(entry)

    def others(self, key: str) -> set[str]:
        return {other for _, other in self.entries.get(key, ())}

    def forgive(self, key: str, other: str) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            kept = [e for e in entry if e[1] != other]
            if kept:
                self.entries[key] = deque(kept, maxlen=self.cap)
            else:
                del self.entries[key]

    def forget(self, key: str) -> None:
        self.entries.pop(key, None)

    def expire(self, now: float) -> None:
        for key in [k for k, e in self.entries.items() if e[-1][0] <= now - self.window]:
            del self.entries[key]


class LoginGuard:
    """Failed-login counters and address blocks for all listeners of one daemon."""

    def __init__(
        self,
        clock: IReactorTime,
        window: float = 600.0,
        delay_after: int = 3,
        block_after: int = 10,
        block_time: float = 900.0,
        base_delay: float = 1.0,
        max_delay: float = 16.0,
        user_alert_after: int = 20,
        ipv6_prefix: int = 64,
        max_entries: int = 20_000,
    ) -> None:
        if not 0 < delay_after <= block_after:
            raise ValueError("need 0 < delay_after <= block_after")
        self.clock = clock
        self.delay_after = delay_after
        self.block_after = block_after
        self.block_time = block_time
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.user_alert_after = user_alert_after
        self.ipv6_prefix = ipv6_prefix
        self.max_entries = max_entries
        self._by_ip = _Recent(window, block_after, max_entries)
        # One over the alert threshold, so the alert is logged when the count reaches it.
        self._by_user = _Recent(window, user_alert_after + 1, max_entries)
        self._blocked: OrderedDict[str, float] = OrderedDict()  # address key -> until
        self._next_sweep = 0.0

    def configure(self, window: float, delay_after: int, block_after: int, block_time: float,
                  max_delay: float, user_alert_after: int, ipv6_prefix: int) -> None:
        """New thresholds (a reload), keeping the failures counted and the blocks in force."""
        if not 0 < delay_after <= block_after:
            raise ValueError("need 0 < delay_after <= block_after")
        self.delay_after, self.block_after, self.block_time = delay_after, block_after, block_time
        self.max_delay, self.user_alert_after = max_delay, user_alert_after
        self.ipv6_prefix = ipv6_prefix
        self._by_ip.window = self._by_user.window = window
        self._by_ip.cap, self._by_user.cap = block_after, user_alert_after + 1

    def check(self, ip: str) -> float:
        """Before checking a client's credentials (at AUTH). Raises Reply(421, "4.7.0")
        when the address is blocked (the session sends it and closes); otherwise returns
        the seconds to wait before checking them (0 for a client in good standing)."""
        now = self.clock.seconds()
        self._sweep(now)
        key = client_key(ip, self.ipv6_prefix)
        until = self._blocked.get(key)
        if until is not None:
            if now < until:
                log.info("refused a login from blocked ip={ip}", ip=ip)
                raise Reply(*BLOCKED)
            del self._blocked[key]
        return self._delay(self._by_ip.count(key, now))

    def failed(self, ip: str, username: str) -> None:
        """A login from ``ip`` as ``username`` failed (wrong password or unknown user)."""
        now = self.clock.seconds()
        key = client_key(ip, self.ipv6_prefix)
        user = printable(username.lower())
        count = self._by_ip.add(key, now, user)
        log.info(
            "login failed: ip={ip} user={user} failures={count}", ip=ip, user=user, count=count
        )
        if count >= self.block_after:
            self._by_ip.forget(key)  # after the block it starts afresh, with delays first
            self._blocked[key] = now + self.block_time
            if len(self._blocked) > self.max_entries:
                self._blocked.popitem(last=False)
            log.warn(
                "login failures: blocked ip={ip} user={user} failures={count} for {seconds:.0f} s",
                ip=ip,
                user=user,
                count=count,
                seconds=self.block_time,
            )
        elif count == self.delay_after:
            log.warn(
                "login failures: delaying ip={ip} user={user} failures={count}",
                ip=ip,
                user=user,
                count=count,
            )
        user_count = self._by_user.add(user, now, key)
        if user_count == self.user_alert_after:
            log.warn(
                "login failures: user={user} failures={count} from {addresses} addresses "
                "within {window:.0f} s, last ip={ip}",
                user=user,
                count=user_count,
                addresses=len(self._by_user.others(user)),
                window=self._by_user.window,
                ip=ip,
            )

    def succeeded(self, ip: str, username: str) -> None:
        """A login from ``ip`` as ``username`` succeeded: forgive its own earlier failures."""
        key = client_key(ip, self.ipv6_prefix)
        user = printable(username.lower())
        self._by_ip.forgive(key, user)
        self._by_user.forgive(user, key)

    def _delay(self, failures: int) -> float:
        if failures < self.delay_after:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** (failures - self.delay_after))

    def _sweep(self, now: float) -> None:
        """Every minute at most: drop expired blocks and counters nobody touched lately."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 60.0
        self._by_ip.expire(now)
        self._by_user.expire(now)
        for key in [k for k, until in self._blocked.items() if until <= now]:
            del self._blocked[key]
