"""mailrelay-admin queue, run as a subprocess against a real spool (and a running manager)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

from harness import TempPaths, env
from smtp_sink import SMTPSink
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay.control import control_service
from mailrelay.delivery.manager import DeliveryManager
from mailrelay.delivery.router import Hop, SmarthostRouter
from mailrelay.model import Envelope
from mailrelay.spool.spool import Spool
from mailrelay.spool.state import DeliveryState, RecipientState, RecipientStatus

BODY = b"From: s@a.test\r\nSubject: queued one\r\n\r\nbody\r\n"


class QueueCommandTests(TempPaths, unittest.TestCase):
    def setUp(self) -> None:
        root = os.path.abspath(self.mktemp())
        self.directory = os.path.join(root, "spool")
        self.config = os.path.join(root, "mailrelay.ini")
        os.makedirs(root)
        self.data_dir = os.path.join(root, "data")
        os.makedirs(self.data_dir)
        with open(self.config, "w") as f:
            f.write(f"[server]\nhostname = relay.test\ndata_dir = {self.data_dir}\n"
                    f"[spool]\ndirectory = {self.directory}\n")
        self.spool = Spool(self.directory, reactor=reactor)
        self.spool.open()
        self.addCleanup(self.spool.close)

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c", self.config,
                               "queue", *args], capture_output=True, text=True, env=env(),
                              timeout=60)

    def submit(self, recipients=("r@b.test",), **kw) -> defer.Deferred:
        envelope = Envelope(id="", sender="s@a.test", recipients=list(recipients),
                            user="a.test", account="default", client_ip="127.0.0.1",
                            helo="client", tls=True, received_at=time.time() - 7200, **kw)
        incoming = self.spool.create(envelope)
        incoming.write(BODY)
        return incoming.commit()

    def test_empty_queue(self):
        result = self.admin("list")
        self.assertEqual((result.returncode, result.stderr.strip()), (0, "the queue is empty"))
        self.assertEqual(json.loads(self.admin("list", "--json").stdout), [])

    @defer.inlineCallbacks
    def test_show_says_what_dsn_the_sender_asked_for(self):
        queue_id = yield self.submit(["r@b.test", "q@b.test"], ret="HDRS", envid="e+1",
                                     dsn={"r@b.test": {"notify": "NEVER",
                                                       "orcpt": "rfc822;o@b.test"}})
        text = self.admin("show", queue_id).stdout
        self.assertIn("dsn:         RET=HDRS ENVID=e+2B1\n", text)
        self.assertIn("  r@b.test  pending NOTIFY=NEVER ORCPT=rfc822;o@b.test\n", text)
        self.assertIn("  q@b.test  pending\n", text)

    @defer.inlineCallbacks
    def test_list_show_retry_delete_flush(self):
        deferred = yield self.submit(["r@b.test", "ok@b.test"])
        state = DeliveryState(attempts=2, first_attempt=time.time() - 3600,
                              next_attempt=time.time() + 600, last_error="451 4.2.0 later",
                              recipients={
                                  "r@b.test": RecipientState(code=451, text="4.2.0 later",
                                                             remote="mx.b.test"),
                                  "ok@b.test": RecipientState(RecipientStatus.SENT, 250, "ok",
                                                              "mx.b.test")})
        yield self.spool.save_state(deferred, state)
        fresh = yield self.submit(["new@c.test"], priority=1)
        held = yield self.submit(["x@d.test"], sandboxed=True)

        listing = {e["id"]: e for e in json.loads(self.admin("list", "--json").stdout)}
        self.assertEqual(set(listing), {deferred, fresh, held})
        entry = listing[deferred]
        self.assertEqual((entry["state"], entry["user"], entry["sender"], entry["attempts"],
                          entry["last_error"], entry["size"], entry["pending"]),
                         ("queued", "a.test", "s@a.test", 2, "451 4.2.0 later", len(BODY),
                          ["r@b.test"]))
        self.assertGreater(entry["next_attempt"], time.time())
        self.assertGreaterEqual(entry["age"], 7200)
        self.assertEqual((listing[fresh]["attempts"], listing[held]["state"],
                          listing[held]["next_attempt"]), (0, "held", None))
        text = self.admin("list").stdout
        self.assertIn("LAST ERROR", text.splitlines()[0])
        self.assertIn("r@b.test (+1)", text)
        self.assertIn("in 9m", text)
        self.assertIn("never", text)

        shown = json.loads(self.admin("show", deferred, "--json").stdout)
        self.assertEqual({r["address"]: r["status"] for r in shown["recipient_status"]},
                         {"r@b.test": "pending", "ok@b.test": "sent"})
        self.assertIn("Subject: queued one", shown["headers"])
        self.assertEqual(shown["envelope"]["client_ip"], "127.0.0.1")
        text = self.admin("show", deferred).stdout
        self.assertIn("r@b.test  pending  451 4.2.0 later (mx.b.test)", text)
        self.assertIn("  Subject: queued one", text)

        missing = self.admin("show", "3" + "0" * 17)
        self.assertEqual(missing.returncode, 1)
        self.assertIn("no message", missing.stderr)

        # No relay runs: the commands act on the spool and say so.
        retried = self.admin("retry", deferred)
        self.assertEqual(retried.returncode, 0, retried.stderr)
        self.assertIn("not running", retried.stdout)
        self.assertLessEqual(self.spool.read_state(deferred).next_attempt, time.time())
        refused = self.admin("retry", held)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("sandboxed", refused.stderr)
        self.assertEqual(self.admin("retry", "nonsense").returncode, 1)
        state.next_attempt = time.time() + 600
        self.spool.write_state(deferred, state)
        flushed = self.admin("flush")
        self.assertEqual((flushed.returncode, flushed.stdout.split(" (")[0]),
                         (0, "1 deferred messages due now"))
        self.assertLessEqual(self.spool.read_state(deferred).next_attempt, time.time())

        deleted = self.admin("delete", deferred)
        self.assertEqual(deleted.returncode, 0)
        self.assertIn("not running", deleted.stdout)
        self.assertEqual(self.admin("delete", held).returncode, 0)
        self.assertEqual(self.spool.queued(), [fresh])
        self.assertEqual(self.spool.held(), [])
        self.assertIsNone(self.spool.read_state(deferred))
        self.assertEqual(self.admin("delete", deferred).returncode, 1)

    @defer.inlineCallbacks
    def test_retry_reaches_a_running_manager(self):
        sink = SMTPSink(rules={"r@b.test": (451, "4.2.0 later")})
        sink.listen()
        self.addCleanup(sink.stop)
        clock = Clock()
        clock.advance(time.time())
        manager = DeliveryManager(self.spool, SmarthostRouter(Hop("127.0.0.1", sink.port,
                                                                  tls="none")),
                                  reactor, clock=clock, hostname="relay.test",
                                  retry_first=3600)
        self.addCleanup(manager.stop)
        queue_id = yield self.submit()
        yield manager.start()
        yield manager.idle()
        self.assertEqual(self.spool.read_state(queue_id).attempts, 1)
        # The relay's control socket, answered by the manager as the relay's
        # delivery process answers it.
        path = os.path.join(self.data_dir, "control.sock")
        listener = control_service(path, manager, reactor)
        listener.privilegedStartService()
        listener.startService()
        self.addCleanup(listener.stopService)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        sink.rules["r@b.test"] = None
        retried = yield threads.deferToThread(self.admin, "retry", queue_id)
        self.assertEqual((retried.returncode, retried.stdout.strip()),
                         (0, f"{queue_id}: due now"))
        yield manager.idle()  # no clock advanced: the retry came at once
        self.assertEqual([m.recipients for m in sink.messages], [["r@b.test"]])
        self.assertEqual(self.spool.queued(), [])
        gone = yield threads.deferToThread(self.admin, "retry", queue_id)
        self.assertEqual(gone.returncode, 1)
