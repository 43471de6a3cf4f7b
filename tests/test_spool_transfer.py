"""Node ids in queue ids, and `mailrelay-admin queue import`: one node's spool taken over by
another, exactly once, even when the import is interrupted and run again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from harness import TempPaths, env
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay.config import ConfigError, load_config
from mailrelay.errors import StorageError
from mailrelay.model import Envelope
from mailrelay.spool import transfer
from mailrelay.spool.node import node_id
from mailrelay.spool.queueid import QueueIds, is_queue_id, node_of, priority_of, time_of
from mailrelay.spool.spool import Spool
from mailrelay.spool.state import DeliveryState, RecipientState, RecipientStatus


class NodeIdTests(TempPaths, unittest.TestCase):
    def test_ids_end_with_the_node_and_sort_by_priority_then_time(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        a, b = QueueIds(clock.seconds, node="a0v9"), QueueIds(clock.seconds, node="0001")
        old = QueueIds(clock.seconds)  # before node ids: still read
        first = [a.next(3), b.next(3), old.next(3)]
        clock.advance(0.002)
        later = [b.next(3), a.next(3), old.next(3)]
        urgent = a.next(1)
        ids = first + later + [urgent]
        self.assertTrue(all(is_queue_id(i) for i in ids))
        self.assertEqual([node_of(i) for i in first], ["a0v9", "0001", ""])
        self.assertEqual(len(first[0]), 22)
        ordered = sorted(ids)
        self.assertEqual(ordered[0], urgent)
        self.assertEqual(set(ordered[1:4]), set(first))
        self.assertEqual([time_of(i) for i in ordered[1:]], sorted(time_of(i) for i in ids[:-1]))
        self.assertEqual(priority_of(urgent), 1)
        for bad in ("A0V9", "w000", "abc", "abcde"):
            with self.assertRaises(ValueError):
                QueueIds(clock.seconds, node=bad)
        self.assertFalse(is_queue_id(first[0] + "0"))
        self.assertFalse(is_queue_id(first[0][:-1] + "w"))

    def test_default_made_once_and_kept(self) -> None:
        data = self.mktemp()
        made = node_id(data)
        with open(os.path.join(data, "node_id")) as f:
            self.assertEqual(f.read(), made + "\n")
        self.assertEqual(node_id(data), made)  # a restart: the same
        self.assertEqual(node_id(data, "beef"), "beef")  # the setting wins
        with open(os.path.join(data, "node_id"), "w") as f:
            f.write("nope!\n")
        with self.assertRaises(ValueError):
            node_id(data)


def test_node_id_setting_is_checked(tmp_path):
    path = tmp_path / "mailrelay.ini"
    path.write_text(f"[server]\ndata_dir = {tmp_path}\nnode_id = r3lb\n")
    assert load_config(str(path)).server.node_id == "r3lb"
    path.write_text(f"[server]\ndata_dir = {tmp_path}\nnode_id = relay1\n")
    with pytest.raises(ConfigError, match=r"\[server\] node_id.*not a node id"):
        load_config(str(path))


BODY = b"From: s@a.test\r\nSubject: moving\r\n\r\nbody\r\n"


class ImportTests(TempPaths, unittest.TestCase):
    """Node A (dead, its spool closed) and node B, whose admin tool imports A's spool."""

    def setUp(self) -> None:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.a_data = os.path.join(root, "a")
        self.b_data = os.path.join(root, "b")
        self.config = os.path.join(root, "b.ini")
        with open(self.config, "w") as f:
            f.write(f"[server]\nhostname = b.test\ndata_dir = {self.b_data}\n")
        self.a = Spool(os.path.join(self.a_data, "spool"), reactor=reactor, node="aaaa")
        self.b = Spool(os.path.join(self.b_data, "spool"), reactor=reactor, node="bbbb")
        self.b.open()
        self.addCleanup(self.b.close)

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c", self.config,
                               "queue", *args], capture_output=True, text=True, env=env(),
                              timeout=60)

    @defer.inlineCallbacks
    def fill_a(self):
        """A's spool as kill -9 leaves it: two queued (one tried, half sent), one held, one
        never acknowledged in tmp/. Fires with (queued ids, held id, state of the tried)."""
        self.a.open()
        ids = []
        for sandboxed in (False, False, True):
            envelope = Envelope(id="", sender="s@a.test", recipients=["r@b.test", "q@b.test"],
                                user="a.test", account="default", client_ip="127.0.0.1",
                                helo="client", tls=True, received_at=time.time(),
                                sandboxed=sandboxed)
            incoming = self.a.create(envelope)
            incoming.write(BODY)
            ids.append((yield incoming.commit()))
        state = DeliveryState(attempts=1, first_attempt=1.0, next_attempt=2.0,
                              recipients={"r@b.test": RecipientState(RecipientStatus.SENT, 250),
                                          "q@b.test": RecipientState()})
        yield self.a.save_state(ids[0], state)
        yield self.a.close()
        unacknowledged = QueueIds(time.time, node="aaaa").next(3)
        with open(os.path.join(self.a.directory, "tmp", unacknowledged), "wb") as f:
            f.write(BODY[:10])
        return ids[:2], ids[2], state

    @defer.inlineCallbacks
    def test_import_moves_queue_hold_and_state_once(self):
        queued, held, state = yield self.fill_a()
        self.assertTrue(all(node_of(i) == "aaaa" for i in queued + [held]))
        dry = json.loads(self.admin("import", self.a_data, "--dry-run", "--json").stdout)
        self.assertEqual((dry["queued"], dry["held"], dry["uncommitted"]), (queued, [held], 1))
        self.assertEqual(self.b.queued(), [])
        self.assertEqual(self.a.queued(), queued)

        result = self.admin("import", self.a_data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("imported 2 queued and 1 held messages", result.stdout)
        self.assertIn("1 messages in its tmp/ were never acknowledged", result.stdout)
        self.assertIn("delivered when the relay's delivery next starts", result.stdout)
        self.assertEqual((self.b.queued(), self.b.held()), (queued, [held]))
        self.assertEqual(self.b.read_state(queued[0]), state)  # r@b.test is not sent again
        self.assertEqual(self.b.envelope(queued[1]).recipients, ["r@b.test", "q@b.test"])
        with self.b.open_body(queued[1]) as body:
            self.assertEqual(body.read(), BODY)
        self.assertEqual((self.a.queued(), self.a.held(), sorted(self.a.tried())), ([], [], []))

        again = json.loads(self.admin("import", os.path.join(self.a_data, "spool"),
                                      "--json").stdout)
        self.assertEqual((again["queued"], again["held"]), ([], []))
        self.assertEqual((self.b.queued(), self.b.held()), (queued, [held]))

    @defer.inlineCallbacks
    def test_interrupted_import_run_again_never_duplicates(self):
        queued, held, state = yield self.fill_a()
        stage = os.path.join(self.b.directory, "import")
        for place in ("queue", "hold", "state"):
            os.makedirs(os.path.join(stage, place))
        # Stopped after copying queued[0] (and a part of held), before removing them from A:
        shutil.copy(os.path.join(self.a.directory, "queue", queued[0]),
                    os.path.join(stage, "queue", queued[0]))
        with open(os.path.join(stage, "hold", held + ".part"), "wb") as f:
            f.write(BODY[:5])
        # and after removing queued[1] from A, before landing it here:
        os.rename(os.path.join(self.a.directory, "queue", queued[1]),
                  os.path.join(stage, "queue", queued[1]))

        done = transfer.import_spool(self.a, self.b)
        self.assertEqual((sorted(done.queued), done.held), (sorted(queued), [held]))
        self.assertEqual((self.b.queued(), self.b.held()), (queued, [held]))
        self.assertEqual(self.b.read_state(queued[0]), state)
        for place in ("queue", "hold", "state"):
            self.assertEqual(os.listdir(os.path.join(stage, place)), [])
            self.assertEqual(os.listdir(os.path.join(self.a.directory, place)), [])
        again = transfer.import_spool(self.a, self.b)
        self.assertEqual((again.queued, again.held), ([], []))

    @defer.inlineCallbacks
    def test_an_id_already_here_stays_in_the_source(self):
        queued, _, _ = yield self.fill_a()
        shutil.copy(os.path.join(self.a.directory, "queue", queued[0]),
                    os.path.join(self.b.directory, "queue", queued[0]))
        result = json.loads(self.admin("import", self.a_data, "--json").stdout)
        self.assertEqual((result["already_present"], result["queued"]),
                         ([queued[0]], [queued[1]]))
        self.assertEqual(self.a.queued(), [queued[0]])

    @defer.inlineCallbacks
    def test_refuses_a_spool_still_in_use(self):
        queued, held, _ = yield self.fill_a()
        running = Spool(self.a.directory, reactor=reactor)
        running.open()  # its relay (or delivery process) still runs
        result = self.admin("import", self.a_data)
        self.assertEqual(result.returncode, 1)
        self.assertIn("is in use: its relay (or delivery process) is still running",
                      result.stderr)
        self.assertEqual((self.a.queued(), self.a.held()), (queued, [held]))
        self.assertEqual(self.b.queued(), [])
        yield running.close()
        # and A does not start while it is being imported
        with transfer.lock(self.a.directory), self.assertRaises(StorageError):
            Spool(self.a.directory, reactor=reactor).open()
        for bad in (self.b_data, os.path.join(self.a_data, "nothing")):
            refused = self.admin("import", bad)
            self.assertEqual(refused.returncode, 1)
            self.assertTrue(refused.stderr.strip())
