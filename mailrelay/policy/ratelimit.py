"""Per-user sending rate limits (messages or recipients per hour, optionally per minute).

Counting is exact within the reactor thread: a session *reserves* units at MAIL (or at each
RCPT when counting recipients) and the reservation counts at once, so concurrent sessions
of one user can never overshoot; ``release()`` gives the units back when the transaction is
aborted, ``commit()`` keeps them, counted from the time the message was spooled.

Each window (3600 s, 60 s) is a sliding window kept as at most ``slots + 1`` slots. A slot
holds the count of the units reserved between its first and last time, both less than
``window / slots`` apart, and leaves the window ``window`` seconds after its *last* time.
That never undercounts (a unit may be held up to one slot width longer than strictly
needed, never shorter), a burst is released exactly ``window`` seconds later, and memory is
bounded per user. Users with nothing left in any window are dropped.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.interfaces import IRateLimiter, IReservation
from mailrelay.reply import Reply

log = Logger()

Unit = Literal["messages", "recipients"]
HOUR = 3600.0
MINUTE = 60.0


class _Slot:
    __slots__ = ("first", "last", "count")

    def __init__(self, now: float) -> None:
        self.first = now
        self.last = now
        self.count = 0


class _Window:
    """The units counted in the last ``span`` seconds."""

    def __init__(self, span: float, slots: int) -> None:
        self.span = span
        self.width = span / slots
        self.slots: deque[_Slot] = deque()
        self.total = 0

    def prune(self, now: float) -> None:
        while self.slots and (self.slots[0].last + self.span <= now or not self.slots[0].count):
            slot = self.slots.popleft()
            self.total -= slot.count
            slot.count = 0  # a late release() of a unit in it must not count twice

    def add(self, now: float, n: int) -> _Slot:
        if self.slots and now - self.slots[-1].first < self.width:
            slot = self.slots[-1]
            slot.last = now
        else:
            slot = _Slot(now)
            self.slots.append(slot)
        slot.count += n
        self.total += n
        return slot

    def remove(self, slot: _Slot, n: int) -> None:
        n = min(n, slot.count)  # 0 once the slot has left the window
        slot.count -= n
        self.total -= n

    def wait(self, now: float, n: int, limit: int) -> float:
        """Seconds until ``n`` more units fit under ``limit``, assuming the units held now
        stay counted (open reservations are assumed to be committed)."""
        need = self.total + n - limit
        freed = 0
        for slot in self.slots:
            freed += slot.count
            if freed >= need:
                return slot.last + self.span - now
        return self.span  # n > limit: nothing will ever fit; callers check first


class _UserWindows:
    __slots__ = ("hour", "minute")

    def __init__(self, slots: int) -> None:
        self.hour = _Window(HOUR, slots)
        self.minute = _Window(MINUTE, slots)

    def prune(self, now: float) -> bool:
        """Drop what left the windows; True when nothing is counted any more."""
        self.hour.prune(now)
        self.minute.prune(now)
        return not self.hour.total and not self.minute.total


@implementer(IRateLimiter)
class RateLimiter:
    """Rate limits of all users, in memory (a restart starts every user afresh).

    ``per_hour`` / ``per_minute`` are the defaults for users without their own limit; 0 or
    None switches that window off. ``unit`` says what is counted: ``"messages"`` (one unit
    per transaction, reserved at MAIL) or ``"recipients"`` (one unit per RCPT).
    """

    def __init__(
        self,
        clock: IReactorTime,
        per_hour: int | None = 200_000,
        per_minute: int | None = None,
        unit: Unit = "messages",
        slots: int = 60,
    ) -> None:
        if unit not in ("messages", "recipients"):
            raise ValueError(f"unit must be 'messages' or 'recipients', not {unit!r}")
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.clock = clock
        self.per_hour = per_hour
        self.per_minute = per_minute
        self.unit: Unit = unit
        self._slots = slots
        self._users: dict[str, _UserWindows] = {}
        self._next_sweep = 0.0

    def transaction(
        self, user: str, per_hour: int | None = None, per_minute: int | None = None
    ) -> Reservation:
        """At MAIL FROM: a Reservation holding one unit when counting messages, none when
        counting recipients (each RCPT then calls ``reservation.recipient()``).
        Raises Reply(451, "4.7.1") when over a limit."""
        n = 1 if self.unit == "messages" else 0
        return self.reserve(user, n, per_hour, per_minute)

    def reserve(
        self, user: str, n: int = 1, per_hour: int | None = None, per_minute: int | None = None
    ) -> Reservation:
        """Reserve ``n`` units for ``user``, all or nothing. ``per_hour``/``per_minute``
        are the user's own limits (None: the defaults; 0: no limit).
        Raises Reply(451, "4.7.1", "... try again in M seconds") when over a limit."""
        reservation = Reservation(
            self,
            user.lower(),
            self.per_hour if per_hour is None else per_hour,
            self.per_minute if per_minute is None else per_minute,
        )
        reservation.add(n)
        return reservation

    def usage(self, user: str) -> tuple[int, int]:
        """Units counted now for ``user`` in the last hour and the last minute."""
        windows = self._users.get(user.lower())
        if windows is None or windows.prune(self.clock.seconds()):
            return 0, 0
        return windows.hour.total, windows.minute.total

    def _take(
        self, user: str, n: int, per_hour: int | None, per_minute: int | None
    ) -> list[tuple[_Window, _Slot]]:
        now = self.clock.seconds()
        self._sweep(now)
        windows = self._users.get(user)
        if windows is None:
            windows = self._users[user] = _UserWindows(self._slots)
        windows.prune(now)
        over = [
            (window, limit, per)
            for window, limit, per in (
                (windows.hour, per_hour, "hour"),
                (windows.minute, per_minute, "minute"),
            )
            if limit and window.total + n > limit
        ]
        if over:
            self._refuse(user, now, n, over)
        return [(w, w.add(now, n)) for w in (windows.hour, windows.minute)]

    def _count(self, user: str, n: int) -> None:
        """Count ``n`` units now, unchecked: a commit moving its units to the commit time."""
        now = self.clock.seconds()
        windows = self._users.get(user)
        if windows is None:  # swept while the transaction was open for over an hour
            windows = self._users[user] = _UserWindows(self._slots)
        for window in (windows.hour, windows.minute):
            window.add(now, n)

    def _refuse(self, user: str, now: float, n: int, over: list[tuple[_Window, int, str]]):
        """Raise the 451 for the window that frees up last, so the retry time is honest."""
        retry, limit, per = max(
            (max(1, math.ceil(window.wait(now, n, limit))), limit, per)
            for window, limit, per in over
        )
        text = f"rate limit of {limit} {self.unit} per {per} exceeded"
        log.info(
            "rate limit: {user} over {limit} {unit} per {per}, retry in {retry} s",
            user=user,
            limit=limit,
            unit=self.unit,
            per=per,
            retry=retry,
        )
        if n > limit:  # can never fit: say so rather than promise a time
            raise Reply(451, "4.7.1", text)
        raise Reply(451, "4.7.1", f"{text}, try again in {retry} seconds")

    def _sweep(self, now: float) -> None:
        """Once per minute, forget users with nothing left in their windows."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + MINUTE
        for user in [u for u, w in self._users.items() if w.prune(now)]:
            del self._users[user]


@implementer(IReservation)
class Reservation:
    """Units held for one user's transaction; they count from the moment they are taken."""

    def __init__(
        self, limiter: RateLimiter, user: str, per_hour: int | None, per_minute: int | None
    ) -> None:
        self.user = user
        self.count = 0
        self._limiter = limiter
        self._limits = (per_hour, per_minute)
        self._held: list[tuple[_Window, _Slot, int]] = []
        self._state = "open"

    def recipient(self) -> None:
        """At each RCPT (after the other RCPT checks passed): one more unit when counting
        recipients, nothing when counting messages. Raises Reply(451, "4.7.1")."""
        if self._limiter.unit == "recipients":
            self.add(1)

    def add(self, n: int = 1) -> None:
        """Reserve ``n`` more units, all or nothing. Raises Reply(451, "4.7.1")."""
        if self._state != "open":
            raise RuntimeError(f"reservation already {self._state}")
        if n <= 0:
            return
        for window, slot in self._limiter._take(self.user, n, *self._limits):
            self._held.append((window, slot, n))
        self.count += n

    def commit(self) -> None:
        """The message is spooled: its units are counted from now (not from MAIL), so the
        limit holds for accepted messages in any window; nothing can overshoot, as the units
        were already counted."""
        if self._state == "released":
            raise RuntimeError("reservation already released")
        if self._state == "committed":
            return
        self._give_back()
        self._state = "committed"
        if self.count:
            self._limiter._count(self.user, self.count)

    def release(self) -> None:
        """The transaction was aborted (RSET, refusal, disconnect): give the units back.
        Does nothing after commit() or a first release(), so it is safe in connectionLost."""
        if self._state != "open":
            return
        self._state = "released"
        self._give_back()
        self.count = 0

    def _give_back(self) -> None:
        for window, slot, n in self._held:
            window.remove(slot, n)
        self._held = []
