"""Sending quotas: messages per UTC calendar day and month, per user and per account.

Beside the hourly rate limit (ratelimit.py, a sliding window that protects the relay from
bursts), a quota is what a customer buys: so many messages a day or a month, counted in
calendar periods in UTC (a day from 00:00 UTC, a month from the 1st at 00:00 UTC), so that
everyone reads the same reset time. A *message* is one accepted transaction, however many
recipients it has (as the hourly limit counts with ``rate_counts = messages``); it counts
once, when it is spooled.

Counting is exact however many sessions a user runs: a session *reserves* a place in each
quota at MAIL (refused with ``451 4.7.1`` when the quota is used up, its text naming the
quota and when it resets), the place counts at once, and the reservation is either
committed (the message was spooled) or given back (RSET, refusal, disconnect).

Each commit says which warning thresholds it crossed (80, 90 and 100 percent), each once
per quota and period: the caller (quotawarn.py) tells the account. A refusal of a quota
that was never reported as full (its limit was lowered) reports the 100 % too, so a
refusal is never the first the account hears of it.

The counts survive a restart: QuotaStore keeps them in a small SQLite file, written in
batches (QuotaWriter) and read back when the relay starts. Several nodes count in Redis
instead (cluster/redis_counters.py: RedisQuotaCounter).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.features.db import SqliteStore
from mailrelay.flushing import BatchWriter
from mailrelay.interfaces import IQuotaCounter, IQuotaReservation
from mailrelay.model import Account, SmtpUser, utc_text
from mailrelay.reply import Reply

log = Logger()

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")
PERCENTS = (80, 90, 100)


def period_id(period: Period, now: float) -> str:
    """The UTC calendar period ``now`` is in: ``2026-12-06`` (day) or ``2026-12`` (month)."""
    return time.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", time.gmtime(now))


def period_end(period: Period, pid: str) -> float:
    """The unix time the period ``pid`` ends (the next one starts), in UTC."""
    if period == "day":
        y, m, d = (int(x) for x in pid.split("-"))
        return calendar.timegm((y, m, d, 0, 0, 0)) + 86400
    y, m = (int(x) for x in pid.split("-"))
    y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return calendar.timegm((y, m, 1, 0, 0, 0))


@dataclass(frozen=True)
class Quota:
    """One quota that applies to a message: whose (a user or an account), which period."""

    subject: Literal["user", "account"]
    name: str
    period: Period
    limit: int

    @property
    def key(self) -> str:
        return f"{self.subject}:{self.name.lower()}:{self.period}"

    def describe(self) -> str:
        """``daily quota of 500 messages of user app``."""
        kind = "daily" if self.period == "day" else "monthly"
        return f"{kind} quota of {self.limit} messages of {self.subject} {self.name}"


def quotas_of(user: SmtpUser, account: Account | None, per_day: int | None = 0,
              per_month: int | None = 0) -> list[Quota]:  # fmt: skip
    """The quotas a message of ``user`` counts against: the user's own (its ``quota_day``
    and ``quota_month``; None: ``per_day``/``per_month``; 0: none) and its account's."""
    out: list[Quota] = []
    for period, own, default in (("day", user.quota_day, per_day),
                                 ("month", user.quota_month, per_month)):  # fmt: skip
        limit = default if own is None else own
        if limit:
            out.append(Quota("user", user.username, period, limit))
    if account is not None:
        for period, limit in (("day", account.quota_day), ("month", account.quota_month)):
            if limit:
                out.append(Quota("account", account.name, period, limit))
    return out


def percent_reached(used: int, limit: int, warned: int) -> int:
    """The highest threshold ``used`` of ``limit`` has reached beyond ``warned`` (0: none).
    80 % of 10 is reached by the 8th message: ``used * 100 >= limit * percent``."""
    reached = [p for p in PERCENTS if used * 100 >= limit * p]
    return reached[-1] if reached and reached[-1] > warned else 0


@dataclass(frozen=True)
class Crossing:
    """A quota reached a warning threshold: ``used`` of its limit counted in ``pid``."""

    quota: Quota
    percent: int
    used: int
    pid: str

    @property
    def resets(self) -> float:
        return period_end(self.quota.period, self.pid)


@dataclass(frozen=True)
class Usage:
    """A quota's state: ``used`` messages counted in the period ``pid``, ``held`` places
    of open transactions."""

    quota: Quota
    used: int
    pid: str
    held: int = 0

    @property
    def full(self) -> bool:
        """The next MAIL is refused: what is counted and held leaves no place."""
        return self.used + self.held >= self.quota.limit

    def to_json(self) -> dict:
        q = self.quota
        return {"subject": q.subject, "name": q.name, "period": q.period, "limit": q.limit,
                "used": self.used, "held": self.held,
                "resets": utc_text(period_end(q.period, self.pid))}


def first_full(usage: list[Usage]) -> QuotaExceeded | None:
    """The refusal the next MAIL gets from these quotas (None: it passes), as the counters
    decide it; for ``mailrelay-admin explain``, which changes nothing."""
    for u in usage:
        if u.full:
            return QuotaExceeded(u.quota, u.used, u.pid, False)
    return None


class QuotaExceeded(Reply):
    """``451 4.7.1``: a quota is used up. ``crossing``: its 100 %, when this refusal is
    the first to report it (the limit was lowered below what was already sent)."""

    def __init__(self, quota: Quota, used: int, pid: str, first: bool) -> None:
        resets = period_end(quota.period, pid)
        super().__init__(451, "4.7.1", f"{quota.describe()} reached, it resets at "
                                       f"{utc_text(resets)}")
        self.quota = quota
        self.resets = resets
        self.crossing = Crossing(quota, 100, used, pid) if first else None


def refusal_logged(quota: Quota, used: int, pid: str, first: bool) -> QuotaExceeded:
    # "full", not "refused": a user whose mail over quota is held is not refused (the
    # session logs what it does instead: policy/submission.py).
    log.info("quota: {subject} {name} at {used} of {limit} messages per {period}, full",
             subject=quota.subject, name=quota.name, used=used, limit=quota.limit,
             period=quota.period)
    return QuotaExceeded(quota, used, pid, first)


class _Count:
    __slots__ = ("pid", "used", "warned")

    def __init__(self, pid: str, used: int = 0, warned: int = 0) -> None:
        self.pid, self.used, self.warned = pid, used, warned


@implementer(IQuotaCounter)
class QuotaCounter:
    """Every quota of one relay, in the reactor thread (exact, synchronous).

    ``per_day``/``per_month``: the default quotas of users without their own (0: none).
    ``store``: where counts are kept across restarts (a QuotaWriter); None: memory only.
    """

    def __init__(self, clock: IReactorTime, per_day: int | None = 0,
                 per_month: int | None = 0, store: QuotaWriter | None = None) -> None:
        self.clock = clock
        self.per_day = per_day
        self.per_month = per_month
        self.store = store
        self._counts: dict[str, _Count] = dict(store.loaded) if store is not None else {}
        self._open: dict[str, int] = {}

    def quotas(self, user: SmtpUser, account: Account | None) -> list[Quota]:
        return quotas_of(user, account, self.per_day, self.per_month)

    def _count(self, quota: Quota, now: float) -> _Count:
        """The quota's count in the period of ``now`` (a new period starts from 0)."""
        pid = period_id(quota.period, now)
        count = self._counts.get(quota.key)
        if count is None or count.pid != pid:
            count = self._counts[quota.key] = _Count(pid)
        return count

    def reserve(self, user: SmtpUser, account: Account | None) -> QuotaReservation:
        """At MAIL: one place in each of the message's quotas, all or none. Raises
        QuotaExceeded (``451 4.7.1``) when one is used up."""
        quotas = self.quotas(user, account)
        usage = self._usage(quotas)
        for u in usage:
            if u.full:
                count = self._counts[u.quota.key]
                # Full of counted messages (not of open places) and never reported so.
                first = count.warned < 100 and count.used >= u.quota.limit
                if first:
                    count.warned = 100
                    self._changed(u.quota.key, count)
                raise refusal_logged(u.quota, count.used, count.pid, first)
        for quota in quotas:
            self._open[quota.key] = self._open.get(quota.key, 0) + 1
        return QuotaReservation(self, quotas, usage)

    def count(self, user: SmtpUser, account: Account | None) -> list[Crossing]:
        """One message counted whatever the quotas say: a held message an admin released
        (quotahold.py). Returns the thresholds it crossed."""
        quotas = self.quotas(user, account)
        for quota in quotas:  # _commit closes a place: this message takes one first
            self._open[quota.key] = self._open.get(quota.key, 0) + 1
        return self._commit(quotas)

    def usage(self, user: SmtpUser, account: Account | None) -> list[Usage]:
        """The state of the quotas a message of ``user`` counts against (changes nothing)."""
        return self._usage(self.quotas(user, account))

    def _usage(self, quotas: list[Quota]) -> list[Usage]:
        now = self.clock.seconds()
        out = []
        for q in quotas:
            count = self._count(q, now)
            out.append(Usage(q, count.used, count.pid, self._open.get(q.key, 0)))
        return out

    def _commit(self, quotas: Iterable[Quota]) -> list[Crossing]:
        now = self.clock.seconds()
        crossings = []
        for quota in quotas:
            self._close(quota.key)
            count = self._count(quota, now)
            count.used += 1
            percent = percent_reached(count.used, quota.limit, count.warned)
            if percent:
                count.warned = percent
                crossings.append(Crossing(quota, percent, count.used, count.pid))
            self._changed(quota.key, count)
        return crossings

    def _close(self, key: str) -> None:
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)

    def _changed(self, key: str, count: _Count) -> None:
        if self.store is not None:
            self.store.changed(key, count.pid, count.used, count.warned)


@implementer(IQuotaReservation)
class QuotaReservation:
    """One transaction's places in its quotas; ``usage``: the counts before it."""

    def __init__(self, counter: QuotaCounter, quotas: list[Quota], usage: list[Usage]) -> None:
        self.usage = usage
        self._counter = counter
        self._quotas = quotas
        self._state = "open"

    def commit(self) -> list[Crossing]:
        """The message is spooled: it counts; returns the thresholds it crossed."""
        if self._state != "open":
            return []
        self._state = "committed"
        return self._counter._commit(self._quotas)

    def release(self) -> None:
        """The transaction was aborted: give the places back (safe to call again)."""
        if self._state != "open":
            return
        self._state = "released"
        for quota in self._quotas:
            self._counter._close(quota.key)


# ---- kept across restarts ----


class QuotaStore(SqliteStore):
    """``quota.sqlite`` in data_dir: each quota's count in its current period."""

    MIGRATIONS = {
        1: """CREATE TABLE IF NOT EXISTS quota (
                key TEXT PRIMARY KEY, period TEXT NOT NULL,
                used INTEGER NOT NULL, warned INTEGER NOT NULL)""",
    }

    def load(self) -> dict[str, _Count]:
        return {key: _Count(pid, used, warned) for key, pid, used, warned
                in self.fetch("SELECT key, period, used, warned FROM quota")}

    def save(self, rows: dict[str, tuple[str, int, int]]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO quota (key, period, used, warned) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET period = excluded.period, "
                "used = excluded.used, warned = excluded.warned",
                [(key, *row) for key, row in rows.items()])


class QuotaWriter(BatchWriter):
    """Writes the changed counts every ``interval`` (1 s) and when the relay stops: a
    crash loses at most that second's counts, a restart none."""

    what = "quota counts"

    def __init__(self, store: QuotaStore, reactor, clock=None, interval: float = 1.0) -> None:
        super().__init__(reactor, clock, interval)
        self.db = store
        self.loaded = store.load()
        self._pending: dict[str, tuple[str, int, int]] = {}

    def changed(self, key: str, pid: str, used: int, warned: int) -> None:
        self._pending[key] = (pid, used, warned)

    def _take(self):
        batch, self._pending = self._pending, {}
        return batch or None

    def _write(self, batch) -> None:
        self.db.save(batch)

    def _put_back(self, batch) -> None:
        self._pending = {**batch, **self._pending}  # what changed since is newer
