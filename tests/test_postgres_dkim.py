"""DKIM keys in PostgreSQL (postgres/dkim.py) against a real server: the key directory's
behaviour (the same cases run on both), the scheduled record check of test_dkim_check.py,
two relays checking at once without fighting, and a delivery process's signer told of a
key made on another node."""

from __future__ import annotations

import time

import dkim
import pg_server
import pytest
import test_dkim_check
from panel import listen_dns
from test_dkim import value
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.delivery.router import make_resolver
from mailrelay.dkim import Signer
from mailrelay.manage.dkim import DkimKeys, KeyConflict, UnknownKey
from mailrelay.manage.dkimcheck import DkimChecker
from mailrelay.manage.stores import at_once
from mailrelay.postgres.db import Database
from mailrelay.postgres.dkim import PgDkimKeys, PgSigner

MSG = (b"From: a@good.test\r\nTo: b@example.test\r\nSubject: hi\r\n"
       b"Date: Sun, 06 Dec 2026 08:00:00 +0000\r\nMessage-ID: <1@good.test>\r\n\r\nhello\r\n")


def open_db(dsn: str, cleanups) -> Database:
    db = Database(dsn)
    db.open()
    cleanups(db.close)
    return db


@pytest.fixture(params=["files", "postgres"])
def store(request, tmp_path):
    """(IDkimKeys, a new signer over the same keys) of the key directory or of PostgreSQL."""
    if request.param == "files":
        directory = str(tmp_path / "dkim")
        return DkimKeys(directory, at_once), lambda: Signer(directory)
    db = open_db(pg_server.shared_server().create_database(), request.addfinalizer)
    return PgDkimKeys(db, at_once), lambda: PgSigner(db, reactor)


def selectors(signer, account: str = "acme") -> list[bytes]:
    signer.refresh()
    fields = signer.sign(MSG, account).split(b"DKIM-Signature: ")[1:]
    return [f.split(b"s=")[1].split(b";")[0] for f in fields]


def test_keys_made_rotated_and_deleted_sign_as_in_the_key_directory(store):
    keys, signer = store
    value(keys.add("good.test", "acme", "s1", "rsa", 1024))
    value(keys.add("good.test", "acme", "ed", "ed25519", 0))
    pending = value(keys.add("good.test", "acme", "s2", "rsa", 1024))
    assert pending.state == "pending"  # a second key of a type waits for its record
    with pytest.raises(KeyConflict):
        value(keys.add("good.test", "acme", "s1", "rsa", 1024))
    with pytest.raises(KeyConflict):
        value(keys.add("good.test", "acme", "s3", "rsa", 1024, "pending"))
    assert [(k.selector, k.state) for k in value(keys.ofDomain("good.test"))] \
        == [("ed", "active"), ("s1", "active"), ("s2", "pending")]  # fmt: skip
    assert selectors(signer()) == [b"s1", b"ed"]

    key, old = value(keys.promote("good.test", "s2"))
    assert (key.state, [(k.selector, k.state) for k in old]) == ("active", [("s1", "retiring")])
    with pytest.raises(UnknownKey):
        value(keys.promote("good.test", "s2"))  # done already: the second activation
    assert selectors(signer()) == [b"s2", b"ed"]
    # The record to publish verifies what the key signs.
    name, record = value(keys.txtRecord(key))
    signed = signer()
    signed.refresh()
    message = signed.sign(MSG, "acme").split(b"DKIM-Signature: ")
    only_rsa = b"DKIM-Signature: " + message[1] + MSG
    assert dkim.verify(only_rsa, dnsfunc=lambda n, timeout=5: record.encode()
                       if n.decode().rstrip(".") == name else None)  # fmt: skip

    with pytest.raises(KeyConflict):
        value(keys.retire("good.test", "s2"))  # active: not retired
    assert value(keys.retire("good.test", "s1")).selector == "s1"
    assert value(keys.remove("good.test", "ed")).selector == "ed"
    with pytest.raises(UnknownKey):
        value(keys.remove("good.test", "ed"))
    assert [k.selector for k in value(keys.list())] == ["s2"]
    assert selectors(signer()) == [b"s2"]
    assert selectors(signer(), "other") == []  # a key signs only its account's mail


def test_an_older_look_up_does_not_replace_a_newer_one(store):
    keys, _ = store
    value(keys.add("good.test", "acme", "s1", "rsa", 1024))
    value(keys.recordChecks({("good.test", "s1"): "ok"}, 200.0))
    value(keys.recordChecks({("good.test", "s1"): "missing"}, 100.0))  # a slower relay's
    (key,) = value(keys.list())
    assert (key.dns_status, key.dns_checked) == ("ok", 200.0)


class PgDkimCheckTests(test_dkim_check.DkimCheckTests):
    """The scheduled record check with the keys in PostgreSQL."""

    def make_keys(self):
        db = open_db(pg_server.shared_server().create_database(), self.addCleanup)
        return PgDkimKeys(db, at_once)


class TwoRelaysTests(unittest.TestCase):
    """Two relays (each its pool) over one database."""

    def setUp(self):
        dsn = pg_server.shared_server().create_database()
        self.a = PgDkimKeys(open_db(dsn, self.addCleanup), at_once)
        self.b = PgDkimKeys(open_db(dsn, self.addCleanup), at_once)

    @defer.inlineCallbacks
    def test_both_relays_check_at_once_and_one_activates(self):
        dns = listen_dns()
        self.addCleanup(dns.stop)
        resolver = make_resolver([dns.address], reactor)
        value(self.a.add("good.test", "acme", "s1", "rsa", 1024))
        value(self.a.add("good.test", "acme", "s2", "rsa", 1024))
        for key in value(self.a.list()):
            name, text = value(self.a.txtRecord(key))
            dns.zone[name] = [f"TXT {text}"]
        clock = task.Clock()
        clock.advance(time.time())
        tried, activated = [], []
        checkers = [DkimChecker(keys, resolver, 3600, 7 * 86400.0, clock)
                    for keys in (self.a, self.b)]  # fmt: skip
        for checker in checkers:
            promote = checker.keys.promote

            def counted(domain, selector, promote=promote):
                tried.append(selector)
                d = promote(domain, selector)
                d.addCallback(lambda done: activated.append(done[0].selector) or done)
                return d

            checker.keys.promote = counted
        # Both list the keys, then both look the records up (the DNS answers interleave
        # them), then both find s2 pending with its record published: one switches.
        yield defer.gatherResults([defer.ensureDeferred(c.check()) for c in checkers])
        self.assertEqual((tried, activated), (["s2", "s2"], ["s2"]))
        self.assertEqual({k.selector: (k.state, k.dns_status) for k in value(self.b.list())},
                         {"s1": ("retiring", "ok"), "s2": ("active", "ok")})

    @defer.inlineCallbacks
    def test_a_key_made_on_one_node_signs_on_the_other_within_a_second(self):
        signer = PgSigner(self.b.db, reactor)
        signer.listener.startService()
        self.addCleanup(signer.listener.stopService)
        signer.refresh()
        self.assertFalse(signer.due())
        self.assertEqual(signer.sign(MSG, "acme"), b"")
        yield self._listening(signer)
        value(self.a.add("good.test", "acme", "s1", "rsa", 1024))
        deadline = time.monotonic() + 1.0
        while not signer.due():  # the notification
            self.assertLess(time.monotonic(), deadline, "no notification within a second")
            yield task.deferLater(reactor, 0.01, lambda: None)
        signer.refresh()
        self.assertIn(b"s=s1;", signer.sign(MSG, "acme"))
        # A record check changes no key that signs: nothing to read again.
        value(self.a.recordChecks({("good.test", "s1"): "ok"}))
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(signer.due())

    @defer.inlineCallbacks
    def _listening(self, signer):
        for _ in range(200):
            if signer.listener.listening.is_set():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("the listener did not start")
