"""A small time-to-live cache on an injected clock (IReactorTime), for directory answers."""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

K = TypeVar("K")
V = TypeVar("V")
MISSING = object()


class TtlCache(Generic[K, V]):
    """Remembers values for ``ttl`` seconds of ``clock`` time; ``ttl`` 0 remembers nothing.

    At most ``max_entries`` are kept: expired entries are dropped first, then the oldest.
    """

    def __init__(self, clock: IReactorTime, ttl: float, max_entries: int = 10000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._items: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | object:
        """The value, or MISSING when absent or expired."""
        item = self._items.get(key)
        if item is None:
            return MISSING
        expires, value = item
        if self._clock.seconds() >= expires:
            del self._items[key]
            return MISSING
        return value

    def put(self, key: K, value: V) -> None:
        if self._ttl <= 0:
            return
        now = self._clock.seconds()
        self._items.pop(key, None)  # re-inserted last, so insertion order is age order
        if len(self._items) >= self._max:
            self._items = {k: item for k, item in self._items.items() if item[0] > now}
            while len(self._items) >= self._max:
                del self._items[next(iter(self._items))]
        self._items[key] = (now + self._ttl, value)

    def clear(self) -> None:
        self._items.clear()
