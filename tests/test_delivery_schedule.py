"""The in-memory schedule: priority and age order, due times on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay.delivery.schedule import Schedule


def qid(priority: int, ms: int) -> str:
    return f"{priority}{ms:011x}000000"


class ScheduleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.woken = 0
        self.schedule = Schedule(self.clock, self.wake)
        self.schedule.start()

    def wake(self) -> None:
        self.woken += 1

    def drain(self) -> list[str]:
        out = []
        while (queue_id := self.schedule.pop()) is not None:
            out.append(queue_id)
        return out

    def test_priority_then_age(self):
        backlog = [qid(3, i) for i in range(100)]
        self.schedule.load((q, None) for q in backlog)
        self.schedule.add(qid(1, 500))
        self.schedule.add(qid(5, 0))
        self.assertEqual(self.drain(), [qid(1, 500), *backlog, qid(5, 0)])

    def test_due_times_wake_in_order(self):
        self.schedule.load([(qid(3, 1), 1060.0), (qid(3, 2), 1030.0), (qid(3, 3), None)])
        self.assertEqual(self.drain(), [qid(3, 3)])
        self.clock.advance(29)
        self.assertEqual((self.woken, self.drain()), (0, []))
        self.clock.advance(1)
        self.assertEqual((self.woken, self.drain()), (1, [qid(3, 2)]))
        self.schedule.add(qid(3, 4), 1040.0)  # earlier than the armed timer
        self.clock.advance(10)
        self.assertEqual(self.drain(), [qid(3, 4)])
        self.clock.advance(20)
        self.assertEqual(self.drain(), [qid(3, 1)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_now_flush_and_discard(self):
        self.schedule.load([(qid(3, i), 5000.0 + i) for i in range(5)])
        self.assertTrue(self.schedule.now(qid(3, 4)))
        self.assertFalse(self.schedule.now(qid(3, 4)))  # already ready
        self.schedule.discard(qid(3, 0))
        self.assertNotIn(qid(3, 0), self.schedule)
        self.assertEqual(self.drain(), [qid(3, 4)])
        self.assertEqual(self.schedule.flush(), 3)
        self.assertEqual(self.drain(), [qid(3, 1), qid(3, 2), qid(3, 3)])
        self.clock.advance(10000)  # stale heap entries never come back
        self.assertEqual((self.woken, self.drain()), (0, []))

    def test_stopped_schedule_keeps_no_timer(self):
        self.schedule.stop()
        self.schedule.add(qid(3, 1), 2000.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.schedule.start()
        self.clock.advance(1000)
        self.assertEqual(self.drain(), [qid(3, 1)])
