"""REQUIRETLS (RFC 8689): MAIL's parameter as the session takes it, and which connections
may carry such a message."""

from __future__ import annotations

import io
from pathlib import Path

import certs
import pytest
from harness import TempPaths
from smtp_sink import SMTPSink
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay import requiretls
from mailrelay.delivery.client import Courier, Job
from mailrelay.delivery.dane import TlsPolicy
from mailrelay.delivery.dnssec import TLSA
from mailrelay.delivery.router import Hop
from mailrelay.reply import Reply


def test_mail_parameter():
    assert requiretls.take_mail({"SIZE": "10"}, True) == (False, {"SIZE": "10"})
    assert requiretls.take_mail({"REQUIRETLS": None, "SIZE": "10"}, True) == (
        True, {"SIZE": "10"})
    with pytest.raises(Reply) as raised:
        requiretls.take_mail({"REQUIRETLS": "YES"}, True)
    assert (raised.value.code, raised.value.status) == (501, "5.5.4")
    with pytest.raises(Reply) as raised:
        requiretls.take_mail({"REQUIRETLS": None}, False)
    assert (raised.value.code, raised.value.status) == (530, "5.7.10")


def test_only_checked_tls_to_a_hop_that_offers_it():
    dane = TlsPolicy("dane", tlsa=(TLSA(3, 1, 1, b"x" * 32),), names=("mx",))
    assert dane.checked and TlsPolicy("mta-sts").checked
    for level in ("may", "encrypt", "verify"):  # verify: the MX name was not validated
        assert not TlsPolicy(level).checked
    assert not TlsPolicy("dane").checked  # DANE with only unusable records: no check
    assert requiretls.problem(True, "dane", True, True) is None
    assert requiretls.problem(False, "dane", True, True) == "no TLS to the next hop"
    assert "not authenticated" in requiretls.problem(True, "encrypt", False, True)
    assert requiretls.problem(True, "mta-sts", True, False) == (
        "the next hop does not offer REQUIRETLS")


class ClientTests(TempPaths, unittest.TestCase):
    """The client against a sink offering REQUIRETLS with a certificate of a test CA."""

    def setUp(self) -> None:
        super().setUp()
        self.ca = certs.TestCA(Path(self.mktemp()))
        cert, key = self.ca.issue("smarthost.test", chain=True)  # and 127.0.0.1
        self.sink = SMTPSink(tls_cert=str(cert), tls_key=str(key), requiretls=True)
        self.sink.listen()
        self.addCleanup(self.sink.stop)

    @defer.inlineCallbacks
    def send(self, hop: Hop):
        reports = {}
        jobs = iter([Job("q1", "s@a.test", ["bob@b.test"],
                         lambda: io.BytesIO(b"Subject: x\r\n\r\nhi\r\n"), requiretls=True)])
        yield Courier(reactor, "relay.test", 5, 10).send(
            [hop], lambda: next(jobs, None),
            lambda j, results: reports.update({r.recipient: r for r in results}))
        return reports["bob@b.test"]

    @defer.inlineCallbacks
    def test_a_smarthost_verified_for_its_configured_name_takes_it(self):
        hop = Hop("127.0.0.1", self.sink.port, tls="required", verify=True,
                  ca_file=str(self.ca.cert_path))
        result = yield self.send(hop)
        self.assertEqual(result.code, 250, result.text)
        [message] = self.sink.messages
        self.assertIn("REQUIRETLS", message.mail_params.split())

    @defer.inlineCallbacks
    def test_an_mx_host_verified_without_a_domain_policy_does_not(self):
        # verify from [tls_policy]: the certificate is good, but the MX records that
        # named the host were not validated (no DANE, no MTA-STS)
        hop = Hop("127.0.0.1", self.sink.port, tls="required", verify=True,
                  ca_file=str(self.ca.cert_path), address="127.0.0.1",
                  policy=TlsPolicy("verify"))
        result = yield self.send(hop)
        self.assertEqual((result.code, result.text),
                         (550, "5.7.30 REQUIRETLS: the next hop is not authenticated by "
                               "DANE or MTA-STS (TLS policy verify)"))
        self.assertEqual(self.sink.messages, [])
