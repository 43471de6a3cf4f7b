"""Group commit: durable file operations run in batches on a thread pool, and each
directory a batch changed is fsynced once for the whole batch.

A batch has two phases, both in the pool:

1. every job's own work (for a message: write, fsync, close, rename), shared out among up
   to ``parallel`` threads, since concurrent fsyncs also let the filesystem share journal
   commits (jobs that do not wait for the disk, such as removals, wake no other thread);
2. one fsync of each directory the batch changed; then each job's Deferred fires.

Jobs submitted while a batch is in phase 1 form the next batch, which starts as soon as
phase 1 ends, so its file fsyncs overlap the previous batch's directory fsyncs. Batches
grow with the load by themselves: one job alone when idle, everything that arrived
meanwhile when busy. When idle a job starts at once; while a batch is in flight, a batch
starts at the end of the reactor turn that submitted its first job, so the turn's other
jobs go with it: each wake-up of a pool thread is a futex call, on a virtual machine an
interrupt to another CPU (one per removal took a tenth of the delivery process's reactor
thread in a profile).

The reactor thread hands a whole batch to the pool in one call and gets all its outcomes
back in one call: its cost per batch, not per job, is what the threads cost it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailrelay.files import fsync_dir


@dataclass
class _Job:
    apply: Callable[[], Iterable[str]]  # in a thread: do the work, name the dirs changed
    undo: Callable[[], None] | None  # in a thread: when a changed dir could not be synced
    deferred: Deferred
    waits: bool  # apply waits for the disk (an fsync): worth a thread of its own


class GroupSync:
    """``submit`` returns a Deferred that fires (on the reactor thread) only after the
    job's own work and the fsync of every directory it changed are done. A job that raises
    errbacks alone; the rest of its batch is unaffected.

    ``parallel``: threads sharing one batch's jobs (default: the pool's maximum)."""

    def __init__(self, reactor, pool: ThreadPool, parallel: int | None = None) -> None:
        self._reactor = reactor
        self._pool = pool
        self._parallel = max(1, parallel if parallel is not None else pool.max)
        # Guards the fields below: phase 1 ends in a pool thread, which starts the next
        # batch itself rather than asking the reactor to.
        self._lock = threading.Lock()
        self._pending: list[_Job] = []
        self._applying = False  # a batch is in phase 1: new jobs wait for the next
        self._firing = False  # jobs submitted by callbacks being fired wait, to go together
        self._kicking = False  # a batch start is scheduled for the end of this turn
        self._in_flight = 0  # batches started and not finished
        self._idle: list[Deferred] = []
        self.batches = 0  # batches completed
        self.dir_syncs = 0  # directory fsyncs done: under load, far fewer than jobs

    def submit(self, apply: Callable[[], Iterable[str]],
               undo: Callable[[], None] | None = None, waits: bool = True) -> Deferred:
        """``waits``: False for a job that does not wait for the disk itself (a rename or
        an unlink; the directory fsync comes after): it never wakes another thread."""
        d: Deferred = Deferred()
        with self._lock:
            self._pending.append(_Job(apply, undo, d, waits))
            batch = None
            kick = not (self._applying or self._firing or self._kicking)
            if kick and not self._in_flight:
                batch, kick = self._take(), False  # idle: no one to wait for
            elif kick:
                self._kicking = True
        if batch is not None:
            self._pool.callInThread(self._run, batch)
        elif kick:
            # Busy: start at the end of this reactor turn, so that what else the turn
            # submits goes along (one thread wake-up instead of one each).
            self._reactor.callLater(0, self._kick)
        return d

    def _kick(self) -> None:
        with self._lock:
            self._kicking = False
            ready = self._pending and not (self._applying or self._firing)
            batch = self._take() if ready else None
        if batch is not None:
            self._pool.callInThread(self._run, batch)

    def drain(self) -> Deferred:
        """Fires once no batch is in flight or waiting (for shutdown)."""
        with self._lock:
            if not self._in_flight and not self._pending:
                return succeed(None)
            d: Deferred = Deferred()
            self._idle.append(d)
            return d

    def _take(self) -> list[_Job]:
        """With the lock held: the pending jobs become the batch in phase 1."""
        batch, self._pending = self._pending, []
        self._applying = True
        self._in_flight += 1
        return batch

    def _run(self, batch: list[_Job]) -> None:
        """In a pool thread: both phases of ``batch``, then its outcomes to the reactor."""
        try:
            outcomes = self._apply(batch)
        except BaseException:  # a bug: every job of the batch fails with it
            outcomes = [Failure()] * len(batch)
        with self._lock:
            following = self._take() if self._pending and not self._firing else None
            if following is None:
                self._applying = False
        if following is not None:
            self._pool.callInThread(self._run, following)
        try:
            results, synced = _sync_dirs(batch, outcomes)
        except BaseException:
            results, synced = [Failure()] * len(batch), 0
        self._reactor.callFromThread(self._finished, batch, results, synced)

    def _apply(self, batch: list[_Job]) -> list[Iterable[str] | Failure]:
        """Phase 1: run the jobs on this thread and on up to parallel - 1 helpers (no more
        than the jobs that wait for the disk), each taking the next job not yet taken. A
        helper that starts late finds none left, so this thread never waits for a job no
        one has begun."""
        outcomes: list[Iterable[str] | Failure] = [()] * len(batch)
        todo = deque(enumerate(batch))
        done = threading.Condition()
        running = [0]  # jobs taken and not finished

        def work() -> None:
            while True:
                with done:
                    if not todo:
                        return
                    i, job = todo.popleft()
                    running[0] += 1
                try:
                    outcome: Iterable[str] | Failure = tuple(job.apply())
                except BaseException:
                    outcome = Failure()
                with done:
                    outcomes[i] = outcome
                    running[0] -= 1
                    if not running[0]:
                        done.notify()

        for _ in range(min(self._parallel, sum(job.waits for job in batch)) - 1):
            self._pool.callInThread(work)
        work()
        with done:
            while running[0]:
                done.wait()
        return outcomes

    def _finished(self, batch: list[_Job], results: list[Failure | None],
                  synced: int) -> None:
        self.batches += 1
        self.dir_syncs += synced
        self._firing = True
        for job, outcome in zip(batch, results, strict=True):
            if outcome is None:
                job.deferred.callback(None)
            else:
                job.deferred.errback(outcome)
        with self._lock:
            self._firing = False
            self._in_flight -= 1
            following = self._take() if self._pending and not self._applying else None
            idle = not self._in_flight and not self._pending
            if idle:
                waiting, self._idle = self._idle, []
        if following is not None:
            self._pool.callInThread(self._run, following)
        elif idle:
            for d in waiting:
                d.callback(None)


def _sync_dirs(batch: list[_Job], outcomes: list[Iterable[str] | Failure]
               ) -> tuple[list[Failure | None], int]:
    """Phase 2, in a thread: fsync each directory the batch changed, once. Where that
    fails, the jobs that changed it are undone (best effort) and fail: their change might
    not survive a crash. Returns each job's failure (None: done) and the fsyncs done."""
    results: list[Failure | None] = [o if isinstance(o, Failure) else None for o in outcomes]
    changed: dict[str, list[int]] = {}
    for i, outcome in enumerate(outcomes):
        if not isinstance(outcome, Failure):
            for path in outcome:
                changed.setdefault(path, []).append(i)
    synced = 0
    for path, jobs in changed.items():
        try:
            fsync_dir(path)
        except OSError:
            failure = Failure()
            for i in jobs:
                results[i] = results[i] or failure
                if batch[i].undo is not None:
                    with contextlib.suppress(OSError):
                        batch[i].undo()
        else:
            synced += 1
    return results, synced
