"""Group commit: durable file operations run in batches on a thread pool, and each
directory a batch changed is fsynced once for the whole batch.

A batch has two phases:

1. every job's own work (for a message: flush, fsync, close, rename), in parallel across
   the pool, since concurrent fsyncs also let the filesystem share journal commits;
2. one fsync of each directory the batch changed; then each job's Deferred fires.

Jobs submitted while a batch is in phase 1 form the next batch, which starts as soon as
phase 1 ends, so its file fsyncs overlap the previous batch's directory fsyncs. Batches
grow with the load by themselves: one job alone when idle, everything that arrived
meanwhile when busy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailrelay.spool.files import fsync_dir

log = Logger()


@dataclass
class _Job:
    apply: Callable[[], Iterable[str]]  # in a thread: do the work, name the dirs changed
    undo: Callable[[], None] | None  # in a thread: when a changed dir could not be synced
    deferred: Deferred


class GroupSync:
    """``submit`` returns a Deferred that fires (on the reactor thread) only after the
    job's own work and the fsync of every directory it changed are done. A job that raises
    errbacks alone; the rest of its batch is unaffected."""

    def __init__(self, reactor, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._pool = pool
        self._pending: list[_Job] = []
        self._applying = False  # a batch is in phase 1: new jobs wait for the next
        self._firing = False  # jobs submitted by callbacks being fired wait, to go together
        self._in_flight = 0  # batches started and not finished
        self._idle: list[Deferred] = []
        self.batches = 0  # batches completed
        self.dir_syncs = 0  # directory fsyncs done: under load, far fewer than jobs

    def submit(self, apply: Callable[[], Iterable[str]],
               undo: Callable[[], None] | None = None) -> Deferred:
        d: Deferred = Deferred()
        self._pending.append(_Job(apply, undo, d))
        if not (self._applying or self._firing):
            self._start()
        return d

    def drain(self) -> Deferred:
        """Fires once no batch is in flight or waiting (for shutdown)."""
        if not self._in_flight and not self._pending:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        self._applying = True
        self._in_flight += 1
        applied = DeferredList([deferToThreadPool(self._reactor, self._pool, job.apply)
                                for job in batch], consumeErrors=True)
        applied.addCallback(self._applied, batch)
        applied.addErrback(lambda failure: ([failure] * len(batch), 0))  # a bug: fail all
        applied.addCallback(self._finished, batch)

    def _applied(self, results: list[tuple[bool, object]], batch: list[_Job]) -> Deferred:
        """Phase 1 is over: queue this batch's directory fsyncs, then start the next."""
        outcomes: list[Failure | None] = []
        changed: dict[str, list[int]] = {}
        for i, (ok, result) in enumerate(results):
            outcomes.append(None if ok else result)
            if ok:
                for path in result:
                    changed.setdefault(path, []).append(i)
        undos = {path: [batch[i].undo for i in jobs if batch[i].undo is not None]
                 for path, jobs in changed.items()}
        # Queued before the next batch's jobs: the pool is first in, first out.
        synced = deferToThreadPool(self._reactor, self._pool, _fsync_dirs, undos)
        self._applying = False
        if self._pending and not self._firing:
            self._start()

        def merge(failed: dict[str, Failure]) -> tuple[list[Failure | None], int]:
            for path, failure in failed.items():
                for i in changed[path]:
                    outcomes[i] = outcomes[i] or failure
            return outcomes, len(changed) - len(failed)

        return synced.addCallback(merge)

    def _finished(self, result: tuple[list[Failure | None], int], batch: list[_Job]) -> None:
        outcomes, synced = result
        self._in_flight -= 1
        self.batches += 1
        self.dir_syncs += synced
        log.debug("group sync of {jobs} operations, {dirs} directory fsyncs",
                  jobs=len(batch), dirs=synced)
        self._firing = True
        for job, outcome in zip(batch, outcomes, strict=True):
            if outcome is None:
                job.deferred.callback(None)
            else:
                job.deferred.errback(outcome)
        self._firing = False
        if self._pending and not self._applying:
            self._start()
        elif not self._in_flight and not self._pending:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)


def _fsync_dirs(undos: dict[str, list[Callable[[], None]]]) -> dict[str, Failure]:
    """In a thread: fsync each directory once. Where that fails, the jobs that changed it
    are undone (best effort) and fail: their change might not survive a crash."""
    failed = {}
    for path, jobs_undo in undos.items():
        try:
            fsync_dir(path)
        except OSError:
            failed[path] = Failure()
            for undo in jobs_undo:
                with contextlib.suppress(OSError):
                    undo()
    return failed
