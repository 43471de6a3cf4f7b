"""The relay's scheduled DKIM record check (manage/dkimcheck.py) against tests/dns_server.py
on loopback: results kept in keys.json, a pending key activated once its record is seen,
a retiring key reported once when its record may go, each in one log line."""

from __future__ import annotations

import shutil
import tempfile
import time

from panel import listen_dns
from test_dkim import value
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailrelay.delivery.router import make_resolver
from mailrelay.manage.dkim import DkimKeys
from mailrelay.manage.dkimcheck import DkimChecker
from mailrelay.manage.stores import at_once

DAY = 86400.0


class DkimCheckTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="mailrelay-dkim-check-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.keys = self.make_keys()
        self.dns = listen_dns()
        self.addCleanup(self.dns.stop)
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.checker = DkimChecker(self.keys, make_resolver([self.dns.address], reactor),
                                   3600, 7 * DAY, self.clock)  # fmt: skip
        self.lines: list[str] = []

        def observe(event):
            if event.get("log_namespace") == "mailrelay.manage.dkimcheck":
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def make_keys(self):
        """The store checked (PostgreSQL's in test_postgres_dkim.py)."""
        return DkimKeys(self.dir, at_once)

    def publish(self, selector: str) -> None:
        (key,) = [k for k in value(self.keys.list()) if k.selector == selector]
        name, text = value(self.keys.txtRecord(key))
        self.dns.zone[name] = [f"TXT {text}"]

    def state(self) -> dict[str, tuple[str, str | None]]:
        return {k.selector: (k.state, k.dns_status) for k in value(self.keys.list())}

    @defer.inlineCallbacks
    def test_a_pending_key_signs_once_seen_and_a_retiring_one_is_reported_once(self):
        value(self.keys.add("good.test", "acme", "s1", "rsa", 1024))
        value(self.keys.add("good.test", "acme", "s2", "rsa", 1024))  # the second: pending
        self.publish("s1")
        yield defer.ensureDeferred(self.checker.check())
        self.assertEqual(self.state(), {"s1": ("active", "ok"), "s2": ("pending", "missing")})
        checked = {k.dns_checked for k in value(self.keys.list())}
        self.assertEqual(checked, {self.clock.seconds()})
        self.assertEqual(self.lines, [])

        self.publish("s2")
        yield defer.ensureDeferred(self.checker.check())
        self.assertEqual(self.state(), {"s1": ("retiring", "ok"), "s2": ("active", "ok")})
        self.assertEqual(self.lines, [
            "DKIM record s2._domainkey.good.test (pending key) is ok in DNS, was missing",
            "DKIM: good.test is signed with selector s2 from now on "
            "(s2._domainkey.good.test seen in DNS); s1 is retiring",
        ])  # fmt: skip

        del self.lines[:]
        yield defer.ensureDeferred(self.checker.check())
        self.assertEqual(self.lines, [])  # not yet retire_after
        self.clock.advance(7 * DAY + 60)
        for _ in range(2):
            yield defer.ensureDeferred(self.checker.check())
        self.assertEqual(self.lines, [
            "DKIM: s1._domainkey.good.test (retiring key) can be withdrawn from DNS now; "
            "then delete the key: mailrelay-admin dkim retire good.test s1",
        ])  # fmt: skip
        self.assertEqual(self.state()["s1"], ("retiring", "ok"))  # deleted by nobody but you

        # A record that disappears is said once, and DNS trouble is kept as unknown.
        del self.dns.zone["s2._domainkey.good.test"]
        self.dns.zone["s1._domainkey.good.test"] = ["SERVFAIL"]
        del self.lines[:]
        yield defer.ensureDeferred(self.checker.check())
        self.assertEqual(self.state(), {"s1": ("retiring", "unknown"),
                                        "s2": ("active", "missing")})
        self.assertIn("DKIM record s2._domainkey.good.test (active key) is missing in DNS, "
                      "was ok", self.lines)
