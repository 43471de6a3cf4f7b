"""BatchWriter: a store that stays away is logged once, not at every attempt, and
nothing of what waited is lost when it comes back."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailrelay.flushing import BatchWriter


class Counts(BatchWriter):
    what = "counts"

    def __init__(self, clock) -> None:
        super().__init__(reactor, clock, interval=1.0)
        self.pending: list[int] = []
        self.written: list[int] = []
        self.down = True

    def _take(self):
        batch, self.pending = self.pending, []
        return batch or None

    def _write(self, batch) -> None:
        if self.down:
            raise OSError("the database is away")
        self.written.extend(batch)

    def _put_back(self, batch) -> None:
        self.pending[:0] = batch


class BatchWriterTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_an_outage_is_logged_once_and_what_waited_is_written_after_it(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        writer = Counts(clock)
        writer.startService()
        for n in range(10):  # ten seconds of a store that is away
            writer.pending.append(n)
            clock.advance(1)
            yield writer._writing  # the write, in a thread of the pool
        failures = [e for e in events if "not written" in e.get("log_format", "")]
        self.assertEqual(len(failures), 1)
        self.flushLoggedErrors(OSError)
        writer.down = False
        clock.advance(1)
        yield writer._writing
        self.assertEqual(writer.written, list(range(10)))
        back = [e for e in events if "written again" in e.get("log_format", "")]
        self.assertEqual([e["count"] for e in back], [10])
        yield writer.stopService()
