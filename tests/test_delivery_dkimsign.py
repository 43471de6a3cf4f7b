"""The delivery process's signing step (mailrelay/delivery/dkimsign.py) on the real reactor
and thread pool, with a real key directory: what is sent while the keys are being read."""

from __future__ import annotations

import os
import threading

import dkim
from harness import TempPaths
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.delivery.dkimsign import DkimSigning
from mailrelay.dkim import Signer
from mailrelay.manage.dkim import DkimKeys
from mailrelay.manage.stores import at_once
from mailrelay.model import Envelope

MSG = (b"From: News <news@example.com>\r\nTo: a@example.org\r\nSubject: hi\r\n"
       b"Date: Sun, 06 Dec 2026 08:00:00 +0000\r\n\r\nhello\r\n")  # fmt: skip


def envelope(queue_id: str) -> Envelope:
    return Envelope(id=queue_id, sender="news@example.com", recipients=["a@example.org"],
                    user="news@example.com", account="acme", client_ip="127.0.0.1",
                    helo="client", tls=False, received_at=0.0)


class KeysBeingRead(TempPaths, unittest.TestCase):
    def test_mail_sent_while_the_keys_load_waits_for_them_and_is_signed(self):
        """At startup every delivery in flight asks for the keys at once: those that come
        while the first reading is still under way (a slow disk) must wait for it, not
        go out unsigned."""
        directory = self.mktemp()
        keys = DkimKeys(directory, at_once)
        keys.add("example.com", "acme", "s1", "rsa", 1024)
        pem_path = os.path.join(directory, "example.com.s1.pem")
        with open(pem_path, "rb") as f:
            pem = f.read()
        # A key file that cannot be read until the test says so: a FIFO whose writer
        # comes later (the reader blocks in open(), in a pool thread).
        os.unlink(pem_path)
        os.mkfifo(pem_path, 0o600)

        def write() -> None:
            with open(pem_path, "wb") as f:
                f.write(pem)

        writer = threading.Thread(target=write)
        self.addCleanup(writer.join, 10)

        signing = DkimSigning(Signer(directory), reactor)

        async def send(queue_id: str):
            head, _ = await signing.sign(envelope(queue_id), lambda: MSG, {})
            return head

        async def scenario():
            first = defer.ensureDeferred(send("first"))
            await task.deferLater(reactor, 0.3, lambda: None)  # its reading has begun
            others = [defer.ensureDeferred(send(f"m{i}")) for i in range(20)]
            writer.start()
            return await defer.gatherResults([first, *others])

        def check(heads):
            for head in heads:
                self.assertIsNotNone(head)
                self.assertTrue(head.pieces[0].startswith(b"DKIM-Signature: v=1; a=rsa"))

        d = defer.ensureDeferred(scenario())
        d.addCallback(check)
        return d


class Batches(TempPaths, unittest.TestCase):
    def test_messages_of_one_turn_are_signed_in_one_batch_each_on_its_own(self):
        """What comes to signing in one reactor turn goes to the pool in one hand-off, and
        what comes while that batch is signed in the next one; a message that cannot be
        signed (dkimpy's parser refuses its header) goes out unsigned without taking the
        rest of its batch with it."""
        directory = self.mktemp()
        keys = DkimKeys(directory, at_once)
        keys.add("example.com", "acme", "s1", "rsa", 1024)
        (key,) = keys.ofDomain("example.com").result
        txt = keys.txtRecord(key).result[1].encode()
        signing = DkimSigning(Signer(directory), reactor)
        bad = MSG.replace(b"Subject: hi", b"not a header field")

        async def send(queue_id: str, message: bytes):
            head, _ = await signing.sign(envelope(queue_id), lambda: message, {})
            return head

        async def scenario():
            await send("keys", MSG)  # the keys read, and one batch of one
            first = [defer.ensureDeferred(send(f"a{i}", bad if i == 3 else MSG + b"%d" % i))
                     for i in range(10)]
            await task.deferLater(reactor, 0, lambda: None)  # the first batch has left
            second = [defer.ensureDeferred(send(f"b{i}", MSG)) for i in range(10)]
            return await defer.gatherResults(first + second)

        def check(heads):
            self.assertEqual(signing.batches, 3)
            self.assertIsNone(heads[3])  # logged, and sent unsigned
            self.assertEqual(len(self.flushLoggedErrors(dkim.MessageFormatError)), 1)
            for i, head in enumerate(heads):
                if i != 3:
                    message = MSG + b"%d" % i if i < 10 else MSG
                    signed = head.pieces[0] + message
                    self.assertTrue(dkim.verify(signed, dnsfunc=lambda _n, timeout=5: txt))

        d = defer.ensureDeferred(scenario())
        d.addCallback(check)
        return d
