"""Group commit: file operations run in batches in a thread, and each directory a batch
changed is fsynced once for the whole batch.

A directory fsync costs about as much as the file fsyncs of a small message; sharing it
among every commit that arrived while the previous batch was on its way to disk is what
lets many sessions get their `250` without queueing behind each other's fsyncs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailrelay.spool.files import fsync_dir

log = Logger()


@dataclass
class _Job:
    apply: Callable[[], Iterable[str]]  # in the thread: do the work, name the dirs changed
    undo: Callable[[], None] | None  # in the thread: when a changed dir could not be synced
    deferred: Deferred


class GroupSync:
    """Batches durable file operations; at most one batch is in flight at a time.

    ``submit`` returns a Deferred that fires (on the reactor thread) only after the job's
    own work and the fsync of every directory it changed are done. A job that raises
    errbacks alone; the rest of its batch is unaffected.
    """

    def __init__(self, reactor, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._pool = pool
        self._pending: list[_Job] = []
        self._busy = False
        self._idle: list[Deferred] = []
        self.batches = 0  # batches completed
        self.dir_syncs = 0  # directory fsyncs done: with batching, fewer than jobs

    def submit(self, apply: Callable[[], Iterable[str]],
               undo: Callable[[], None] | None = None) -> Deferred:
        d: Deferred = Deferred()
        self._pending.append(_Job(apply, undo, d))
        if not self._busy:
            self._start()
        return d

    def drain(self) -> Deferred:
        """Fires once no batch is in flight or waiting (for shutdown)."""
        if not self._busy and not self._pending:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        d = deferToThreadPool(self._reactor, self._pool, _run_batch, batch)
        d.addBoth(self._finished, batch)

    def _finished(self, result: tuple[list[Failure | None], int] | Failure,
                  batch: list[_Job]) -> None:
        if isinstance(result, Failure):  # the batch runner itself broke: fail them all
            outcomes: list[Failure | None] = [result] * len(batch)
            synced = 0
        else:
            outcomes, synced = result
        self.batches += 1
        self.dir_syncs += synced
        log.debug("group sync of {jobs} operations, {dirs} directory fsyncs",
                  jobs=len(batch), dirs=synced)
        # Still busy while firing: jobs submitted by these callbacks join one next batch.
        for job, outcome in zip(batch, outcomes, strict=True):
            if outcome is None:
                job.deferred.callback(None)
            else:
                job.deferred.errback(outcome)
        self._busy = False
        if self._pending:
            self._start()
        else:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)


def _run_batch(batch: list[_Job]) -> tuple[list[Failure | None], int]:
    """In the thread: every job's work, then one fsync per changed directory."""
    outcomes: list[Failure | None] = []
    changed: dict[str, list[int]] = {}
    for i, job in enumerate(batch):
        try:
            dirs = job.apply()
        except Exception:
            outcomes.append(Failure())
            continue
        outcomes.append(None)
        for path in dirs:
            changed.setdefault(path, []).append(i)
    synced = 0
    for path, jobs in changed.items():
        try:
            fsync_dir(path)
        except OSError:
            failure = Failure()
            for i in jobs:
                if outcomes[i] is None:
                    outcomes[i] = failure
                    if batch[i].undo is not None:
                        with contextlib.suppress(OSError):
                            batch[i].undo()
            continue
        synced += 1
    return outcomes, synced
