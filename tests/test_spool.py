"""The durable spool on real directories (and a real, small tmpfs for a full disk)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from mailrelay.errors import StorageError
from mailrelay.model import Envelope
from mailrelay.spool.incoming import SPILL_BYTES
from mailrelay.spool.queueid import QueueIds, is_queue_id, priority_of, time_of
from mailrelay.spool.spares import LIST_INTERVAL, Spares
from mailrelay.spool.spool import Spool
from mailrelay.spool.state import DeliveryState, RecipientState, RecipientStatus

BODY = (b"Received: from client (127.0.0.1) by relay\r\nFrom: a@x.example\r\n"
        b"Subject: test\r\n\r\n.leading dot stays unstuffed\r\n8bit \xc3\xa9\r\n")


LARGE = BODY * (SPILL_BYTES // len(BODY) + 1)  # written to tmp/ as it arrives


def envelope(**kw) -> Envelope:
    fields = dict(id="", sender="a@x.example", recipients=["b@y.example", "c@z.example"],
                  user="x.example", account="default", client_ip="127.0.0.1",
                  helo="client", tls=True, received_at=1700000000.5)
    fields.update(kw)
    return Envelope(**fields)


def listing(spool: Spool, place: str) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.directory, place)))


class QueueIdTests(unittest.TestCase):
    def test_burst_unique_and_ordered(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000.123)
        ids = QueueIds(clock.seconds)
        burst = [ids.next(3) for _ in range(50_000)]  # all in one millisecond
        self.assertEqual(len(set(burst)), len(burst))
        self.assertEqual(burst, sorted(burst))
        self.assertTrue(all(is_queue_id(i) for i in burst))

    def test_lanes_never_meet(self) -> None:
        # The relay and its delivery process write the same spool in the same millisecond.
        clock = Clock()
        clock.advance(1_700_000_000.5)
        relay, delivery = QueueIds(clock.seconds), QueueIds(clock.seconds, lane=1)
        ours = [relay.next(3) for _ in range(20_000)]
        theirs = [delivery.next(3) for _ in range(20_000)]
        self.assertFalse(set(ours) & set(theirs))
        self.assertTrue(all(is_queue_id(i) for i in ours + theirs))
        with self.assertRaises(ValueError):
            QueueIds(clock.seconds, lane=2)

    def test_priority_then_age(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        ids = QueueIds(clock.seconds)
        old_normal = ids.next(3)
        clock.advance(60)
        new_normal = ids.next(3)
        new_urgent = ids.next(1)
        self.assertEqual(sorted([new_normal, old_normal, new_urgent]),
                         [new_urgent, old_normal, new_normal])
        self.assertEqual(priority_of(new_urgent), 1)
        self.assertEqual(time_of(old_normal), 1_700_000_000)

    def test_clock_going_back_keeps_order(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_100)
        ids = QueueIds(clock.seconds)
        first = ids.next(3)
        clock.rightNow -= 50
        self.assertLess(first, ids.next(3))

    def test_format(self) -> None:
        ids = QueueIds(lambda: 1_700_000_000.0)
        queue_id = ids.next(5)
        self.assertEqual(len(queue_id), 18)
        self.assertEqual(queue_id[:12], "5" + format(1_700_000_000_000, "011x"))
        self.assertRaises(ValueError, ids.next, 0)
        for bad in ("../../etc/passwd", "3" * 19, "0" + "a" * 17, "3" + "A" * 17):
            self.assertFalse(is_queue_id(bad), bad)


class DeliveryStateTests(unittest.TestCase):
    def test_round_trip_and_helpers(self) -> None:
        state = DeliveryState.fresh(["a@x", "b@y", "c@z"])
        self.assertEqual(state.pending(), ["a@x", "b@y", "c@z"])
        state.attempts, state.first_attempt, state.next_attempt = 1, 10.0, 70.0
        state.last_error = "451 try later"
        state.recipients["a@x"] = RecipientState(RecipientStatus.SENT, 250, "ok", "mx.x")
        state.recipients["b@y"] = RecipientState(RecipientStatus.FAILED, 550, "no", "mx.y")
        self.assertEqual((state.pending(), state.sent(), state.failed()),
                         (["c@z"], ["a@x"], ["b@y"]))
        self.assertFalse(state.done)
        data = json.loads(json.dumps(state.to_json()))
        self.assertEqual(data["recipients"]["a@x"],
                         {"status": "sent", "code": 250, "text": "ok", "remote": "mx.x"})
        self.assertEqual(DeliveryState.from_json(data), state)
        state.recipients["c@z"].status = RecipientStatus.SENT
        self.assertTrue(state.done)


class SpoolTestBase(unittest.TestCase):
    def tempdir(self) -> str:
        path = tempfile.mkdtemp(prefix="mailrelay-spool-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def open_spool(self, directory: str | None = None, **kw) -> Spool:
        spool = Spool(os.path.join(directory or self.tempdir(), "spool"), **kw)
        spool.open()
        self.addCleanup(spool.close)
        return spool

    def receive(self, spool: Spool, body: bytes = BODY, **kw):
        msg = spool.create(envelope(**kw))
        for i in range(0, len(body), 7):  # small writes, as lines arrive
            msg.write(body[i:i + 7])
        return msg


class CommitTests(SpoolTestBase):
    @defer.inlineCallbacks
    def test_commit_is_durable_before_it_fires(self):
        spool = self.open_spool()
        msg = self.receive(spool)
        self.assertTrue(is_queue_id(msg.id))
        self.assertEqual(msg.envelope.id, msg.id)
        self.assertEqual(msg.size, len(BODY))
        # A small message is held in memory: the reactor made no file system call.
        self.assertEqual(listing(spool, "tmp") + listing(spool, "queue"), [])

        seen = []
        d = msg.commit()
        # When it fires, the rename is done and the queue directory was already fsynced.
        d.addCallback(lambda queue_id: seen.append(
            (queue_id, listing(spool, "queue"), listing(spool, "tmp"), spool.dir_syncs)))
        yield d
        self.assertEqual(seen, [(msg.id, [msg.id], [], 1)])

        with open(os.path.join(spool.directory, "queue", msg.id), "rb") as f:
            first, rest = f.readline(), f.read()
        self.assertEqual(json.loads(first), envelope(id=msg.id).to_json())
        self.assertEqual(rest, BODY)
        self.assertEqual(spool.envelope(msg.id), envelope(id=msg.id))
        with spool.open_body(msg.id) as f:
            self.assertEqual(f.read(), BODY)
        snap = spool.snapshot(msg.id)
        header = BODY.split(b"\r\n\r\n")[0] + b"\r\n"
        self.assertEqual((snap.place, snap.envelope, snap.size, snap.headers),
                         ("queue", envelope(id=msg.id), len(BODY), header))
        self.assertEqual(spool.locate(msg.id), "queue")
        self.assertEqual(spool.path(msg.id), os.path.join(spool.directory, "queue", msg.id))
        self.assertEqual(spool.queued(), [msg.id])
        self.assertIsNone(spool.read_state(msg.id))
        mode = os.stat(spool.path(msg.id)).st_mode & 0o777
        self.assertEqual(mode, 0o600)

    @defer.inlineCallbacks
    def test_sandboxed_goes_to_hold(self):
        spool = self.open_spool()
        queue_id = yield self.receive(spool, sandboxed=True).commit()
        self.assertEqual(spool.held(), [queue_id])
        self.assertEqual(spool.queued(), [])
        self.assertEqual(spool.locate(queue_id), "hold")
        self.assertTrue(spool.envelope(queue_id).sandboxed)

    @defer.inlineCallbacks
    def test_subscribers_hear_of_queued_messages_once_durable(self):
        spool = self.open_spool()
        heard = []
        spool.subscribe(lambda env: heard.append((env.id, spool.locate(env.id))))
        spool.subscribe(lambda env: 1 / 0)  # a broken subscriber harms nobody
        queued = yield self.receive(spool).commit()
        yield self.receive(spool, sandboxed=True).commit()  # held: never for delivery
        aborted = self.receive(spool)
        aborted.abort()
        self.assertEqual(heard, [(queued, "queue")])
        self.flushLoggedErrors(ZeroDivisionError)

    @defer.inlineCallbacks
    def test_submit_queues_a_whole_message(self):
        spool = self.open_spool()
        queue_id = yield spool.submit(envelope(sender=""), BODY)
        self.assertEqual(spool.queued(), [queue_id])
        with spool.open_body(queue_id) as f:
            self.assertEqual(f.read(), BODY)
        self.assertEqual(spool.envelope(queue_id).sender, "")

    @defer.inlineCallbacks
    def test_queue_order_is_priority_then_age(self):
        spool = self.open_spool()
        normal = yield self.receive(spool, priority=3).commit()
        urgent = yield self.receive(spool, priority=1).commit()
        newer = yield self.receive(spool, priority=3).commit()
        self.assertEqual(spool.queued(), [urgent, normal, newer])

    def test_abort_leaves_nothing(self):
        spool = self.open_spool()
        msg = self.receive(spool)
        msg.abort()
        msg.abort()
        msg.write(b"more lines after an over-size abort are dropped\r\n")
        self.assertEqual(listing(spool, "tmp"), [])
        self.assertEqual(listing(spool, "queue"), [])
        self.assertRaises(RuntimeError, msg.commit)

    @defer.inlineCallbacks
    def test_failed_commit_fails_alone(self):
        spool = self.open_spool()
        leader = self.receive(spool).commit()  # in flight: the next two usually share a batch
        good, bad = self.receive(spool), self.receive(spool, body=LARGE)
        os.unlink(os.path.join(spool.directory, "tmp", bad.id))  # its rename will fail
        d_good, d_bad = good.commit(), bad.commit()
        leader_id = yield leader
        self.assertEqual((yield d_good), good.id)
        failure = yield self.assertFailure(d_bad, StorageError)
        self.assertFalse(failure.full)
        self.assertEqual(spool.queued(), sorted([leader_id, good.id]))
        self.assertEqual(listing(spool, "tmp"), [])
        bad.abort()  # harmless after a failed commit
        self.assertRaises(RuntimeError, good.commit)
        self.assertRaises(RuntimeError, good.write, b"too late\r\n")
        good.abort()  # harmless after a commit: the message stays queued
        self.assertIn(good.id, spool.queued())

    @defer.inlineCallbacks
    def test_concurrent_commits_share_directory_fsyncs(self):
        spool = self.open_spool()
        n = 200
        msgs = [self.receive(spool, body=BODY + b"%d\r\n" % i) for i in range(n)]
        ids = yield defer.gatherResults([m.commit() for m in msgs])
        self.assertEqual(sorted(ids), spool.queued())
        self.assertEqual(len(set(ids)), n)
        # The first commit goes alone; the others arrive while it syncs and join the next
        # (or two, when its thread is done before the reactor has submitted them all).
        self.assertLessEqual(spool.batches, 3)
        self.assertEqual(spool.dir_syncs, spool.batches)
        with spool.open_body(ids[-1]) as f:
            self.assertEqual(f.read(), BODY + b"%d\r\n" % (n - 1))


class HeldInMemoryTests(SpoolTestBase):
    @defer.inlineCallbacks
    def test_a_large_message_goes_to_tmp_as_it_arrives(self):
        spool = self.open_spool()
        msg = spool.create(envelope())
        msg.write(LARGE[:SPILL_BYTES // 2])
        self.assertEqual(listing(spool, "tmp"), [])
        msg.write(LARGE[SPILL_BYTES // 2:])
        self.assertEqual(listing(spool, "tmp"), [msg.id])
        queue_id = yield msg.commit()
        self.assertEqual((listing(spool, "tmp"), spool.queued()), ([], [queue_id]))
        with spool.open_body(queue_id) as f:
            self.assertEqual(f.read(), LARGE)
        aborted = spool.create(envelope())
        aborted.write(LARGE)
        aborted.abort()
        self.assertEqual(listing(spool, "tmp"), [])

    @defer.inlineCallbacks
    def test_a_taken_tmp_name_fails_the_commit_and_is_left_alone(self):
        spool = self.open_spool()
        msg = self.receive(spool)
        other = os.path.join(spool.directory, "tmp", msg.id)
        with open(other, "wb") as f:
            f.write(b"not ours")
        error = yield self.assertFailure(msg.commit(), StorageError)
        self.assertFalse(error.full)
        with open(other, "rb") as f:
            self.assertEqual(f.read(), b"not ours")
        self.assertEqual(spool.queued(), [])
        self.flushLoggedErrors(FileExistsError)

    def test_free_space_is_read_at_most_once_a_second(self):
        clock = Clock()
        spool = Spool(os.path.join(self.tempdir(), "spool"), reactor=clock, min_free_bytes=1)
        spool.open()
        self.addCleanup(spool.close)
        reads = []
        real = spool.free_bytes
        spool.free_bytes = lambda: reads.append(1) or real()
        for step in (0, 0.5, 0.4, 0.1, 0.5):
            clock.advance(step)
            spool.create(envelope()).abort()
        self.assertEqual(len(reads), 2)  # at 0 and at 1.0


class OpenTests(SpoolTestBase):
    def test_open_removes_stale_tmp_and_orphaned_state(self):
        base = self.tempdir()
        spool_dir = os.path.join(base, "spool")
        for place in ("tmp", "queue", "state"):
            os.makedirs(os.path.join(spool_dir, place))
        kept = "3" + "0" * 17
        orphan = "3" + "1" * 17
        for rel in (f"tmp/{kept}", "tmp/3aaaaaaaaaaaaaaaaa.state-1234", f"queue/{kept}",
                    f"state/{kept}.json", f"state/{orphan}.json"):
            with open(os.path.join(spool_dir, rel), "w") as f:
                f.write("{}\n")
        with capturedLogs() as events:
            spool = self.open_spool(base)
        self.assertEqual(listing(spool, "tmp"), [])
        self.assertEqual(listing(spool, "state"), [f"{kept}.json"])
        self.assertEqual(listing(spool, "hold"), [])
        self.assertEqual(spool.queued(), [kept])
        [event] = [e for e in events if "stale" in e.get("log_format", "")]
        self.assertEqual((event["stale"], event["orphans"], event["queued"]), (2, 1, 1))

    def test_a_second_process_opening_the_spool_cleans_nothing(self):
        # The delivery process shares the relay's spool: the relay's messages being
        # received sit in tmp/ and must survive it opening the spool.
        base = self.tempdir()
        owner = self.open_spool(base)
        receiving = self.receive(owner, b"half a message")
        receiving.write(b"x" * (SPILL_BYTES + 1))  # large enough to be in tmp/ already
        shared = Spool(owner.directory, owner=False)
        shared.open()
        self.addCleanup(shared.close)
        self.assertEqual(listing(owner, "tmp"), [receiving.id])
        made = shared.create(envelope())
        # Another lane of ids: the six last digits start at 800000 instead of 000000.
        self.assertEqual((int(receiving.id[-6], 16) >= 8, int(made.id[-6], 16) >= 8),
                         (False, True))
        made.abort()

    @defer.inlineCallbacks
    def test_as_a_service_stopping_after_commits_in_flight(self):
        spool = Spool(os.path.join(self.tempdir(), "spool"))
        spool.startService()
        committed = []
        for _ in range(5):
            self.receive(spool).commit().addCallback(committed.append)
        yield spool.stopService()
        self.assertEqual(sorted(committed), spool.queued())
        self.assertEqual(len(committed), 5)


class SpareTests(SpoolTestBase):
    """Delivered messages' files are written over by the next messages (spares.py)."""

    def inode(self, spool: Spool, place: str, name: str) -> int:
        return os.stat(os.path.join(spool.directory, place, name)).st_ino

    @defer.inlineCallbacks
    def test_a_delivered_file_is_the_next_message_file(self):
        spool = self.open_spool()
        old = yield self.receive(spool, BODY * 3).commit()
        old_inode = self.inode(spool, "queue", old)
        yield spool.remove(old)
        self.assertEqual(spool.queued(), [])
        [slot] = listing(spool, "spare")
        self.assertEqual(self.inode(spool, "spare", slot), old_inode)

        new = yield self.receive(spool, b"short\r\n").commit()
        self.assertEqual(self.inode(spool, "queue", new), old_inode)  # no new file made
        with spool.open_body(new) as body:  # none of the longer old content is left
            self.assertEqual(body.read(), b"short\r\n")
        self.assertEqual(spool.envelope(new).id, new)
        self.assertEqual((listing(spool, "spare"), listing(spool, "tmp")), ([], []))

    @defer.inlineCallbacks
    def test_a_reader_never_takes_the_next_message_for_a_delivered_one(self):
        """queue show and the panel read a message while delivery removes it and a new
        one is written over its file: they get KeyError, never the next message's
        envelope or headers under the old id."""
        spool = self.open_spool()
        old = yield self.receive(spool, b"Subject: old\r\n\r\n" + b"x" * 4000).commit()
        old_inode = self.inode(spool, "queue", old)
        new = []

        @defer.inlineCallbacks
        def deliver_and_reuse():
            yield spool.remove(old)
            new.append((yield self.receive(spool, b"Subject: new\r\n\r\n").commit()))

        opened = spool._open

        def open_then_reuse(queue_id):  # the reader holds the file when it is reused
            f = opened(queue_id)
            threads.blockingCallFromThread(reactor, deliver_and_reuse)
            return f

        spool._open = open_then_reuse
        yield self.assertFailure(threads.deferToThread(spool.snapshot, old), KeyError)
        spool._open = opened
        self.assertRaises(KeyError, spool.snapshot, old)
        self.assertEqual(self.inode(spool, "queue", new[0]), old_inode)  # it was reused
        self.assertEqual(spool.snapshot(new[0]).headers, b"Subject: new\r\n")

    @defer.inlineCallbacks
    def test_large_files_are_removed_and_spares_are_bounded(self):
        spool = self.open_spool()
        spool.spares.slots = 2
        large = yield self.receive(spool, LARGE).commit()
        yield spool.remove(large)
        self.assertEqual(listing(spool, "spare"), [])  # over max_bytes: not kept
        small = []
        for _ in range(5):
            small.append((yield self.receive(spool).commit()))
        for queue_id in small:
            yield spool.remove(queue_id)
        self.assertEqual(listing(spool, "spare"), ["0", "1"])
        self.assertEqual(spool.queued(), [])

    @defer.inlineCallbacks
    def test_without_a_spare_directory_messages_still_come_and_go(self):
        spool = self.open_spool()
        queue_id = yield self.receive(spool).commit()
        os.rmdir(os.path.join(spool.directory, "spare"))  # by hand, while running
        yield spool.remove(queue_id)
        self.assertEqual(spool.queued(), [])
        queue_id = yield self.receive(spool).commit()
        self.assertEqual(spool.queued(), [queue_id])
        spares = Spares(os.path.join(spool.directory, "spare"), SPILL_BYTES)
        self.assertIsNone(spares.take(os.path.join(spool.directory, "tmp", "x")))

    @defer.inlineCallbacks
    def test_the_relay_empties_spare_when_it_opens_the_spool(self):
        base = self.tempdir()
        spool = self.open_spool(base)
        yield spool.remove((yield self.receive(spool).commit()))
        self.assertEqual(len(listing(spool, "spare")), 1)
        shared = Spool(spool.directory, owner=False)
        shared.open()  # the delivery process: uses them, cleans nothing
        self.addCleanup(shared.close)
        self.assertEqual(len(listing(spool, "spare")), 1)
        self.open_spool(base)  # the relay, after a restart
        self.assertEqual(listing(spool, "spare"), [])

    @defer.inlineCallbacks
    def test_a_spare_that_is_not_a_plain_file_is_not_written_through(self):
        spool = self.open_spool()
        target = os.path.join(self.tempdir(), "target")
        with open(target, "wb") as f:
            f.write(b"not the spool's")
        os.symlink(target, os.path.join(spool.directory, "spare", "0"))
        queue_id = yield self.receive(spool).commit()
        with spool.open_body(queue_id) as body:
            self.assertEqual(body.read(), BODY)
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"not the spool's")
        self.assertEqual((listing(spool, "spare"), listing(spool, "tmp")), ([], []))

    def test_an_empty_spare_directory_is_read_at_most_every_interval(self):
        spool = self.open_spool()
        clock = Clock()
        spares = Spares(os.path.join(spool.directory, "spare"), SPILL_BYTES,
                         clock=clock.seconds)
        path = os.path.join(spool.directory, "tmp", "x")
        self.assertIsNone(spares.take(path))  # read: none there
        with open(os.path.join(spool.directory, "spare", "7"), "wb") as f:
            f.write(b"old")
        self.assertIsNone(spares.take(path))  # not read again so soon
        clock.advance(LIST_INTERVAL)
        fd = spares.take(path)
        self.addCleanup(os.close, fd)
        self.assertEqual(os.listdir(os.path.join(spool.directory, "spare")), [])
        self.assertTrue(os.path.exists(path))


class StateTests(SpoolTestBase):
    @defer.inlineCallbacks
    def test_save_read_replace_remove(self):
        spool = self.open_spool()
        queue_id = yield self.receive(spool).commit()
        state = DeliveryState.fresh(spool.envelope(queue_id).recipients)
        state.attempts = 1
        yield spool.save_state(queue_id, state)
        self.assertEqual(spool.read_state(queue_id), state)
        state_path = os.path.join(spool.directory, "state", f"{queue_id}.json")
        with open(state_path, "rb") as old:  # a reader of the old version keeps all of it
            old_inode = os.fstat(old.fileno()).st_ino
            state.attempts = 2
            state.recipients["b@y.example"] = RecipientState(RecipientStatus.SENT, 250, "ok",
                                                             "mx.y.example")
            yield spool.save_state(queue_id, state)
            self.assertEqual(DeliveryState.from_json(json.load(old)).attempts, 1)
        self.assertNotEqual(os.stat(state_path).st_ino, old_inode)  # renamed over, atomic
        self.assertEqual(spool.read_state(queue_id), state)
        self.assertEqual(spool.all_states(), {queue_id: state})
        self.assertEqual(listing(spool, "tmp"), [])

        self.assertEqual(spool.envelope(queue_id), envelope(id=queue_id))
        self.assertEqual((yield spool.scan()), ([queue_id], {queue_id: state}))

        yield spool.remove(queue_id)
        self.assertEqual((spool.queued(), listing(spool, "state")), ([], []))
        self.assertIsNone(spool.locate(queue_id))
        yield spool.remove(queue_id)  # already gone: nothing to do

    def test_write_state_blocking(self):
        spool = self.open_spool()
        queue_id = "3" + "0" * 17
        spool.write_state(queue_id, DeliveryState.fresh(["a@x"]))
        self.assertEqual(spool.read_state(queue_id).pending(), ["a@x"])
        self.assertEqual(listing(spool, "tmp"), [])
        self.assertRaises(ValueError, spool.write_state, "../x", DeliveryState())

    def test_unreadable_state_is_ignored(self):
        spool = self.open_spool()
        queue_id = "3" + "0" * 17
        with open(os.path.join(spool.directory, "state", f"{queue_id}.json"), "w") as f:
            f.write("{not json")
        self.assertIsNone(spool.read_state(queue_id))
        self.assertEqual(spool.all_states(), {})


class AdminTests(SpoolTestBase):
    @defer.inlineCallbacks
    def test_delete_from_queue_and_hold(self):
        spool = self.open_spool()
        queued = yield self.receive(spool).commit()
        held = yield self.receive(spool, sandboxed=True).commit()
        yield spool.save_state(queued, DeliveryState.fresh(["b@y.example"]))
        self.assertEqual(spool.delete(queued), "queue")
        self.assertEqual(spool.delete(held), "hold")
        self.assertEqual((spool.queued(), spool.held(), listing(spool, "state")), ([], [], []))
        self.assertRaises(KeyError, spool.delete, queued)

    def test_unknown_and_malformed_ids(self):
        spool = self.open_spool()
        for queue_id in ("3" + "0" * 17, "../../etc/passwd", ""):
            self.assertIsNone(spool.locate(queue_id))
            for reader in (spool.delete, spool.envelope, spool.open_body, spool.path,
                           spool.snapshot):
                self.assertRaises(KeyError, reader, queue_id)


class DiskFullTests(SpoolTestBase):
    def small_tmpfs(self) -> str:
        path = self.tempdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                               path], capture_output=True, text=True)
        if done.returncode != 0:
            raise AssertionError(f"cannot mount a tmpfs (needs root): {done.stderr}")
        self.addCleanup(subprocess.run, ["umount", path], check=True)
        return path

    def test_refused_below_min_free_bytes(self):
        spool = self.open_spool(min_free_bytes=2**62)
        with self.assertRaises(StorageError) as caught:
            spool.create(envelope())
        self.assertTrue(caught.exception.full)
        self.assertEqual(listing(spool, "tmp"), [])

    @defer.inlineCallbacks
    def test_write_hitting_enospc(self):
        spool = self.open_spool(self.small_tmpfs(), min_free_bytes=0)
        msg = spool.create(envelope())
        chunk = b"x" * 998 + b"\r\n"
        for _ in range(3000):  # 3 MB into 2 MB
            msg.write(chunk)
        self.assertEqual(listing(spool, "tmp"), [])  # freed at once, not at commit
        error = yield self.assertFailure(msg.commit(), StorageError)
        self.assertTrue(error.full)
        self.assertEqual((listing(spool, "tmp"), spool.queued()), ([], []))
        # Space is back: the next message goes through.
        self.assertTrue(is_queue_id((yield self.receive(spool).commit())))

    @defer.inlineCallbacks
    def test_flush_at_commit_hitting_enospc(self):
        spool = self.open_spool(self.small_tmpfs(), min_free_bytes=0)
        filler = os.path.join(spool.directory, "filler")
        with open(filler, "wb", buffering=0) as f, self.assertRaises(OSError):
            for _ in range(1000):  # bounded: 4 MB is more than the disk
                f.write(b"f" * 4096)
        msg = self.receive(spool, body=BODY * 100)  # a few KB: still in memory
        self.assertEqual(listing(spool, "tmp"), [])  # so the write at commit fails
        error = yield self.assertFailure(msg.commit(), StorageError)
        self.assertTrue(error.full)
        self.assertEqual((listing(spool, "tmp"), spool.queued()), ([], []))
        os.unlink(filler)
        queue_id = yield self.receive(spool).commit()
        self.assertIn(queue_id, spool.queued())
