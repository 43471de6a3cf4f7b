"""Suppressions, statistics and the archive, on real files."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile

import pg_server
import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.features.archive import DAY, Archive
from mailrelay.features.db import NewerSchema
from mailrelay.features.stats import HOUR, Event, StatsRecorder, StatsStore
from mailrelay.features.suppressions import Reason, SuppressionStore
from mailrelay.postgres.db import Database
from mailrelay.postgres.stats import PgStatsStore
from mailrelay.postgres.suppressions import PgSuppressionStore

T0 = 1_795_000_000.0  # a fixed moment, on an hour boundary below
T0 -= T0 % DAY


def shared_database() -> Database:
    """A fresh database of the tests' PostgreSQL (tests/pg_server.py): the nodes' store."""
    db = Database(pg_server.shared_server().create_database())
    db.open()
    return db


def opened(kind: str, tmp_path, local, shared):
    """The SQLite store in ``tmp_path`` or its PostgreSQL twin: the same answers."""
    if kind == "sqlite":
        return local(str(tmp_path / "store.sqlite")), None
    db = shared_database()
    return shared(db), db


def both_stores(local, shared):
    """A fixture of the SQLite store and, in a second run, its PostgreSQL twin."""

    @pytest.fixture(params=["sqlite", "postgres"])
    def fixture(request, tmp_path):
        store, db = opened(request.param, tmp_path, local, shared)
        yield store
        store.close()
        if db is not None:
            db.close()

    return fixture


suppressions = both_stores(SuppressionStore, PgSuppressionStore)
stats_store = both_stores(StatsStore, PgStatsStore)


def test_suppression_levels(suppressions):
    s = suppressions
    assert s.add("Alice@Example.org", "acme", "news@acme.example", Reason.UNSUBSCRIBE, when=T0)
    assert not s.add("alice@example.org", "acme", "news@acme.example")  # already there
    assert s.add("bob@example.org", "acme")  # account-wide
    assert s.add("carol@example.org")  # global
    got = s.suppressed(
        "acme",
        "news@acme.example",
        ["ALICE@example.org", "bob@example.org", "carol@example.org", "dave@example.org"],
    )
    assert got == {"ALICE@example.org", "bob@example.org", "carol@example.org"}
    # Another user of the account: the account's and the global list, not news@'s.
    assert s.suppressed(
        "acme", "billing@acme.example", ["alice@example.org", "bob@example.org"]
    ) == {"bob@example.org"}
    assert s.contains("alice@example.org", "acme", "news@acme.example")
    (entry,) = s.list("acme", "news@acme.example")
    assert (entry.address, entry.reason, entry.created) == (
        "alice@example.org",
        Reason.UNSUBSCRIBE,
        T0,
    )
    assert [e.address for e in s.list("acme")] == ["alice@example.org", "bob@example.org"]
    assert [(e.address, e.account, e.user) for e in s.list()] == [("carol@example.org", None, None)]
    assert s.remove("alice@example.org", "acme", "news@acme.example")
    assert not s.remove("alice@example.org", "acme", "news@acme.example")
    assert not s.contains("alice@example.org", "acme", "news@acme.example")


def test_accounts_are_separate(suppressions):
    suppressions.add("alice@example.org", "acme", "news@acme.example")
    suppressions.add("bob@example.org", "acme")
    assert (
        suppressions.suppressed(
            "other", "news@acme.example", ["alice@example.org", "bob@example.org"]
        )
        == set()
    )
    assert suppressions.list("other") == []
    assert not suppressions.remove("bob@example.org", "other")


def test_suppression_key_checks(suppressions):
    with pytest.raises(ValueError):
        suppressions.add("a@example.org", None, "user")
    with pytest.raises(ValueError):
        suppressions.add("a@example.org", "", None)


def test_many_addresses_at_once(suppressions):
    for i in range(0, 1200, 3):
        suppressions.add(f"r{i}@example.org", "acme")
    got = suppressions.suppressed("acme", "u", [f"r{i}@example.org" for i in range(1200)])
    assert len(got) == 400


def test_shared_between_processes_views(tmp_path):
    path = str(tmp_path / "s.sqlite")
    daemon, admin = SuppressionStore(path), SuppressionStore(path)
    admin.add("x@example.org", "acme", "u")
    assert daemon.contains("x@example.org", "acme", "u")
    daemon.close()
    admin.close()


def test_stats_query(stats_store):
    store = stats_store
    h0 = int(T0 // HOUR)
    store.add(
        {
            ("acme", "news", h0, "accepted"): 3,
            ("acme", "news", h0 + 1, "accepted"): 2,
            ("acme", "news", h0 + 25, "delivered"): 4,
            ("acme", "bill", h0, "accepted"): 1,
            ("other", "x", h0, "bounced"): 7,
        }
    )
    store.add({("acme", "news", h0, "accepted"): 1})  # adds to the same counter
    totals = store.query("acme", "news")
    assert totals["accepted"] == 6 and totals["delivered"] == 4 and totals["clicks"] == 0
    assert set(totals) == {e.value for e in Event}
    assert store.query("acme")["accepted"] == 7
    assert store.query()["bounced"] == 7 and store.query("acme")["bounced"] == 0
    assert store.query("acme", "news", since=T0 + DAY)["accepted"] == 0
    days = store.query("acme", "news", period="day")
    assert [(p.start, p.counts) for p in days] == [
        (T0, {"accepted": 6}),
        (T0 + DAY, {"delivered": 4}),
    ]
    hours = store.query("acme", period="hour")
    assert [(p.start, p.user, p.counts) for p in hours][:3] == [
        (T0, "bill", {"accepted": 1}),
        (T0, "news", {"accepted": 4}),
        (T0 + HOUR, "news", {"accepted": 2}),
    ]


class StatsRecorderTests(unittest.TestCase):
    """The recorder batches in memory and writes in a pool thread (real reactor)."""

    def setUp(self):
        directory = tempfile.mkdtemp(prefix="mailrelay-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.store = StatsStore(f"{directory}/stats.sqlite")
        self.addCleanup(self.store.close)
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.recorder = StatsRecorder(self.store, reactor, clock=self.clock, max_pending=5)

    @defer.inlineCallbacks
    def test_written_on_the_timer_not_before(self):
        self.recorder.startService()
        self.recorder.record(Event.ACCEPTED, "acme", "news")
        self.recorder.record(Event.ACCEPTED, "acme", "news", n=2)
        self.assertEqual(self.store.query("acme")["accepted"], 0)  # nothing written yet
        self.clock.advance(1)  # the timer fires a write in a thread
        yield self.recorder.flush()  # waits for that write
        self.assertEqual(self.store.query("acme")["accepted"], 3)
        yield self.recorder.stopService()

    @defer.inlineCallbacks
    def test_written_when_many_pending(self):
        for _ in range(5):
            self.recorder.record(Event.DELIVERED, "acme", "news")
        yield self.recorder.flush()
        self.assertEqual(self.store.query("acme")["delivered"], 5)

    @defer.inlineCallbacks
    def test_tracked_events_and_stop_writes_pending(self):
        self.recorder.startService()
        self.recorder.track(Event.CLICKS, "acme", "news", "q1", "a@example.org", "https://x/")
        self.recorder.track(Event.OPENS, "acme", "news", "q1", "a@example.org")
        self.recorder.track(Event.OPENS, "other", "o", "q2", "b@example.org")
        yield self.recorder.stopService()
        totals = self.store.query("acme")
        self.assertEqual((totals["clicks"], totals["opens"]), (1, 1))
        rows = self.store.tracked("acme", "q1")
        self.assertEqual(
            [(r.event, r.recipient, r.url) for r in rows],
            [(Event.CLICKS, "a@example.org", "https://x/"), (Event.OPENS, "a@example.org", None)],
        )
        self.assertEqual(self.store.tracked("acme", "q2"), [])

    @defer.inlineCallbacks
    def test_failed_write_is_kept(self):
        self.recorder.record(Event.ACCEPTED, "acme", "news")
        self.store.close()  # every write now fails
        yield self.recorder.flush()
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.assertEqual(sum(self.recorder._counts.values()), 1)  # kept for the next attempt


def test_archive_store_list_prune(tmp_path):
    archive = Archive(str(tmp_path / "archive"), retention_days=30)
    msg = b"From: Shop <news@shop.example>\r\nSubject: =?utf-8?q?Caf=C3=A9?=\r\n\r\nbody\r\n"
    old = archive.store(
        "news@acme.example",
        "q1",
        msg,
        "news@shop.example",
        ["a@example.org", "hidden@example.org"],
        when=T0,
    )
    new = archive.store(
        "news@acme.example", "q2", msg, "news@shop.example", ["b@example.org"], when=T0 + 40 * DAY
    )
    archive.store("../evil", "q3", msg, "x@shop.example", ["c@example.org"], when=T0)
    entries = archive.list("news@acme.example")
    assert [e.id for e in entries] == [old, new]
    first = entries[0]
    assert (first.date, first.sender, first.subject) == (T0, "news@shop.example", "Café")
    maildir = tmp_path / "archive" / "news@acme.example"
    data = (maildir / "new" / old).read_bytes()
    assert data.startswith(
        b"Return-Path: <news@shop.example>\r\nX-Envelope-To: <a@example.org>"
        b"\r\nX-Envelope-To: <hidden@example.org>\r\n" + msg
    )
    assert first.size == len(data)
    assert sorted(os.listdir(tmp_path / "archive")) == ["%2E.%2Fevil", "news@acme.example"]
    assert archive.users() == ["../evil", "news@acme.example"]
    assert os.listdir(maildir / "tmp") == []
    assert archive.prune(now=T0 + 41 * DAY) == 2  # q1 and q3 are older than 30 days
    assert [e.id for e in archive.list("news@acme.example")] == [new]
    assert archive.list("nobody@acme.example") == []
    assert Archive(str(tmp_path / "archive"), retention_days=0).prune(now=T0 + 999 * DAY) == 0


# ---- schema versions (features/db.py) ----

# What mailrelay wrote before its files carried a schema version (user_version 0), as it
# wrote it: these files must open as version 1 with their rows.
UNVERSIONED = {
    "suppressions": """
    CREATE TABLE suppressions (account TEXT NOT NULL, user TEXT NOT NULL,
        address TEXT NOT NULL, reason TEXT NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (account, user, address)) WITHOUT ROWID;
    CREATE INDEX suppressions_by_address ON suppressions (address);
    INSERT INTO suppressions VALUES ('acme', 'news@acme.example', 'alice@example.org',
                                     'unsubscribe', 1795000000.0);
    """,
    "stats": """
    CREATE TABLE counters (account TEXT NOT NULL, user TEXT NOT NULL,
        hour INTEGER NOT NULL, event TEXT NOT NULL, n INTEGER NOT NULL,
        PRIMARY KEY (account, user, hour, event)) WITHOUT ROWID;
    CREATE TABLE tracked (time REAL NOT NULL, account TEXT NOT NULL, user TEXT NOT NULL,
        queue_id TEXT NOT NULL, recipient TEXT NOT NULL, event TEXT NOT NULL, url TEXT);
    CREATE INDEX tracked_by_message ON tracked (account, queue_id);
    INSERT INTO counters VALUES ('acme', 'news@acme.example', 498611, 'accepted', 5);
    """,
}


def _sqlite_file(path, script: str, version: int = 0) -> str:
    db = sqlite3.connect(path)
    db.executescript(script)
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    return str(path)


def _version(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_an_unversioned_file_is_version_1_and_keeps_its_rows(tmp_path):
    path = _sqlite_file(tmp_path / "s.sqlite", UNVERSIONED["suppressions"])
    store = SuppressionStore(path)
    ((address, reason, created),) = [(e.address, e.reason, e.created)
                                     for e in store.list("acme", "news@acme.example")]
    assert (address, reason, created) == ("alice@example.org", Reason.UNSUBSCRIBE, 1795000000.0)
    assert store.add("bob@example.org", "acme")
    store.close()
    assert _version(path) == SuppressionStore.version() == 1
    path = _sqlite_file(tmp_path / "t.sqlite", UNVERSIONED["stats"])
    store = StatsStore(path)
    assert store.query("acme", "news@acme.example")["accepted"] == 5
    store.close()
    assert _version(path) == StatsStore.version() == 1
    assert SuppressionStore.version() == 1  # a new file starts at the newest version
    SuppressionStore(str(tmp_path / "new.sqlite")).close()
    assert _version(tmp_path / "new.sqlite") == 1


class _Notes(SuppressionStore):
    """The suppression store as a later schema might have it: two more versions."""

    MIGRATIONS = {**SuppressionStore.MIGRATIONS,
                  2: "ALTER TABLE suppressions ADD COLUMN note TEXT; "
                     "UPDATE suppressions SET note = 'from ' || reason;",
                  3: lambda db: db.execute("CREATE TABLE notes_seen (address TEXT)")}


def test_migrations_bring_a_file_forward_in_one_transaction(tmp_path):
    path = _sqlite_file(tmp_path / "s.sqlite", UNVERSIONED["suppressions"])

    def broken(db):
        db.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("the step failed")

    class Broken(_Notes):
        MIGRATIONS = {**_Notes.MIGRATIONS, 4: broken}

    with pytest.raises(sqlite3.OperationalError, match="the step failed"):
        Broken(path)
    assert _version(path) == 0  # nothing of steps 1 to 3 stayed either
    db = sqlite3.connect(path)
    assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ] == ["suppressions"]
    db.close()
    store = _Notes(path)
    assert store.fetch("SELECT address, note FROM suppressions") == [
        ("alice@example.org", "from unsubscribe")]
    store.close()
    assert _version(path) == 3
    with pytest.raises(NewerSchema):  # the older code, after the newer one migrated it
        SuppressionStore(path)


def test_a_file_from_a_newer_mailrelay_is_refused_and_left_alone(tmp_path):
    path = _sqlite_file(tmp_path / "s.sqlite", UNVERSIONED["suppressions"], version=2)
    before = (tmp_path / "s.sqlite").read_bytes()
    for refuse in (SuppressionStore, SuppressionStore.check_file):
        with pytest.raises(NewerSchema) as caught:
            refuse(path)
        assert str(caught.value) == ("schema version 2 is from a newer mailrelay (this one "
                                     "knows versions up to 1)")
    assert (tmp_path / "s.sqlite").read_bytes() == before and not os.path.exists(path + "-wal")
