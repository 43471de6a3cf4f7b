"""A service that keeps records in memory and writes them in batches, in a thread.

The statistics (features/stats.py) and the last logins (auth/lifecycle.py) are written
this way: every ``interval`` seconds, and when the service stops; one write at a time, and
a batch that fails is put back for the next one, so nothing is lost to a busy database.
A subclass says what is pending (``_take``), how it is written (``_write``, in a thread)
and how a failed batch goes back (``_put_back``). A database that stays away fails every
attempt: the first failure is logged (with its traceback), the rest are counted and
reported in one line when a batch is written again.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

log = Logger()


class BatchWriter(Service):
    what = "records"  # for the log: "<what> not written, kept for the next attempt"

    def __init__(self, reactor, clock=None, interval: float = 1.0, threadpool=None) -> None:
        self._reactor = reactor
        self._clock = clock or reactor
        self._threadpool = threadpool
        self.interval = interval
        self._writing: defer.Deferred | None = None
        self._loop: task.LoopingCall | None = None
        self._failures = 0  # attempts failed in a row

    def _take(self) -> Any:
        """What is pending, now no longer held here; None when nothing is."""
        raise NotImplementedError

    def _write(self, batch: Any) -> None:
        """Write ``batch`` (in a thread)."""
        raise NotImplementedError

    def _put_back(self, batch: Any) -> None:
        """``batch`` was not written: hold it again, before what came since."""
        raise NotImplementedError

    def flush(self) -> defer.Deferred:
        """Write what is pending; fires when written (after any write under way)."""
        if self._writing is not None:
            return self._writing.addCallback(lambda _: self.flush())
        batch = self._take()
        if batch is None:
            return defer.succeed(None)
        pool = self._threadpool or self._reactor.getThreadPool()
        d = threads.deferToThreadPool(self._reactor, pool, self._write, batch)

        def written(_):
            if self._failures:
                log.info("{what} written again after {count} failed attempt(s)",
                         what=self.what, count=self._failures)
                self._failures = 0

        def failed(failure):
            if not self._failures:
                log.failure("{what} not written, kept for the next attempt (further "
                            "failures are counted, not logged)", failure, what=self.what)
            self._failures += 1
            self._put_back(batch)

        def done(_):
            self._writing = None

        d.addCallbacks(written, failed).addBoth(done)
        self._writing = d
        return d

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("{what} timer stopped", f, what=self.what)
        )

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.flush()
