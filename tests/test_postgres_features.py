"""The nodes' shared suppressions and statistics in a real PostgreSQL (tests/pg_server.py):
a suppression added on one node is in force in another node's delivery cache within a
second; a statistics batch counts once however often it is written; a node killed with
counts pending or a flush under way counts them once when it starts again (the journal);
what the nodes count is summed when read."""

from __future__ import annotations

import os
import shutil
import tempfile

import pg_server
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet import reactor as global_reactor
from twisted.trial import unittest

from mailrelay.bounces.store import ReturnPaths
from mailrelay.bounces.verp import Token, Verp
from mailrelay.features.stats import HOUR, Event
from mailrelay.features.suppressions import Reason
from mailrelay.model import Envelope
from mailrelay.postgres.db import Database
from mailrelay.postgres.returnpaths import PgReturnPathStore
from mailrelay.postgres.stats import JournaledStatsRecorder, PgStatsStore, StatsJournal
from mailrelay.postgres.suppressions import PgSuppressionStore, SuppressionCache, cached

T0 = 1_795_000_000.0 - 1_795_000_000.0 % HOUR
H0 = int(T0 // HOUR)


def node_pool(dsn: str, test: unittest.TestCase) -> Database:
    """One node's pool (each node, each process, has its own)."""
    db = Database(dsn)
    db.open()
    test.addCleanup(db.close)
    return db


async def until(predicate, timeout: float = 10.0, step: float = 0.01) -> float:
    """Spin the reactor until ``predicate()``; how long it took."""
    start = global_reactor.seconds()
    while not predicate():
        if global_reactor.seconds() - start > timeout:
            raise AssertionError("condition not met in time")
        await task.deferLater(global_reactor, step, lambda: None)
    return global_reactor.seconds() - start


class SuppressionCacheTests(unittest.TestCase):
    def setUp(self) -> None:
        dsn = pg_server.shared_server().create_database()
        self.a = PgSuppressionStore(node_pool(dsn, self))  # node A: the API, the CLI
        self.delivery = MultiService()  # node B's delivery process
        self.b = cached(PgSuppressionStore(node_pool(dsn, self)), global_reactor,
                        self.delivery)  # fmt: skip
        self.a.add("old@example.org", "acme", "news")  # there before node B starts

    async def started(self) -> SuppressionCache:
        self.delivery.startService()
        self.addCleanup(self.delivery.stopService)
        await until(lambda: self.b.loaded)
        return self.b

    async def test_a_change_on_one_node_is_in_force_in_anothers_memory_within_a_second(self):
        b = await self.started()
        self.assertEqual(b.suppressed("acme", "news", ["Old@example.org"]), {"Old@example.org"})
        self.a.add("New@Example.org", "acme", "news", Reason.HARD_BOUNCE)
        took = await until(lambda: b.suppressed("acme", "news", ["new@example.org"]))
        self.assertLess(took, 1.0)
        self.a.add("all@example.org")  # global: every account's users
        self.a.add("acct@example.org", "acme")  # the account's users
        await until(lambda: b.suppressed("other", "x", ["all@example.org"]))
        await until(lambda: b.suppressed("acme", "billing", ["acct@example.org"]))
        self.assertEqual(b.suppressed("other", "x", ["acct@example.org", "new@example.org"]),
                         set())
        self.a.remove("new@example.org", "acme", "news")
        await until(lambda: not b.suppressed("acme", "news", ["new@example.org"]))
        self.a.remove_user("news")
        await until(lambda: not b.suppressed("acme", "news", ["old@example.org"]))
        self.a.remove_account("acme")
        await until(lambda: not b.suppressed("acme", "x", ["acct@example.org"]))
        self.assertEqual(b.suppressed("acme", "x", ["all@example.org"]), {"all@example.org"})

    async def test_changes_committed_while_it_loads_are_not_missed(self):
        keys = self.b.store.keys

        def slow_load():  # a change commits between the snapshot and its arrival here
            snapshot = keys()
            self.a.add("during@example.org", "acme", "news")
            self.a.remove("old@example.org", "acme", "news")
            return snapshot

        self.b.store.keys = slow_load
        b = await self.started()
        await until(lambda: b.suppressed("acme", "news", ["during@example.org"]))
        self.assertEqual(b.suppressed("acme", "news", ["old@example.org"]), set())

    def test_before_it_has_loaded_it_asks_the_database(self):
        self.assertFalse(self.b.loaded)
        self.assertEqual(self.b.suppressed("acme", "news", ["old@example.org"]),
                         {"old@example.org"})


class BatchTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dsn = pg_server.shared_server().create_database()
        self.store = PgStatsStore(node_pool(self.dsn, self))

    def test_the_same_batch_written_twice_counts_once(self):
        counts = {("acme", "news", H0, "accepted"): 3}
        self.assertTrue(self.store.add(counts, [], "node1/relay", "b1"))
        self.assertFalse(self.store.add(counts, [], "node1/relay", "b1"))  # a retry
        self.assertTrue(self.store.add(counts, [], "node2/relay", "b1"))  # another node's
        self.assertEqual(self.store.query("acme")["accepted"], 6)

    def test_the_nodes_counts_are_summed_when_read(self):
        key = ("acme", "news", H0, "delivered")
        for i, node in enumerate(("node1/delivery", "node2/delivery", "node3/delivery"), 1):
            self.store.add({key: i}, [], node, f"batch{i}")
        other = PgStatsStore(node_pool(self.dsn, self))  # the panel of any node
        self.assertEqual(other.query("acme", "news")["delivered"], 6)
        [period] = other.query("acme", period="day")
        self.assertEqual((period.user, period.counts), ("news", {"delivered": 6}))
        self.assertEqual(other.retire_user("news", "news (deleted)"), 3)
        self.assertEqual(other.query("acme", "news (deleted)")["delivered"], 6)
        self.assertEqual(other.query("acme", "news")["delivered"], 0)


class _CommitThenFail(PgStatsStore):
    """A store whose first write commits and then reports a failure, as a connection
    lost while the commit's answer was on its way."""

    failed = False

    def add(self, *args, **kwargs) -> bool:
        written = super().add(*args, **kwargs)
        if not self.failed:
            self.failed = True
            raise OSError("connection lost at commit")
        return written


class JournalTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dsn = pg_server.shared_server().create_database()
        self.store = PgStatsStore(node_pool(self.dsn, self))
        self.directory = tempfile.mkdtemp(prefix="mailrelay-journal-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.clock = task.Clock()
        self.clock.advance(T0)

    def recorder(self, store=None) -> JournaledStatsRecorder:
        """The node's recorder as made at a start, over its journal directory."""
        return JournaledStatsRecorder(store or self.store, global_reactor,
                                      StatsJournal(self.directory), "node1/relay",
                                      clock=self.clock)  # fmt: skip

    def accepted(self) -> int:
        return self.store.query("acme")["accepted"]

    @defer.inlineCallbacks
    def test_counts_pending_at_a_kill_are_written_at_the_next_start_once(self):
        first = self.recorder()
        first.startService()
        for _ in range(5):
            first.record(Event.ACCEPTED, "acme", "news")
        first.track(Event.CLICKS, "acme", "news", "q1", "a@example.org", "https://x/")
        first._loop.stop()  # killed: never flushed, never stopped
        self.assertEqual(self.accepted(), 0)
        again = self.recorder()
        again.startService()
        yield again.stopService()
        self.assertEqual(self.accepted(), 5)
        self.assertEqual(self.store.query("acme")["clicks"], 1)
        self.assertEqual([t.url for t in self.store.tracked("acme", "q1")], ["https://x/"])
        self.assertEqual(os.listdir(self.directory), [])  # written: the journal is empty

    @defer.inlineCallbacks
    def test_a_kill_after_the_commit_before_the_journal_knew_counts_once(self):
        first = self.recorder()
        first.startService()
        for _ in range(3):
            first.record(Event.ACCEPTED, "acme", "news")
        first._loop.stop()
        [batch] = first._take()  # the flush of a node killed after its commit:
        self.store.add(batch.counts, batch.tracked, first.node, batch.id)  # written...
        self.assertEqual(len(os.listdir(self.directory)), 1)  # ...but still in the journal
        again = self.recorder()
        again.startService()
        again.record(Event.ACCEPTED, "acme", "news")
        yield again.stopService()
        self.assertEqual(self.accepted(), 4)

    @defer.inlineCallbacks
    def test_a_write_that_failed_after_its_commit_is_retried_with_its_id(self):
        store = _CommitThenFail(node_pool(self.dsn, self))
        recorder = self.recorder(store)
        recorder.record(Event.ACCEPTED, "acme", "news", n=2)
        yield recorder.flush()  # committed, reported failed: kept with its id
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        recorder.record(Event.ACCEPTED, "acme", "news")
        yield recorder.flush()
        self.assertEqual(self.accepted(), 3)
        self.assertEqual(os.listdir(self.directory), [])

    @defer.inlineCallbacks
    def test_a_line_cut_by_the_kill_is_not_counted(self):
        first = self.recorder()
        first.record(Event.ACCEPTED, "acme", "news")
        [name] = os.listdir(self.directory)
        with open(os.path.join(self.directory, name), "ab") as f:
            f.write(b'["c","acme","news",')  # the write the kill interrupted
        again = self.recorder()
        again.startService()
        yield again.stopService()
        self.assertEqual(self.accepted(), 1)


class ReturnPathTests(unittest.TestCase):
    async def test_the_records_of_a_burst_go_in_one_transaction_and_any_node_finds_them(self):
        dsn = pg_server.shared_server().create_database()
        store = PgReturnPathStore(node_pool(dsn, self))
        calls: list[int] = []
        many = store.record_many
        store.record_many = lambda batch: calls.append(len(batch)) or many(batch)
        paths = ReturnPaths(Verp(bytes(32)), store, global_reactor)
        envelopes = [Envelope(id=f"{i:018x}ab", sender="news@doe.test",
                              recipients=[f"r{i}@x.test"], user="news@doe.test",
                              account="acme", client_ip=None, helo=None, tls=True,
                              received_at=0.0, return_path="bounces.doe.test")
                     for i in range(20)]
        await defer.gatherResults([paths.record(e) for e in envelopes])
        self.assertEqual(sum(calls), 20)
        self.assertLess(len(calls), 20)  # the first at once, those that waited together
        other = PgReturnPathStore(node_pool(dsn, self))  # another node's bounce listener
        found = other.resolve(Token("bounces.doe.test", envelopes[7].id, 0))
        self.assertEqual((found.account, found.user, found.recipient),
                         ("acme", "news@doe.test", "r7@x.test"))
