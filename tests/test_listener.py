"""Listener connections that send a write at once (TCP_NODELAY on), over real loopback
sockets: plain, after STARTTLS, and under implicit TLS."""

from __future__ import annotations

import socket

import pytest
from test_smtp_support import HOST, tls_files
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mailrelay import listener
from mailrelay.listener import PromptWrites

BIG = bytes(range(256)) * (16 * 2**10)  # 4 MiB: more than a socket takes at once


class Replier(Protocol):
    """Writes what the test says on connect and on each line; records whether the socket
    had to wait in the reactor's writers after each write."""

    nodelay = True

    def connectionMade(self) -> None:
        if self.nodelay:
            self.transport.setTcpNoDelay(True)
        self.factory.waited = []
        self.buf = b""
        self._write(b"hello\r\n")

    def _write(self, data: bytes) -> None:
        self.transport.write(data)
        self.factory.waited.append(_socket_of(self.transport) in reactor.getWriters())

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line == b"STARTTLS":
                self._write(b"go\r\n")
                self.transport.startTLS(tls_files().options)
            elif line == b"BIG":
                self._write(BIG)
                self._write(b"after\r\n")
            elif line == b"BYE":
                self._write(b"bye\r\n")
                self.transport.loseConnection()
            else:
                self._write(b"echo " + line + b"\r\n")


def _socket_of(transport):
    """The TCP connection under a TLS wrapper (implicit TLS), or the transport itself."""
    return getattr(transport, "transport", None) or transport


def recv_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.tuned("prompt_writes")
class PromptWritesTests(unittest.TestCase):
    def setUp(self) -> None:
        tls_files()  # made before any client thread races the server to it

    def listen(self, tls: bool = False, nodelay: bool = True) -> tuple[int, Factory]:
        factory = Factory.forProtocol(type("R", (Replier,), {"nodelay": nodelay}))
        wrapped = TLSMemoryBIOFactory(tls_files().options, False, factory) if tls else factory
        port = PromptWrites(reactor).listenTCP(0, wrapped, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def test_plain_replies_leave_at_once(self):
        port, factory = self.listen()

        def talk():
            sock = self.connect(port)
            got = [recv_until(sock, b"hello\r\n")]
            sock.sendall(b"one\r\n")
            got.append(recv_until(sock, b"one\r\n"))
            sock.sendall(b"BYE\r\n")
            got.append(recv_until(sock, b"bye\r\n"))
            got.append(sock.recv(10))  # the server closed after the last reply
            return got

        got = yield deferToThread(talk)
        self.assertEqual(got, [b"hello\r\n", b"echo one\r\n", b"bye\r\n", b""])
        self.assertEqual(factory.waited, [False, False, False])

    @defer.inlineCallbacks
    def test_with_nagle_on_writes_wait_for_the_reactor(self):
        port, factory = self.listen(nodelay=False)
        got = yield deferToThread(lambda: recv_until(self.connect(port), b"hello\r\n"))
        self.assertEqual(got, b"hello\r\n")
        self.assertEqual(factory.waited, [True])

    @defer.inlineCallbacks
    def test_what_the_socket_cannot_take_follows_in_order(self):
        port, factory = self.listen()

        def talk():
            sock = self.connect(port)
            recv_until(sock, b"hello\r\n")
            sock.sendall(b"BIG\r\n")
            return recv_until(sock, b"after\r\n")

        got = yield deferToThread(talk)
        self.assertEqual(got, BIG + b"after\r\n")
        self.assertEqual(factory.waited, [False, True, True])

    @defer.inlineCallbacks
    def test_after_starttls(self):
        port, factory = self.listen()

        def talk():
            sock = self.connect(port)
            recv_until(sock, b"hello\r\n")
            sock.sendall(b"STARTTLS\r\n")
            assert recv_until(sock, b"go\r\n") == b"go\r\n"
            tls = tls_files().client.wrap_socket(sock, server_hostname=HOST)
            tls.sendall(b"secret\r\n")
            got = [recv_until(tls, b"secret\r\n")]
            tls.sendall(b"BIG\r\n")
            got.append(recv_until(tls, b"after\r\n"))
            return got

        got = yield deferToThread(talk)
        self.assertEqual(got, [b"echo secret\r\n", BIG + b"after\r\n"])
        self.assertEqual(factory.waited[:3], [False, False, False])

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        port, factory = self.listen(tls=True)

        def talk():
            sock = tls_files().client.wrap_socket(self.connect(port), server_hostname=HOST)
            got = [recv_until(sock, b"hello\r\n")]
            sock.sendall(b"one\r\n")
            got.append(recv_until(sock, b"one\r\n"))
            return got

        got = yield deferToThread(talk)
        self.assertEqual(got, [b"hello\r\n", b"echo one\r\n"])
        self.assertEqual(factory.waited[-1], False)


class WithoutTheInternalsTests(unittest.TestCase):
    """A Twisted that lacks what prompt writes use: listeners fall back to its stock
    transports, which serve the same sessions, replies one loop turn later."""

    def setUp(self) -> None:
        tls_files()

    def test_this_twisted_has_them(self):
        # When this fails, a Twisted upgrade moved them: listener.py needs a look.
        self.assertTrue(listener.prompt_writes_possible())

    def test_a_connection_state_that_moved(self):
        self.patch(listener, "_CONNECTION_STATE", (*listener._CONNECTION_STATE, "_gone"))
        self.assertFalse(listener.prompt_writes_possible())

    @pytest.mark.tuned("prompt_writes")  # its fallback, with its warning
    @defer.inlineCallbacks
    def test_stock_transports_serve_plain_and_starttls(self):
        self.patch(listener, "_newtls", None)
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        factory = Factory.forProtocol(Replier)
        port = listener.PromptWrites(reactor).listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertNotIsInstance(port, listener._PromptPort)

        def talk():
            sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=20)
            self.addCleanup(sock.close)
            got = [recv_until(sock, b"hello\r\n")]
            sock.sendall(b"STARTTLS\r\n")
            got.append(recv_until(sock, b"go\r\n"))
            tls = tls_files().client.wrap_socket(sock, server_hostname=HOST)
            tls.sendall(b"secret\r\n")
            got.append(recv_until(tls, b"secret\r\n"))
            return got

        got = yield deferToThread(talk)
        self.assertEqual(got, [b"hello\r\n", b"go\r\n", b"echo secret\r\n"])
        self.assertEqual(factory.waited[:2], [True, True])  # stock: through the reactor
        warnings = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertTrue(any("wait for the reactor loop" in w for w in warnings), warnings)
