"""When each queued message is next due, in memory: two heaps and one timer.

Ready messages wait in a heap of queue ids, and ids sort by priority then age, so
priority 1 mail overtakes any backlog of priority 3 and the oldest goes first within a
priority. Deferred messages wait in a heap of (due time, id) with a single timer for the
earliest; a rescheduled or flushed message leaves a stale heap entry that is skipped
(``_due`` is the truth). Every operation is O(log n); loading n ids is O(n).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable


class Schedule:
    """``on_ready`` is called when the timer has made messages ready."""

    def __init__(self, clock, on_ready: Callable[[], None]) -> None:
        self.clock = clock
        self.on_ready = on_ready
        self._ready: list[str] = []
        self._ready_set: set[str] = set()
        self._waiting: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._timer = None
        self._timer_due = 0.0
        self._running = False

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._ready_set or queue_id in self._due

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def deferred(self) -> int:
        return len(self._due)

    def start(self) -> None:
        self._running = True
        self._arm()

    def stop(self) -> None:
        self._running = False
        self._cancel_timer()

    def load(self, entries: Iterable[tuple[str, float | None]]) -> None:
        """Many (id, due) at once, ids in sorted order (as the spool lists them)."""
        now = self.clock.seconds()
        for queue_id, due in entries:
            if queue_id in self:
                continue
            if due is None or due <= now:
                self._ready.append(queue_id)
                self._ready_set.add(queue_id)
            else:
                self._due[queue_id] = due
                self._waiting.append((due, queue_id))
        heapq.heapify(self._ready)
        heapq.heapify(self._waiting)
        self._arm()

    def add(self, queue_id: str, due: float | None = None) -> None:
        """Due at ``due`` (None or past: ready now)."""
        if due is None or due <= self.clock.seconds():
            self._due.pop(queue_id, None)
            if queue_id not in self._ready_set:
                self._ready_set.add(queue_id)
                heapq.heappush(self._ready, queue_id)
        elif queue_id not in self._ready_set:  # a ready message stays ready
            self._due[queue_id] = due
            heapq.heappush(self._waiting, (due, queue_id))
            self._arm()

    def pop(self) -> str | None:
        """The next ready message, or None."""
        if not self._ready:
            return None
        queue_id = heapq.heappop(self._ready)
        self._ready_set.discard(queue_id)
        return queue_id

    def now(self, queue_id: str) -> bool:
        """A deferred message is due now; False if it was not deferred."""
        if queue_id not in self._due:
            return False
        self.add(queue_id)
        return True

    def flush(self) -> int:
        """Every deferred message is due now; returns how many there were."""
        count = len(self._due)
        for queue_id in list(self._due):
            self.add(queue_id)
        self._waiting.clear()
        self._cancel_timer()
        return count

    def discard(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)
        if queue_id in self._ready_set:
            self._ready_set.discard(queue_id)
            self._ready.remove(queue_id)
            heapq.heapify(self._ready)

    def _arm(self) -> None:
        while self._waiting and self._due.get(self._waiting[0][1]) != self._waiting[0][0]:
            heapq.heappop(self._waiting)
        if not self._waiting or not self._running:
            self._cancel_timer()
            return
        due = self._waiting[0][0]
        if self._timer is not None and self._timer.active() and self._timer_due <= due:
            return
        self._cancel_timer()
        self._timer_due = due
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._wake)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _wake(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._waiting and self._waiting[0][0] <= now:
            due, queue_id = heapq.heappop(self._waiting)
            if self._due.get(queue_id) == due:
                self.add(queue_id)
        self._arm()
        self.on_ready()
