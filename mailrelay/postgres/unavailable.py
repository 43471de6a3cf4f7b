"""A database that cannot be reached, as the stores' callers already handle a store they
cannot write now: an OSError (the panel and the API answer 503, mailrelay-admin says so in
one line) instead of psycopg's own errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer

from mailrelay.postgres.db import UNAVAILABLE

T = TypeVar("T")


class Unavailable(OSError):
    def __init__(self, error: Exception) -> None:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        super().__init__(f"[cluster] postgres: PostgreSQL cannot be reached now ({why})")
        self.strerror = f"PostgreSQL cannot be reached now ({why})"


def guarded(call: Callable[..., defer.Deferred]) -> Callable[..., defer.Deferred]:
    """``call`` (manage.stores.threaded or at_once), with the database's unavailability
    raised as Unavailable."""

    def run(f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        def work() -> T:
            try:
                return f(*args)
            except UNAVAILABLE as e:
                raise Unavailable(e) from e

        return call(work)

    return run
