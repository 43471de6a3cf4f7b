"""The listeners' TLS as clients meet it: the self-signed certificate."""

from __future__ import annotations

import datetime

from cryptography import x509
from harness import TempPaths
from twisted.trial import unittest

from mailrelay.tls import make_self_signed


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
