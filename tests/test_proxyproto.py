"""The PROXY protocol in front of a listener: the header parser (versions 1 and 2, split
at every octet, garbage), and real sessions over loopback behind the header (plain,
STARTTLS, implicit TLS, a peer outside proxy_from, a bad header, no header in time)."""

from __future__ import annotations

import socket
import ssl
import struct
import time

import pytest
from harness import TempPaths
from test_listener import Replier, recv_until
from test_smtp_support import HOST, LoopbackCase, tls_files
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailrelay.config import _networks
from mailrelay.listener import PromptWrites
from mailrelay.proxyproto import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    HeaderError,
    ProxyProtocolFactory,
    parse,
)

V1_TCP4 = b"PROXY TCP4 203.0.113.5 192.0.2.1 40001 587\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::5 2001:db8::1 40001 465\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
# The longest line the specification allows: 107 octets with its CRLF.
V1_LONGEST = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
              b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")


def v2(command: int = 1, family: int = 0x11, body: bytes = b"", version: int = 2,
       length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", length) + body


V2_TCP4 = v2(body=socket.inet_aton("203.0.113.5") + socket.inet_aton("192.0.2.1")
             + struct.pack("!HH", 40001, 465)
             + b"\x04\x00\x03abc" + b"\x05\x00\x02id")  # TLVs: NOOP and UNIQUE_ID, skipped
V2_TCP6 = v2(family=0x21, body=socket.inet_pton(socket.AF_INET6, "2001:db8::5")
             + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("!HH", 40001, 587))
V2_LOCAL = v2(command=0, family=0x00)
V2_UNSPEC = v2(family=0x00, body=b"\x00" * 12)

VALID = {
    "v1 TCP4": (V1_TCP4, IPv4Address("TCP", "203.0.113.5", 40001),
                IPv4Address("TCP", "192.0.2.1", 587)),
    "v1 TCP6": (V1_TCP6, IPv6Address("TCP", "2001:db8::5", 40001),
                IPv6Address("TCP", "2001:db8::1", 465)),
    "v1 longest": (V1_LONGEST, None, None),
    "v1 UNKNOWN": (V1_UNKNOWN, None, None),
    "v2 TCP4 with TLVs": (V2_TCP4, IPv4Address("TCP", "203.0.113.5", 40001),
                          IPv4Address("TCP", "192.0.2.1", 465)),
    "v2 TCP6": (V2_TCP6, IPv6Address("TCP", "2001:db8::5", 40001),
                IPv6Address("TCP", "2001:db8::1", 587)),
    "v2 LOCAL": (V2_LOCAL, None, None),
    "v2 PROXY UNSPEC": (V2_UNSPEC, None, None),
}


@pytest.mark.parametrize("name", VALID)
def test_a_header_split_at_every_octet(name):
    header, source, destination = VALID[name]
    assert len(V1_LONGEST) == V1_MAX
    for end in range(len(header)):
        assert parse(header[:end]) is None, end  # wait for more, whatever came so far
    for after in (b"", b"EHLO client.test\r\n", b"\x16\x03\x01"):
        got = parse(header + after)
        assert (got.length, got.source, got.destination) == (len(header), source, destination)
        assert got.version == (2 if header.startswith(V2_SIGNATURE) else 1)


BAD = {
    b"EHLO client.test\r\n": "not a PROXY header",
    b"EH": "not a PROXY header",  # known at once, not after a timeout
    b"proxy TCP4 203.0.113.5 192.0.2.1 1 2\r\n": "not a PROXY header",
    b"PROXY TCP4 203.0.113.5 192.0.2.1 1 2\n": "not ended by CRLF",
    b"PROXY TCP4 203.0.113.5\r192.0.2.1 1 2\r\n": "not ended by CRLF",
    V1_LONGEST[:-2] + b"0\r\n": "longer than 107 octets",
    b"PROXY TCP4 " + b"1" * 200: "longer than 107 octets",
    b"PROXY TCP5 203.0.113.5 192.0.2.1 1 2\r\n": "not PROXY TCP4|TCP6",
    b"PROXY TCP4 203.0.113.5 192.0.2.1 1\r\n": "not PROXY TCP4|TCP6",
    b"PROXY TCP4  203.0.113.5 192.0.2.1 1 2\r\n": "not PROXY TCP4|TCP6",
    b"PROXY TCP4 2001:db8::5 192.0.2.1 1 2\r\n": "address not IPv4",
    b"PROXY TCP6 203.0.113.5 2001:db8::1 1 2\r\n": "address not IPv6",
    b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n": "address not IPv6",
    b"PROXY TCP4 203.0.113.05 192.0.2.1 1 2\r\n": "address not IPv4",
    b"PROXY TCP4 203.0.113.5 192.0.2.1 65536 2\r\n": "port not a number",
    b"PROXY TCP4 203.0.113.5 192.0.2.1 080 2\r\n": "port not a number",
    b"PROXY TCP4 203.0.113.5 192.0.2.1 -1 2\r\n": "port not a number",
    "PROXY TCP4 203.0.113.5 192.0.2.1 1 2\u00e9\r\n".encode(): "not ASCII",
    b"\r\n\r\n\x00\r\nQUIX\n" + V2_TCP4[12:]: "signature wrong",
    b"\r\nEHLO": "signature wrong",
    v2(version=1): "of version 1",
    v2(command=2): "command 2 unknown",
    v2(length=0xFFFF): f"over {V2_MAX}",
    v2(body=b"\x00" * 11): "shorter than their family needs",
    v2(family=0x21, body=b"\x00" * 35): "shorter than their family needs",
    v2(family=0x12, body=b"\x00" * 12): "not for a TCP (stream) connection",
}


@pytest.mark.parametrize("data", BAD)
def test_garbage_is_refused(data):
    with pytest.raises(HeaderError, match=BAD[data].replace("|", r"\|").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse(data)


def test_networks_setting():
    assert [str(n) for n in _networks("127.0.0.1/32, 10.0.0.0/8 ::1 fd00::/8")] == [
        "127.0.0.1/32", "10.0.0.0/8", "::1/128", "fd00::/8"]
    with pytest.raises(ValueError, match="did you mean 10.0.0.0/8"):
        _networks("10.0.0.1/8")


# -- real sessions over loopback


def connect(port: int, host: str = "127.0.0.1", family=socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _unread.pop(id(sock), None)
    return sock


_unread: dict[int, bytes] = {}  # what a socket received past the last reply read


def read_reply(sock) -> bytes:
    """The next whole reply (every line of it), or what came before the end of the
    connection."""
    data = _unread.pop(id(sock), b"")
    while True:
        lines = data.split(b"\r\n")
        last = next((i for i, line in enumerate(lines[:-1]) if line[3:4] == b" "), None)
        if last is not None:
            _unread[id(sock)] = b"\r\n".join(lines[last + 1:])
            return b"\r\n".join(lines[:last + 1]) + b"\r\n"
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def closed_without_a_byte(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class BehindTheHeaderTests(LoopbackCase):
    def setUp(self):
        super().setUp()
        self.lines = []

        def observe(event):
            if event.get("log_namespace", "").startswith(
                    ("mailrelay.proxyproto", "mailrelay.tls", "mailrelay.smtp.server")):
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def listen_proxy(self, tls_mode: str = "starttls", networks: str = "127.0.0.1/32",
                     timeout: float = 5.0) -> int:
        def outer(factory):
            return ProxyProtocolFactory(factory, _networks(networks), timeout, "edge", reactor)

        return self.listen(tls_mode, outer=outer)

    def session(self, n: int = 0):
        return self.factories[-1].sessions[n]

    @defer.inlineCallbacks
    def test_the_greeting_waits_for_a_header_sent_an_octet_at_a_time(self):
        port = self.listen_proxy()

        def talk():
            with connect(port) as sock:
                sock.sendall(V1_TCP4[:10])
                sock.settimeout(0.5)
                with pytest.raises(TimeoutError):  # no greeting before the header is whole
                    sock.recv(1)
                sock.settimeout(20)
                for i in range(10, len(V1_TCP4)):
                    sock.sendall(V1_TCP4[i:i + 1])
                    time.sleep(0.002)  # each octet in a segment of its own
                greeting = read_reply(sock)
                sock.sendall(b"EHLO client.test\r\nQUIT\r\n")
                return greeting, read_reply(sock) + read_reply(sock)

        greeting, rest = yield deferToThread(talk)
        self.assertTrue(greeting.startswith(b"220 relay.test ESMTP"), greeting)
        self.assertIn(b"250 ", rest)
        self.assertIn(b"221 2.0.0", rest)
        self.assertEqual(self.session().client_ip, "203.0.113.5")
        self.assertEqual(self.session().transport.getHost(),
                         IPv4Address("TCP", "192.0.2.1", 587))
        self.assertIn(f"session {self.session().session_id}: connection from 203.0.113.5 "
                      "tls=False", self.lines)

    @defer.inlineCallbacks
    def test_the_first_commands_in_the_header_s_segment_are_read(self):
        port = self.listen_proxy()

        def talk():
            with connect(port) as sock:
                sock.sendall(V2_TCP6 + b"EHLO client.test\r\n")
                return read_reply(sock) + read_reply(sock)

        got = yield deferToThread(talk)
        self.assertIn(b"220 relay.test", got)
        self.assertIn(b"250 ", got)
        self.assertEqual(self.session().client_ip, "2001:db8::5")

    @defer.inlineCallbacks
    def test_starttls_after_the_header_keeps_the_client(self):
        port = self.listen_proxy()

        def talk():
            with connect(port) as sock:
                sock.sendall(V2_TCP4)
                read_reply(sock)
                sock.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
                read_reply(sock)
                assert read_reply(sock).startswith(b"220 2.0.0")
                tls = tls_files().client.wrap_socket(sock, server_hostname=HOST)
                tls.sendall(b"EHLO client.test\r\n")
                ehlo = read_reply(tls)
                tls.close()
            with connect(port) as sock:  # a handshake that fails: logged with the client
                sock.sendall(V1_TCP4 + b"EHLO client.test\r\nSTARTTLS\r\n")
                read_reply(sock)
                read_reply(sock)
                read_reply(sock)
                sock.sendall(b"\x16\x03\x01\x00\x05hello")
                while sock.recv(65536):  # a TLS alert, then the end
                    pass
                return ehlo, True

        ehlo, closed = yield deferToThread(talk)
        self.assertIn(b"AUTH PLAIN LOGIN", ehlo)
        self.assertTrue(closed)
        self.assertTrue(self.session(0).tls)
        self.assertEqual(self.session(0).client_ip, "203.0.113.5")
        self.assertEqual(self.session(0).transport.getPeer().host, "203.0.113.5")
        yield self.sessions_ended()
        failed = [line for line in self.lines if "TLS handshake with" in line]
        self.assertEqual(len(failed), 1, self.lines)
        self.assertIn("TLS handshake with 203.0.113.5 failed", failed[0])

    @defer.inlineCallbacks
    def test_implicit_tls_starts_after_the_header(self):
        port = self.listen_proxy("implicit")

        def talk():
            with connect(port) as sock:
                sock.sendall(V2_TCP4)
                tls = tls_files().client.wrap_socket(sock, server_hostname=HOST)
                greeting = read_reply(tls)
                tls.sendall(b"EHLO client.test\r\n")
                ehlo = read_reply(tls)
                tls.close()
            # TLS without the header first
            with connect(port) as sock, pytest.raises((ssl.SSLError, OSError)):
                tls_files().client.wrap_socket(sock, server_hostname=HOST)
            return greeting, ehlo

        greeting, ehlo = yield deferToThread(talk)
        self.assertTrue(greeting.startswith(b"220 relay.test"), greeting)
        self.assertIn(b"AUTH PLAIN LOGIN", ehlo)
        self.assertTrue(self.session().tls)
        self.assertEqual(self.session().client_ip, "203.0.113.5")
        self.assertEqual(len(self.factories[-1].sessions), 1)
        self.assertIn("[listener:edge] connection from 127.0.0.1 closed: bad PROXY header: "
                      "not a PROXY header", self.lines)

    @defer.inlineCallbacks
    def test_local_and_unknown_headers_leave_the_balancer_s_address(self):
        port = self.listen_proxy()

        def talk():
            for header in (V2_LOCAL, V1_UNKNOWN):
                with connect(port) as sock:
                    sock.sendall(header + b"QUIT\r\n")
                    read_reply(sock)
                    read_reply(sock)

        yield deferToThread(talk)
        self.assertEqual([s.client_ip for s in self.factories[-1].sessions],
                         ["127.0.0.1", "127.0.0.1"])

    @defer.inlineCallbacks
    def test_a_peer_outside_proxy_from_is_closed_at_once(self):
        port = self.listen_proxy(networks="10.0.0.0/8, ::1")

        def talk():
            with connect(port) as sock:
                sock.sendall(V1_TCP4 + b"EHLO client.test\r\nAUTH PLAIN AGFiYwBk\r\n")
                return closed_without_a_byte(sock)

        self.assertTrue((yield deferToThread(talk)))
        self.assertEqual(self.factories[-1].sessions, [])
        self.assertEqual(self.lines,
                         ["[listener:edge] connection from 127.0.0.1 closed: not in proxy_from"])

    @defer.inlineCallbacks
    def test_a_bad_header_closes_with_one_line(self):
        port = self.listen_proxy()

        def talk():
            out = []
            for data in (b"PROXY TCP4 203.0.113.5 192.0.2.1 1 99999\r\n",
                         v2(length=0xFFFF) + b"\x00" * 100, b"PROXY " + b"x" * 120):
                with connect(port) as sock:
                    sock.sendall(data)
                    out.append(closed_without_a_byte(sock))
            return out

        self.assertEqual((yield deferToThread(talk)), [True, True, True])
        self.assertEqual(self.factories[-1].sessions, [])
        self.assertEqual(self.lines, [
            "[listener:edge] connection from 127.0.0.1 closed: bad PROXY header: version 1 "
            "port not a number 0..65535",
            "[listener:edge] connection from 127.0.0.1 closed: bad PROXY header: version 2 "
            f"header of 65551 octets, over {V2_MAX}",
            "[listener:edge] connection from 127.0.0.1 closed: bad PROXY header: version 1 "
            "line longer than 107 octets",
        ])

    @defer.inlineCallbacks
    def test_no_header_in_time_closes(self):
        port = self.listen_proxy(timeout=0.2)

        def talk():
            with connect(port) as sock:
                sock.sendall(V1_TCP4[:20])
                return closed_without_a_byte(sock)

        self.assertTrue((yield deferToThread(talk)))
        self.assertEqual(self.factories[-1].sessions, [])
        self.assertEqual(self.lines, [
            "[listener:edge] connection from 127.0.0.1 closed: no PROXY header within 0.2 s"])

    @defer.inlineCallbacks
    def test_a_health_check_that_sends_nothing_leaves_no_line(self):
        port = self.listen_proxy()
        yield deferToThread(lambda: connect(port).close())
        yield deferToThread(time.sleep, 0.2)
        self.assertEqual(self.lines, [])
        self.assertEqual(self.factories[-1].sessions, [])

    @defer.inlineCallbacks
    def test_a_connection_that_ends_inside_its_header_leaves_one_line(self):
        port = self.listen_proxy()

        def talk():
            with connect(port) as sock:
                sock.sendall(V2_TCP4[:20])

        yield deferToThread(talk)
        expected = ("[listener:edge] connection from 127.0.0.1 closed by the peer inside its "
                    "PROXY header")
        for _ in range(500):  # until the server has seen the end (5 s at most)
            if self.lines:
                break
            yield deferToThread(time.sleep, 0.01)
        self.assertEqual(self.lines, [expected])


class IPv6ListenerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_balancer_on_ipv6(self):
        factory = ProxyProtocolFactory(Factory.forProtocol(Replier), _networks("::1"), 5.0,
                                       "edge6", reactor)
        listening = PromptWrites(reactor).listenTCP(0, factory, interface="::1")
        self.addCleanup(listening.stopListening)

        def talk():
            with connect(listening.getHost().port, "::1", socket.AF_INET6) as sock:
                sock.sendall(V1_TCP4)
                return recv_until(sock, b"hello\r\n")

        self.assertEqual((yield deferToThread(talk)), b"hello\r\n")

    @defer.inlineCallbacks
    def test_an_ipv4_balancer_on_a_dual_stack_listener_counts_as_ipv4(self):
        lines = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        ports = []
        for networks in ("127.0.0.1", "::1"):
            factory = ProxyProtocolFactory(Factory.forProtocol(Replier), _networks(networks),
                                           5.0, "dual", reactor)
            listening = PromptWrites(reactor).listenTCP(0, factory, interface="::")
            self.addCleanup(listening.stopListening)
            ports.append(listening.getHost().port)

        def talk():
            with connect(ports[0]) as sock:
                sock.sendall(V2_TCP4)
                hello = recv_until(sock, b"hello\r\n")
            with connect(ports[1]) as sock:
                sock.sendall(V2_TCP4)
                return hello, closed_without_a_byte(sock)

        self.assertEqual((yield deferToThread(talk)), (b"hello\r\n", True))
        self.assertIn("[listener:dual] connection from 127.0.0.1 closed: not in proxy_from",
                      [formatEvent(e) for e in lines])


class SslEndpointTests(TempPaths, unittest.TestCase):
    @defer.inlineCallbacks
    def test_an_ssl_endpoint_reads_the_header_before_its_tls(self):
        from certs import TestCA
        from twisted.internet import endpoints

        ca = TestCA(self.mktemp())
        cert, key = ca.issue(HOST)
        prompt = PromptWrites(reactor, lambda f: ProxyProtocolFactory(
            f, _networks("127.0.0.1"), 5.0, "edge", reactor))
        endpoint = endpoints.serverFromString(
            prompt, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        listening = yield endpoint.listen(Factory.forProtocol(Replier))
        self.addCleanup(listening.stopListening)
        client = ssl.create_default_context(cafile=str(ca.cert_path))

        def talk():
            with connect(listening.getHost().port) as sock:
                sock.sendall(V1_TCP6)
                tls = client.wrap_socket(sock, server_hostname=HOST)
                return recv_until(tls, b"hello\r\n")

        self.assertEqual((yield deferToThread(talk)), b"hello\r\n")
        self.assertEqual(prompt.wrapped, 1)


@pytest.mark.tuned("prompt_writes")
class PromptWritesBehindTheHeaderTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_replies_leave_at_once(self):
        inner = Factory.forProtocol(Replier)
        outer = ProxyProtocolFactory(inner, _networks("127.0.0.1"), 5.0, "edge", reactor)
        listening = PromptWrites(reactor).listenTCP(0, outer, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)

        def talk():
            with connect(listening.getHost().port) as sock:
                sock.sendall(V2_TCP4)
                got = [recv_until(sock, b"hello\r\n")]
                sock.sendall(b"one\r\n")
                got.append(recv_until(sock, b"one\r\n"))
                return got

        self.assertEqual((yield deferToThread(talk)), [b"hello\r\n", b"echo one\r\n"])
        self.assertEqual(inner.waited, [False, False])


@pytest.mark.parametrize("settings, problem", [
    ("proxy_protocol = yes\n",
     "[listener:edge] proxy_protocol: yes needs proxy_from, the load balancers' networks"),
    ("proxy_from = 10.0.0.0/8\n",
     "[listener:edge] proxy_from: only means something with proxy_protocol = yes"),
    ("proxy_protocol = yes\nproxy_from = 10.0.0.1/8\n",
     "[listener:edge] proxy_from: '10.0.0.1/8' has host bits set: did you mean 10.0.0.0/8?"),
    ("proxy_protocol = yes\nproxy_from = balancer.example\n",
     "[listener:edge] proxy_from: 'balancer.example' is not an IPv4 or IPv6 network"),
    ("proxy_protocol = yes\nproxy_from = 10.0.0.0/8\nproxy_timeout = 0\n",
     "[listener:edge] proxy_timeout: must be more than 0"),
    ("proxy_protocol = yes\nproxy_from = 10.0.0.0/8\nendpoint = unix:/tmp/relay.sock\n",
     "[listener:edge] proxy_protocol: needs a tcp:, tcp6: or ssl: endpoint"),
])
def test_settings_that_stop_startup(tmp_path, settings, problem):
    from mailrelay.config import ConfigError, load_config

    path = tmp_path / "mailrelay.ini"
    endpoint = "" if "endpoint" in settings else "endpoint = tcp:2587\n"
    path.write_text(f"[server]\ndata_dir = {tmp_path}\n[listener:edge]\n{endpoint}{settings}")
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert problem in str(raised.value)


def test_settings_of_a_listener_behind_a_balancer(tmp_path):
    from mailrelay.config import load_config

    path = tmp_path / "mailrelay.ini"
    path.write_text(f"[server]\ndata_dir = {tmp_path}\n[listener:edge]\n"
                    "endpoint = tcp6:2587:interface=\\:\\:1\nproxy_protocol = yes\n"
                    "proxy_from = ::1, 10.0.0.0/8\nproxy_timeout = 2s\n"
                    "[listener:plain]\nendpoint = tcp:2588\n")
    edge, plain = load_config(str(path)).listeners
    assert (edge.proxy_protocol, [str(n) for n in edge.proxy_from], edge.proxy_timeout) == (
        True, ["::1/128", "10.0.0.0/8"], 2.0)
    assert (plain.proxy_protocol, plain.proxy_from) == (False, ())


def test_a_listener_the_wrapper_cannot_reach_stops_startup(tmp_path, capfd):
    from mailrelay.listener import ListenerService

    service = ListenerService("listener:edge", f"unix:{tmp_path}/s", Factory(), reactor,
                              outer=lambda f: ProxyProtocolFactory(f, (), 5.0, "edge", reactor))
    with pytest.raises(SystemExit):
        service.privilegedStartService()
    service.stopService()
    assert "the PROXY protocol needs a tcp:, tcp6: or ssl: endpoint" in capfd.readouterr().err
