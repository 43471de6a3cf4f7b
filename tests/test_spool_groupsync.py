"""The group commit on its own: batches, parallel jobs, failures, drain."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailrelay.spool.groupsync import GroupSync

WAIT = 10  # seconds a job waits for its partners before the test fails (never hangs)


def holding(go: threading.Event):
    """A job that stays in phase 1 until ``go`` is set: what is submitted meanwhile
    makes up the next batch."""
    def hold() -> tuple[str, ...]:
        go.wait(WAIT)
        return ()
    return hold


class GroupSyncTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mailrelay-groupsync-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="groupsync-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def touch(self, name: str):
        """A job: create a file in the test dir, which it names as changed."""
        def apply() -> tuple[str]:
            with open(os.path.join(self.dir, name), "wb"):
                pass
            return (self.dir,)
        return apply

    @defer.inlineCallbacks
    def test_jobs_waiting_for_a_batch_go_together(self):
        sync = GroupSync(reactor, self.pool)
        first = sync.submit(self.touch("a"))
        rest = [sync.submit(self.touch(f"b{i}")) for i in range(20)]
        yield defer.gatherResults([first, *rest])
        self.assertEqual((sync.batches, sync.dir_syncs), (2, 2))
        self.assertEqual(len(os.listdir(self.dir)), 21)

    @defer.inlineCallbacks
    def test_a_batch_shares_its_jobs_among_threads(self):
        sync = GroupSync(reactor, self.pool, parallel=3)
        # Each job waits until all three run at once: one thread alone would fail them.
        meeting = threading.Barrier(3, timeout=WAIT)
        go = threading.Event()
        hold = holding(go)

        def meet() -> tuple[str, ...]:
            meeting.wait()
            return ()

        first = sync.submit(hold)
        jobs = [sync.submit(meet) for _ in range(3)]
        go.set()
        yield first
        yield defer.gatherResults(jobs)
        self.assertEqual(sync.batches, 2)

    @defer.inlineCallbacks
    def test_a_failing_job_fails_alone(self):
        sync = GroupSync(reactor, self.pool)
        go = threading.Event()
        hold = holding(go)

        def broken() -> tuple[str]:
            raise OSError("no room")

        first = sync.submit(hold)
        good, bad = sync.submit(self.touch("good")), sync.submit(broken)
        go.set()
        yield first
        yield good
        yield self.assertFailure(bad, OSError)
        self.assertEqual(os.listdir(self.dir), ["good"])
        self.assertEqual((sync.batches, sync.dir_syncs), (2, 1))  # good and bad together

    @defer.inlineCallbacks
    def test_a_directory_that_cannot_be_synced_undoes_and_fails_its_jobs(self):
        sync = GroupSync(reactor, self.pool)
        gone = os.path.join(self.dir, "gone")
        undone = []
        bad = sync.submit(lambda: (gone,), undo=lambda: undone.append("bad"))
        good = sync.submit(self.touch("kept"), undo=lambda: undone.append("good"))
        yield self.assertFailure(bad, FileNotFoundError)
        yield good
        self.assertEqual(undone, ["bad"])

    @defer.inlineCallbacks
    def test_drain_waits_for_the_batches_in_flight(self):
        sync = GroupSync(reactor, self.pool)
        self.assertTrue((yield sync.drain()) is None)
        fired = []
        for i in range(5):
            sync.submit(self.touch(f"m{i}")).addCallback(fired.append)
        yield sync.drain()
        self.assertEqual(len(fired), 5)


class _HeldPool:
    """A pool that only records what it is asked to run, to be run by the test."""

    max = 1

    def __init__(self) -> None:
        self.calls: list = []

    def callInThread(self, f, *args) -> None:
        self.calls.append((f, args))


class _TestReactor(task.Clock):
    """A clock whose callFromThread waits, like the real one, for the test to run it."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list = []

    def callFromThread(self, f, *args) -> None:
        self.from_threads.append((f, args))


class ThreadWakeUpTests(unittest.SynchronousTestCase):
    """When to wake a thread: at once when idle, once per reactor turn when busy."""

    def setUp(self) -> None:
        self.clock, self.pool = _TestReactor(), _HeldPool()
        self.sync = GroupSync(self.clock, self.pool)

    def test_an_idle_commit_starts_at_once(self):
        d = self.sync.submit(lambda: ())
        self.assertEqual(len(self.pool.calls), 1)  # no waiting for the end of the turn
        run, args = self.pool.calls.pop()
        run(*args)
        finished, args = self.clock.from_threads.pop()
        finished(*args)
        self.assertIsNone(self.successResultOf(d))

    def test_while_a_batch_is_in_flight_a_turn_s_jobs_wake_one_thread(self):
        first = self.sync.submit(lambda: ())
        run, args = self.pool.calls.pop()
        run(*args)  # phase 1 and 2 done; its outcome not yet back on the reactor
        jobs = [self.sync.submit(lambda: ()) for _ in range(3)]
        self.assertEqual(self.pool.calls, [])  # not one wake-up per job
        self.clock.advance(0)  # the end of the turn
        self.assertEqual(len(self.pool.calls), 1)
        run, (batch,) = self.pool.calls.pop()
        self.assertEqual([job.deferred for job in batch], jobs)
        finished, args = self.clock.from_threads.pop()
        finished(*args)
        self.assertIsNone(self.successResultOf(first))
        run(batch)
        finished, args = self.clock.from_threads.pop()
        finished(*args)
        self.assertEqual([self.successResultOf(d) for d in jobs], [None] * 3)
        self.assertEqual(self.sync.batches, 2)

    def batch_of_three(self, waits: bool) -> list:
        """The helper threads a batch of three jobs wakes, with four threads to share."""
        sync = GroupSync(self.clock, self.pool, parallel=4)
        sync.submit(lambda: ())
        run, args = self.pool.calls.pop()
        run(*args)
        jobs = [sync.submit(lambda: (), waits=waits) for _ in range(3)]
        self.clock.advance(0)
        run, (batch,) = self.pool.calls.pop()
        run(batch)  # this thread does every job: the helpers it woke find none left
        for finished, args in self.clock.from_threads:
            finished(*args)
        self.assertEqual([self.successResultOf(d) for d in jobs], [None] * 3)
        return self.pool.calls

    def test_jobs_that_wait_for_the_disk_are_shared_among_threads(self):
        self.assertEqual(len(self.batch_of_three(waits=True)), 2)

    def test_jobs_that_do_not_wait_wake_no_other_thread(self):
        # A removal's rename or unlink: waking a helper would cost more than the job.
        self.assertEqual(self.batch_of_three(waits=False), [])
