"""DANE for outbound SMTP (RFC 7672): the TLSA matcher against certificates made here,
DNS lookups with their DNSSEC status against a DNS server on loopback, the routes they
make, and the client checking the certificate chain of real TLS servers."""

from __future__ import annotations

import datetime
import hashlib
import io
import shutil
import tempfile
from pathlib import Path

import certs
import dns.flags
import dns.message
import dns_server
import unbound
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from dns_server import DNSServer
from harness import TempPaths
from smtp_sink import SMTPSink
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailrelay.config import ConfigError, load_config
from mailrelay.delivery import dane
from mailrelay.delivery.client import Courier, Job
from mailrelay.delivery.destinations import Routes
from mailrelay.delivery.dnssec import TLSA, Answer, DNSClient, DNSFailure, DNSTimeout, NoSuchName
from mailrelay.delivery.router import Hop, MXRouter, TemporaryRouteError, router_from_config


def load(path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def record(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> TLSA:
    data = cert.public_bytes(Encoding.DER) if selector == 0 else spki(cert)
    data = {0: data, 1: hashlib.sha256(data).digest(), 2: hashlib.sha512(data).digest()}[mtype]
    return TLSA(usage, selector, mtype, data)


def zone_text(r: TLSA) -> str:
    return f"TLSA {r.usage} {r.selector} {r.mtype} {r.data.hex()}"


class CertificatesMixin(TempPaths):
    def setUp(self) -> None:
        super().setUp()
        self.ca = certs.TestCA(Path(self.mktemp()) / "ca")
        self.good = self.ca.issue("mx.good.test", chain=True)
        self.expired = self.ca.issue("mx.good.test", expired=True, chain=True)
        self.self_signed = self.ca.issue("mx.self.test", self_signed=True)
        self.other = certs.TestCA(Path(self.mktemp()) / "other", "another CA")


class MatcherTests(CertificatesMixin, unittest.TestCase):
    def test_dane_ee_every_selector_and_matching_type(self):
        leaf, ca = load(self.good[0])
        for selector in (0, 1):
            for mtype in (0, 1, 2):
                self.assertIsNone(dane.match([record(3, selector, mtype, leaf)], [leaf, ca]),
                                  (selector, mtype))

    def test_dane_ee_ignores_names_and_dates(self):
        [leaf, ca] = load(self.expired[0])
        self.assertIsNone(dane.match([record(3, 1, 1, leaf)], [leaf, ca], ["elsewhere.test"]))
        [self_signed] = load(self.self_signed[0])
        self.assertIsNone(dane.match([record(3, 1, 1, self_signed)], [self_signed]))

    def test_a_record_of_another_key_does_not_match(self):
        leaf, ca = load(self.good[0])
        [stranger] = load(self.self_signed[0])
        problem = dane.match([record(3, 1, 1, stranger), record(2, 0, 1, self.other.cert)],
                             [leaf, ca], ["mx.good.test"])
        self.assertEqual(problem, "no TLSA record matches the certificate chain")
        self.assertEqual(dane.match([record(3, 1, 1, leaf)], []),
                         "the server sent no certificate")

    def test_dane_ta_checks_the_chain_the_name_and_the_dates(self):
        leaf, ca = load(self.good[0])
        anchor = [record(2, 0, 1, ca)]
        self.assertIsNone(dane.match(anchor, [leaf, ca], ["mx.good.test"]))
        self.assertIsNone(dane.match([record(2, 1, 2, ca)], [leaf, ca], ["MX.good.test."]))
        self.assertIn("do not include mx.wrong.test",
                      dane.match(anchor, [leaf, ca], ["mx.wrong.test"]))
        old, _ = load(self.expired[0])
        self.assertIn("has expired", dane.match(anchor, [old, ca], ["mx.good.test"]))
        # a leaf of another CA sent with our CA behind it: the chain does not hold
        foreign, _ = load(self.other.issue("mx.good.test", chain=True)[0])
        self.assertIn("is not signed by", dane.match(anchor, [foreign, ca], ["mx.good.test"]))
        # the anchor is never the leaf itself
        self.assertIsNotNone(dane.match([record(2, 0, 1, leaf)], [leaf, ca], ["mx.good.test"]))

    def test_wildcards_cover_one_label(self):
        self.assertTrue(dane._name_matches("*.good.test", "mx.good.test"))
        self.assertFalse(dane._name_matches("*.good.test", "a.mx.good.test"))
        self.assertFalse(dane._name_matches("*.good.test", "good.test"))

    def test_pkix_usages_are_unusable_and_only_encryption_remains(self):
        leaf, ca = load(self.good[0])
        records = [record(0, 0, 1, ca), record(1, 1, 1, leaf), TLSA(3, 1, 9, b"x")]
        self.assertEqual(dane.usable(records), ())
        policy = dane.TlsPolicy("dane", "test", dane.usable(records), ("mx.good.test",))
        [stranger] = load(self.self_signed[0])
        self.assertIsNone(policy.check([stranger]))  # RFC 7672 2.2: TLS, nothing checked
        strict = dane.TlsPolicy("dane", "test", (record(3, 1, 1, leaf),), ("mx.good.test",))
        self.assertIsNotNone(strict.check([stranger]))
        self.assertIsNone(strict.check([leaf]))


SIGNED = {"good.test", "strict.test", "tlsafail.test"}
ZONE = {
    "good.test": ["MX 10 mx.good.test"],
    "mx.good.test": ["A 127.0.0.1"],
    "plain.test": ["MX 10 mx.plain.test"],
    "mx.plain.test": ["A 127.0.0.1"],
    "_25._tcp.mx.plain.test": ["TLSA 3 1 1 " + "00" * 32],
    "strict.test": ["MX 10 mx.strict.test"],
    "mx.strict.test": ["A 127.0.0.1"],
    "tlsafail.test": ["MX 10 mx.tlsafail.test", "MX 20 mx2.tlsafail.test"],
    "mx.tlsafail.test": ["A 127.0.0.1"],
    "_25._tcp.mx.tlsafail.test": ["SERVFAIL"],
    "mx2.tlsafail.test": ["A 127.0.0.2"],
    "_25._tcp.mx2.tlsafail.test": ["SERVFAIL"],
    "slow.test": ["TIMEOUT"],
    "big.test": [f"TXT {i:03d}" + "x" * 200 for i in range(20)],
}


class DNSClientTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dns = DNSServer(ZONE, secure=SIGNED)
        self.client = DNSClient([self.dns.listen()], reactor, timeout=0.5, tries=1)
        self.addCleanup(self.dns.stop)

    @defer.inlineCallbacks
    def test_records_and_the_ad_bit_per_zone(self):
        answer = yield self.client.lookup("good.test", "MX")
        self.assertEqual(answer, Answer([(10, "mx.good.test")], [], True))
        answer = yield self.client.lookup("plain.test", "MX")
        self.assertEqual(answer, Answer([(10, "mx.plain.test")], [], False))
        answer = yield self.client.lookup("_25._tcp.mx.plain.test", "TLSA")
        self.assertEqual(answer.records, [TLSA(3, 1, 1, bytes(32))])
        answer = yield self.client.lookup("mx.good.test", "AAAA")
        self.assertEqual(answer, Answer([], [], True))  # no data, validated

    @defer.inlineCallbacks
    def test_the_query_asks_for_dnssec(self):
        response = yield defer.ensureDeferred(self.client.query("good.test", "MX"))
        self.assertTrue(response.flags & 0x0020)  # AD
        [query] = [dns.message.from_wire(q) for q in self.dns.queries]
        self.assertTrue(query.flags & dns.flags.RD)
        self.assertEqual((query.edns, query.ednsflags & dns.flags.DO), (0, dns.flags.DO))

    @defer.inlineCallbacks
    def test_failures(self):
        with self.assertRaises(NoSuchName):
            yield self.client.lookup("missing.test", "A")
        with self.assertRaises(DNSFailure):
            yield self.client.lookup("_25._tcp.mx.tlsafail.test", "TLSA")
        with self.assertRaises(DNSTimeout):
            yield self.client.lookup("slow.test", "A")

    @defer.inlineCallbacks
    def test_a_truncated_answer_is_asked_again_over_tcp(self):
        answer = yield self.client.lookup("big.test", "TXT")
        self.assertEqual(len(answer.records), 20)

    def test_only_loopback_resolvers_are_trusted_unless_told(self):
        self.assertTrue(DNSClient([("127.0.0.1", 53), ("::1", 53)]).trusted)
        self.assertFalse(DNSClient([("127.0.0.1", 53), ("192.0.2.53", 53)]).trusted)
        self.assertTrue(DNSClient([("192.0.2.53", 53)], trust_all=True).trusted)

    @defer.inlineCallbacks
    def test_the_ad_bit_of_an_untrusted_resolver_is_ignored(self):
        client = DNSClient([self.dns.address], reactor, timeout=0.5, tries=1)
        client.trust_all, client.servers = False, [self.dns.address]
        self.patch(type(client), "trusted", property(lambda self: False))
        answer = yield client.lookup("good.test", "MX")
        self.assertFalse(answer.secure)


class RouterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dns = DNSServer(ZONE, secure=SIGNED)
        self.client = DNSClient([self.dns.listen()], reactor, timeout=0.5, tries=1)
        self.addCleanup(self.dns.stop)
        leaf = TLSA(3, 1, 1, b"\x01" * 32)
        self.dns.zone["_25._tcp.mx.good.test"] = [zone_text(leaf), "TLSA 1 1 1 " + "02" * 32]
        self.leaf = leaf

    def router(self, table=None, default="dane"):
        return MXRouter(self.client, allow_local=True,
                        policies=dane.PolicyTable(table, default))

    @defer.inlineCallbacks
    def test_validated_tlsa_makes_a_dane_hop(self):
        [hop] = yield self.router().route("good.test")
        self.assertEqual((hop.host, hop.tls, hop.policy.level), ("mx.good.test", "required",
                                                                 "dane"))
        self.assertEqual(hop.policy.tlsa, (self.leaf,))  # the PKIX-EE record left out
        self.assertEqual(hop.policy.names, ("mx.good.test",))
        self.assertIn("DNSSEC-validated TLSA for mx.good.test", str(hop.policy))

    @defer.inlineCallbacks
    def test_tlsa_behind_a_cname(self):
        self.dns.zone["_25._tcp.mx.good.test"] = ["CNAME tlsa.good.test"]
        self.dns.zone["tlsa.good.test"] = [zone_text(self.leaf)]
        [hop] = yield self.router().route("good.test")
        self.assertEqual((hop.policy.level, hop.policy.tlsa), ("dane", (self.leaf,)))
        self.dns.zone["tlsa.good.test"] = ["CNAME _25._tcp.mx.good.test"]  # a loop
        with self.assertRaises(TemporaryRouteError) as e:
            yield self.router().route("good.test")
        self.assertIn("failed (CNAME chain too long)", e.exception.text)

    @defer.inlineCallbacks
    def test_unsigned_zone_is_opportunistic(self):
        [hop] = yield self.router().route("plain.test")
        self.assertEqual((hop.tls, hop.policy.level), ("opportunistic", "may"))
        self.assertIn("not DNSSEC-validated", hop.policy.why)

    @defer.inlineCallbacks
    def test_signed_without_tlsa(self):
        [hop] = yield self.router().route("strict.test")
        self.assertEqual(hop.policy.level, "may")
        with self.assertRaises(TemporaryRouteError) as e:
            yield self.router({"strict.test": "dane-only"}).route("strict.test")
        self.assertEqual(e.exception.status, "4.7.5")
        self.assertIn("no DNSSEC-validated TLSA records at _25._tcp.mx.strict.test",
                      e.exception.text)

    @defer.inlineCallbacks
    def test_a_failed_tlsa_lookup_defers_never_falls_back(self):
        with self.assertRaises(TemporaryRouteError) as e:
            yield self.router().route("tlsafail.test")
        self.assertTrue(e.exception.text.startswith(
            "4.7.5 mx.tlsafail.test: TLSA lookup for _25._tcp.mx.tlsafail.test failed "
            "(SERVFAIL)"), e.exception.text)
        # one MX whose TLSA lookup works is used; the other is not
        self.dns.zone["_25._tcp.mx2.tlsafail.test"] = [zone_text(self.leaf)]
        hops = yield self.router().route("tlsafail.test")
        self.assertEqual([(h.host, h.policy.level) for h in hops], [("mx2.tlsafail.test",
                                                                      "dane")])

    @defer.inlineCallbacks
    def test_domains_under_different_policies_never_share_a_connection(self):
        self.dns.zone["weak.test"] = ["MX 10 mx.good.test"]  # the same MX host, unsigned
        self.dns.zone["also.good.test"] = ["MX 10 mx.good.test"]
        routes = Routes(self.router(), reactor, 60)
        groups, failures = yield defer.ensureDeferred(routes.group(
            ["a@good.test", "b@weak.test", "c@also.good.test"], "q1"))
        self.assertEqual(failures, [])
        # DANE's connections are per recipient domain too: TLS reports count sessions
        # per domain (RFC 8460), as Postfix caches connections per next-hop domain.
        by_level = sorted((hops[0].policy.level, sorted(rcpts))
                          for hops, rcpts in groups.values())
        self.assertEqual(by_level, [("dane", ["a@good.test"]), ("dane", ["c@also.good.test"]),
                                    ("may", ["b@weak.test"])])

    @defer.inlineCallbacks
    def test_policy_table(self):
        router = self.router({"good.test": "none", ".plain.test": "verify",
                              "plain.test": "encrypt"}, default="may")
        [hop] = yield router.route("good.test")
        self.assertEqual((hop.tls, str(hop.policy)), ("none", "none (tls_policy good.test)"))
        [hop] = yield router.route("plain.test")
        self.assertEqual((hop.tls, hop.verify, hop.policy.level), ("required", False, "encrypt"))
        [hop] = yield self.router(default="may").route("good.test")  # may: no DANE
        self.assertEqual(hop.policy.level, "may")


def job(queue_id: str, rcpt: str) -> Job:
    return Job(queue_id, "s@a.test", [rcpt], lambda: io.BytesIO(b"Subject: x\r\n\r\nhi\r\n"))


class ClientTests(CertificatesMixin, unittest.TestCase):
    """The client against SMTP sinks with real TLS: the check is made at the handshake."""

    def sink(self, cert=None) -> SMTPSink:
        sink = SMTPSink(tls_cert=str(cert[0]) if cert else None,
                        tls_key=str(cert[1]) if cert else None)
        sink.listen()
        self.addCleanup(sink.stop)
        return sink

    def hop(self, sink: SMTPSink, records: list[TLSA], host: str = "mx.good.test") -> Hop:
        policy = dane.TlsPolicy("dane", "test", dane.usable(records), (host,))
        return Hop(host, sink.port, tls="required", address="127.0.0.1", policy=policy)

    @defer.inlineCallbacks
    def send(self, hop: Hop):
        reports = {}
        jobs = iter([job("q1", "bob@good.test")])
        outcome = yield Courier(reactor, "relay.test", 5, 10).send(
            [hop], lambda: next(jobs, None),
            lambda j, results: reports.update({r.recipient: r for r in results}))
        return outcome, reports

    @defer.inlineCallbacks
    def test_a_matching_certificate_delivers(self):
        leaf, ca = load(self.good[0])
        for records in ([record(3, 1, 1, leaf)], [record(2, 0, 1, ca)]):
            sink = self.sink(self.good)
            names = []  # the server name the client asked for (SNI)
            sink.tls_options.getContext().set_tlsext_servername_callback(
                lambda connection, names=names: names.append(connection.get_servername()))
            outcome, reports = yield self.send(self.hop(sink, records))
            self.assertEqual(outcome.jobs, 1, outcome.errors)
            result = reports["bob@good.test"]
            self.assertEqual((result.code, result.tls, result.policy), (250, True, "dane"))
            self.assertEqual(len(sink.messages), 1)
            self.assertEqual(names, [b"mx.good.test"])

    @defer.inlineCallbacks
    def test_a_self_signed_certificate_matching_3_1_1_delivers(self):
        [cert] = load(self.self_signed[0])
        sink = self.sink(self.self_signed)
        outcome, _ = yield self.send(self.hop(sink, [record(3, 1, 1, cert)], "mx.self.test"))
        self.assertEqual(outcome.jobs, 1, outcome.errors)

    @defer.inlineCallbacks
    def check_refused(self, sink: SMTPSink, hop: Hop, problem: str):
        outcome, reports = yield self.send(hop)
        self.assertEqual((outcome.jobs, reports, outcome.status), (0, {}, "4.7.5"))
        [error] = outcome.errors
        self.assertEqual(error, f"{hop.name}: TLS policy dane (test): {problem}")
        self.assertEqual((sink.messages, sink.transactions), ([], 0))

    @defer.inlineCallbacks
    def test_a_certificate_that_does_not_match_is_refused_before_mail(self):
        [stranger] = load(self.self_signed[0])
        sink = self.sink(self.good)
        yield self.check_refused(sink, self.hop(sink, [record(3, 1, 1, stranger)]),
                                 "no TLSA record matches the certificate chain")

    @defer.inlineCallbacks
    def test_wrong_name_and_expired_under_dane_ta(self):
        _, ca = load(self.good[0])
        sink = self.sink(self.good)
        yield self.check_refused(
            sink, self.hop(sink, [record(2, 0, 1, ca)], "mx.wrong.test"),
            "the certificate chains to a DANE-TA record, but its names (mx.good.test) do "
            "not include mx.wrong.test")
        sink = self.sink(self.expired)
        outcome, _ = yield self.send(self.hop(sink, [record(2, 0, 1, ca)]))
        self.assertIn("has expired", outcome.errors[0])
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_a_server_without_starttls_is_not_used(self):
        leaf, _ = load(self.good[0])
        sink = self.sink()
        yield self.check_refused(sink, self.hop(sink, [record(3, 1, 1, leaf)]),
                                 "the server does not offer STARTTLS")

    @defer.inlineCallbacks
    def test_verify_refuses_a_certificate_it_cannot_verify(self):
        sink = self.sink(self.good)  # signed by a CA the system does not trust
        policy = dane.TlsPolicy("verify", "test")
        hop = Hop("mx.good.test", sink.port, tls="required", verify=True,
                  address="127.0.0.1", policy=policy)
        outcome, reports = yield self.send(hop)
        self.assertEqual((outcome.jobs, reports, outcome.status), (0, {}, "4.7.5"))
        self.assertIn("TLS policy verify (test): TLS handshake failed", outcome.errors[0])
        self.assertEqual(sink.messages, [])

    def test_dates_are_checked_at_now(self):
        leaf, ca = load(self.good[0])
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=60)
        self.assertIn("expired", dane.match([record(2, 0, 1, ca)], [leaf, ca],
                                            ["mx.good.test"], now=later))


SIGNED_ZONE = """
@ 300 IN MX 10 mx
mx 300 IN A 127.0.0.1
_25._tcp.mx 300 IN TLSA 3 1 1 {digest}
"""


class ValidatingResolverTests(unittest.TestCase):
    """Debian's unbound validating zones this test signs, served by tests/dns_server.py:
    the AD bit reaches the relay's DNS client for the signed zone, and a zone whose
    signatures do not match its trust anchor is bogus (SERVFAIL)."""

    # ./test.sh installs unbound; without it this fails (tests/conftest.py names it).

    def setUp(self) -> None:
        text = SIGNED_ZONE.format(digest="ab" * 32)
        signed, anchor = dns_server.sign(text, "signed.test")
        bogus, _ = dns_server.sign(text, "bogus.test")
        _, wrong_anchor = dns_server.sign(text, "bogus.test")  # another key: bogus
        plain = dns_server.sign(text, "plain.test")[0]
        self.server = dns_server.SignedServer([signed, bogus, plain])
        address = self.server.listen()
        self.addCleanup(self.server.stop)
        self.unbound = unbound.Unbound(
            Path(tempfile.mkdtemp(prefix="mailrelay-unbound-")),
            stubs={z: address for z in ("signed.test", "bogus.test", "plain.test")},
            anchors=[anchor, wrong_anchor], insecure=["plain.test"])
        self.addCleanup(shutil.rmtree, self.unbound.directory, True)
        self.unbound.start()
        self.addCleanup(self.unbound.stop)
        self.client = DNSClient([self.unbound.address], reactor, timeout=3, tries=2)

    @defer.inlineCallbacks
    def test_validated_bogus_and_insecure(self):
        answer = yield self.client.lookup("signed.test", "MX")
        self.assertEqual(answer, Answer([(10, "mx.signed.test")], [], True))
        answer = yield self.client.lookup("_25._tcp.mx.signed.test", "TLSA")
        self.assertEqual(answer, Answer([TLSA(3, 1, 1, b"\xab" * 32)], [], True))
        answer = yield self.client.lookup("plain.test", "MX")
        self.assertEqual(answer, Answer([(10, "mx.plain.test")], [], False))
        with self.assertRaises(DNSFailure) as e:
            yield self.client.lookup("bogus.test", "MX")
        self.assertEqual(str(e.exception), "SERVFAIL")
        # the router makes a DANE hop of the validated zone only
        router = MXRouter(self.client, allow_local=True,
                          policies=dane.PolicyTable(default="dane"))
        [hop] = yield router.route("signed.test")
        self.assertEqual((hop.policy.level, hop.policy.tlsa),
                         ("dane", (TLSA(3, 1, 1, b"\xab" * 32),)))
        [hop] = yield router.route("plain.test")
        self.assertEqual(hop.policy.level, "may")


class ConfigTests(TempPaths, unittest.TestCase):
    def load(self, text: str):
        path = Path(self.mktemp())
        path.write_text(text)
        return load_config(str(path))

    def test_tls_policy_section(self):
        config = self.load("[delivery]\ndns_servers = 192.0.2.53\n[tls_policy]\n"
                           "Example.ORG = DANE-only\n.legacy.test = may\n")
        self.assertEqual(config.tls_policy, {"example.org": "dane-only",
                                             ".legacy.test": "may"})
        self.assertEqual((config.delivery.dnssec, config.delivery.dns_trusted), ("auto", False))
        router = router_from_config(config)  # not loopback, not trusted: DANE off
        self.assertEqual(router.policies.level("x.legacy.test"),
                         ("may", "tls_policy .legacy.test"))
        self.assertEqual(router.policies.level("other.test"), ("may", "default, DANE off"))
        config = self.load("[delivery]\ndns_servers = 192.0.2.53\ndns_trusted = yes\n")
        self.assertEqual(router_from_config(config).policies.default, "dane")

    def test_the_log_says_once_whether_dane_is_on(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        router_from_config(self.load("[delivery]\ndns_servers = 192.0.2.53\n"))  # quiet
        router_from_config(self.load("[delivery]\ndns_servers = 192.0.2.53\n"), announce=True)
        router_from_config(self.load("[delivery]\ndns_servers = 127.0.0.1:5353\n"),
                           announce=True)
        router_from_config(self.load("[delivery]\ndnssec = off\ndns_servers = 127.0.0.1\n"),
                           announce=True)
        lines = [formatEvent(e) for e in events if "DANE" in formatEvent(e)]
        self.assertEqual(lines, [
            "delivery: DANE off: no trusted validating resolver (the DNS servers 192.0.2.53 "
            "are not loopback; dns_trusted = yes trusts them)",
            "delivery: DANE on: DNSSEC status from 127.0.0.1:5353",
            "delivery: DANE off: dnssec = off"])

    def test_refused_settings(self):
        for text, problem in [
            ("[tls_policy]\nexample.org = strict\n", "'strict' is not one of none, may"),
            ("[tls_policy]\nexample.org = dane-only\n[routes]\nexample.org = mx.test\n",
             "dane-only needs MX delivery"),
            ("[delivery]\ndnssec = maybe\n", "dnssec"),
        ]:
            with self.assertRaises(ConfigError) as e:
                self.load(text)
            self.assertIn(problem, str(e.exception))
