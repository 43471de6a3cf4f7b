"""The SMTP sink and the DNS server as subprocesses, as end-to-end tests run them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from harness import ROOT, TempPaths, env, wait_for
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay.delivery.client import Courier, Job
from mailrelay.delivery.router import Hop, MXRouter, make_resolver


class SubprocessTests(TempPaths, unittest.TestCase):
    def spawn(self, script: str, *args: str) -> int:
        port_file = os.path.join(self.mktemp() + ".port")
        process = subprocess.Popen([sys.executable, str(ROOT / "tests" / script),
                                    "--port-file", port_file, *args], env=env())

        def end():
            process.terminate()
            process.wait(timeout=30)

        self.addCleanup(end)
        wait_for(lambda: os.path.exists(port_file) or process.poll() is not None,
                 what=f"{script} to listen")
        self.assertIsNone(process.poll(), f"{script} exited")
        with open(port_file) as f:
            return int(f.read())

    @defer.inlineCallbacks
    def test_sink_records_and_follows_its_rules_file(self):
        records = os.path.abspath(self.mktemp())
        rules = os.path.abspath(self.mktemp())
        with open(rules, "w") as f:
            json.dump({"no@b.test": [550, "5.1.1 unknown"]}, f)
        port = self.spawn("smtp_sink.py", "--record-dir", records, "--rules", rules)
        body = b"Subject: hi\r\n\r\n.dot\r\n"
        results = {}
        jobs = iter([Job("q", "s@a.test", ["ok@b.test", "no@b.test"], lambda: io.BytesIO(body))])
        yield Courier(reactor, "relay.test").send(
            [Hop("127.0.0.1", port, tls="none")], lambda: next(jobs, None),
            lambda job, rs: results.update({r.recipient: r.code for r in rs}))
        self.assertEqual(results, {"ok@b.test": 250, "no@b.test": 550})
        with open(os.path.join(records, "1.json")) as f:
            meta = json.load(f)
        self.assertEqual((meta["sender"], meta["recipients"]), ("s@a.test", ["ok@b.test"]))
        with open(os.path.join(records, "1.eml"), "rb") as f:
            self.assertEqual(f.read(), body)

    @defer.inlineCallbacks
    def test_dns_server_serves_records_from_the_command_line(self):
        zone = os.path.abspath(self.mktemp())
        with open(zone, "w") as f:
            json.dump({"mx.x.test": ["A 127.0.0.1"]}, f)
        port = self.spawn("dns_server.py", "--zone", zone, "--record", "x.test MX 10 mx.x.test")
        router = MXRouter(make_resolver([("127.0.0.1", port)]), allow_local=True)
        hops = yield router.route("x.test")
        self.assertEqual([(h.host, h.address) for h in hops], [("mx.x.test", "127.0.0.1")])
