"""The listeners' TLS as clients meet it: ALPN offers, the TLS 1.2 cipher list, the log line
of a failed handshake, the self-signed certificate, and the delivery client's handshakes
with next hops whose TLS negotiates ALPN or not."""

from __future__ import annotations

import datetime
import os
import smtplib
import ssl

import certs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import TempPaths
from smtp_sink import SMTPSink
from test_delivery_client import Run, job
from test_smtp_support import (
    HOST,
    PASSWORD,
    LoopbackCase,
    RecordingServer,
    message,
    tls_files,
)
from twisted.internet import defer, endpoints, reactor
from twisted.internet import ssl as twisted_ssl
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailrelay.config import ConfigError, load_config
from mailrelay.delivery.router import Hop
from mailrelay.listener import PromptWrites
from mailrelay.smtp.factory import SubmissionFactory
from mailrelay.tls import make_self_signed, server_options, tls12_ciphers

# What clients offer: Android's and Go's stacks, browsers, and "smtp" (openssl -alpn smtp).
ALPN_OFFERS = (["smtp"], ["h2", "http/1.1"], ["imap", "pop3"])


def client_context(alpn: list[str] | None = None, ciphers: str | None = None,
                   tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.path.join(tls_files().directory, "ca.pem"))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


class ListenerTLSCase(LoopbackCase):
    def send(self, mode: str, ctx: ssl.SSLContext, port: int | None = None):
        """Log in over TLS (STARTTLS or implicit) and send one message; what the server
        selected over ALPN and the cipher."""
        port = port or self.listen(mode)

        def talk():
            if mode == "implicit":
                c = smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="client.test",
                                     context=ctx, timeout=20)
            else:
                c = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20)
                c.starttls(context=ctx)
            with c:
                c.login("doe.test", PASSWORD)
                c.sendmail("a@doe.test", ["r@example.net"], message("a@doe.test"))
                return c.sock.selected_alpn_protocol(), c.sock.cipher()[0]

        return deferToThread(talk)

    @defer.inlineCallbacks
    def listen_ssl_endpoint(self):
        """An implicit-TLS listener on an ssl: endpoint with its own certificate, parsed as
        ListenerService parses it; its port."""
        factory = SubmissionFactory(self.portal, self.spool, HOST, tls_files().options,
                                    "implicit", False, reactor=reactor)
        factory.protocol = RecordingServer
        factory.sessions, factory.max_buffered = [], 0
        self.factories.append(factory)
        base = os.path.join(tls_files().directory, HOST)
        endpoint = endpoints.serverFromString(
            PromptWrites(reactor),
            f"ssl:0:interface=127.0.0.1:privateKey={base}.key:certKey={base}.pem")
        port = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port


class HandshakeTests(ListenerTLSCase):
    @defer.inlineCallbacks
    def test_clients_offering_alpn_submit_on_every_listener_kind(self):
        ssl_endpoint = yield self.listen_ssl_endpoint()
        for mode, port in (("starttls", None), ("implicit", None), ("implicit", ssl_endpoint)):
            for offer in ALPN_OFFERS:
                selected, _cipher = yield self.send(mode, client_context(alpn=offer), port)
                self.assertIsNone(selected, (mode, port, offer))  # TLS without ALPN
        self.assertEqual(len(self.files("queue")), 3 * len(ALPN_OFFERS))

    @defer.inlineCallbacks
    def test_failed_handshake_logs_one_line_with_the_peer(self):
        logged: list[str] = []

        def observe(event):
            if event.get("log_namespace") == "mailrelay.tls":
                logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        port = self.listen("implicit")

        def distrust():  # a client that does not know the relay's CA
            with self.assertRaises(ssl.SSLCertVerificationError):
                smtplib.SMTP_SSL("127.0.0.1", port, context=ssl.create_default_context(),
                                 timeout=20)

        yield deferToThread(distrust)
        yield self.sessions_ended()
        self.assertEqual(logged, ["TLS handshake with 127.0.0.1 failed: tlsv1 alert unknown ca"])


class CipherTests(ListenerTLSCase):
    def tls12(self, port: int, ciphers: str):
        """An implicit-TLS handshake limited to TLS 1.2 and ``ciphers``: the cipher, or
        the client's error."""

        def talk():
            ctx = client_context(ciphers=ciphers, tls12=True)
            try:
                with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20) as c:
                    return c.sock.cipher()[0]
            except ssl.SSLError as e:
                return e.reason

        return deferToThread(talk)

    @defer.inlineCallbacks
    def test_tls12_offers_aead_suites_only(self):
        port = self.listen("implicit")
        # The test certificate is ECDSA: these are the CBC suites it could otherwise use.
        for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384",
                    "ECDHE-ECDSA-AES128-SHA256"):
            result = yield self.tls12(port, cbc)
            self.assertEqual(result, "SSLV3_ALERT_HANDSHAKE_FAILURE", cbc)
        for aead in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                     "ECDHE-ECDSA-CHACHA20-POLY1305"):
            result = yield self.tls12(port, aead)
            self.assertEqual(result, aead)
        # TLS 1.3 (its suites are all AEAD) is unaffected.
        _selected, cipher = yield self.send("implicit", client_context(), port)
        self.assertTrue(cipher.startswith("TLS_"), cipher)

    @defer.inlineCallbacks
    def test_the_setting_widens_the_list(self):
        base = os.path.join(tls_files().directory, HOST)
        options = server_options(base + ".pem", base + ".key", False, HOST,
                                 ciphers="ECDHE+AESGCM:ECDHE+AES")
        self.patch(tls_files(), "options", options)
        port = self.listen("implicit")
        result = yield self.tls12(port, "ECDHE-ECDSA-AES128-SHA")
        self.assertEqual(result, "ECDHE-ECDSA-AES128-SHA")


class CipherSettingTests(TempPaths, unittest.TestCase):
    def load(self, value: str):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"[server]\ndata_dir = {path}.d\n[tls]\nciphers = {value}\n")
        return path, load_config(path)

    def test_default_is_aead_with_forward_secrecy(self):
        names = tls12_ciphers(load_config(None).tls.ciphers)
        self.assertTrue(names)
        for name in names:
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("GCM" in name or "CHACHA20-POLY1305" in name, name)

    def test_a_string_leaving_no_tls12_cipher_is_refused_in_one_line(self):
        for value in ("nonsense", "TLS_AES_128_GCM_SHA256", "eNULL"):
            path = self.mktemp()
            with open(path, "w") as f:
                f.write(f"[tls]\nciphers = {value}\n")
            e = self.assertRaises(ConfigError, load_config, path)
            self.assertEqual(
                str(e), f"{path}: [tls] ciphers: {value!r} leaves no TLS 1.2 cipher "
                        "(default: ECDHE+AESGCM:ECDHE+CHACHA20)")

    def test_a_wider_string_is_kept(self):
        _path, config = self.load(" ECDHE+AESGCM:ECDHE+AES ")
        self.assertEqual(config.tls.ciphers, "ECDHE+AESGCM:ECDHE+AES")


class SelfSignedTests(TempPaths, unittest.TestCase):
    def make(self, hostname: str) -> x509.Certificate:
        base = self.mktemp()
        make_self_signed(base + ".pem", base + ".key", hostname)
        with open(base + ".pem", "rb") as f:
            return x509.load_pem_x509_certificate(f.read())

    def names(self, cert: x509.Certificate) -> tuple[list[str], list[str]]:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return (san.get_values_for_type(x509.DNSName),
                [str(a) for a in san.get_values_for_type(x509.IPAddress)])

    def test_names_listed_once(self):
        self.assertEqual(self.names(self.make("relay.test")),
                         (["relay.test", "localhost"], ["127.0.0.1", "::1"]))
        self.assertEqual(self.names(self.make("localhost")), (["localhost"], ["127.0.0.1", "::1"]))
        self.assertEqual(self.names(self.make("LocalHost"))[0], ["localhost"])

    def test_valid_825_days_in_all(self):
        cert = self.make("relay.test")
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertEqual(lifetime, datetime.timedelta(days=825))
        now = datetime.datetime.now(datetime.UTC)
        self.assertLessEqual(cert.not_valid_before_utc, now)


def stock_options(cert_path, key_path, protocols: list[bytes] | None) -> object:
    """A next hop's TLS as plain Twisted makes it (ALPN protocols, or none)."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return twisted_ssl.CertificateOptions(privateKey=key, certificate=cert,
                                          acceptableProtocols=protocols)


class DeliveryClientTests(TempPaths, unittest.TestCase):
    @defer.inlineCallbacks
    def test_next_hops_with_and_without_alpn(self):
        # The delivery client offers no ALPN, so a next hop that would select a protocol,
        # or answer an offer it cannot meet with an alert, handshakes with it alike.
        ca = certs.TestCA(self.mktemp())
        cert, key = ca.issue("localhost")
        for protocols in (None, [b"smtp"], [b"h2", b"http/1.1"]):
            sink = SMTPSink()
            sink.tls_options = stock_options(cert, key, protocols)
            sink.listen()
            self.addCleanup(sink.stop)
            hops = [Hop("localhost", sink.port, tls="required", verify=True,
                        ca_file=str(ca.cert_path)),
                    Hop("mx.unknown.test", sink.port, address="127.0.0.1")]
            for hop in hops:
                run = Run([job("q", ["a@b.test"], b"x\r\n")])
                outcome = yield run.send([hop])
                self.assertEqual(outcome.jobs, 1, (protocols, hop, outcome.errors))
                self.assertEqual(run.reports["q"]["a@b.test"], (250, "Delivery in progress",
                                                               True))
            self.assertEqual([m.tls for m in sink.messages], [True, True])
