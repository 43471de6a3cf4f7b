"""MTA-STS (RFC 8461): the TXT record and policy parsers, the HTTPS fetch against a real
twisted.web server with a test CA (verified certificate, no redirects, size cap), the
policy cache (on disk, by id, max_age) and the routes an enforce policy makes."""

from __future__ import annotations

import json
from pathlib import Path

import certs
from dns_server import DNSServer
from harness import TempPaths
from https_server import HTTPSServer
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.config import ConfigError, load_config
from mailrelay.delivery import dane, mtasts
from mailrelay.delivery.dnssec import DNSClient
from mailrelay.delivery.router import MXRouter, TemporaryRouteError, router_from_config

POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mx.good.test\r\nmx: *.alt.test\r\n"
          "max_age: 86400\r\n")
WELL_KNOWN = "/.well-known/mta-sts.txt"


class ParserTests(unittest.TestCase):
    def test_txt_record(self):
        self.assertEqual(mtasts.parse_txt(["v=STSv1; id=20260101T000000;"]), "20260101T000000")
        self.assertEqual(mtasts.parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]), "abc")
        self.assertIsNone(mtasts.parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]))  # two: none
        self.assertIsNone(mtasts.parse_txt(["v=STSv1; id=not-alnum"]))
        self.assertIsNone(mtasts.parse_txt(["v=STSv1"]))
        self.assertIsNone(mtasts.parse_txt([]))

    def test_policy(self):
        p = mtasts.parse_policy(POLICY, "good.test", "1", 1000.0)
        self.assertEqual((p.mode, p.mx, p.max_age, p.expires),
                         ("enforce", ("mx.good.test", "*.alt.test"), 86400, 87400.0))
        self.assertTrue(p.matches("MX.good.test."))
        self.assertTrue(p.matches("a.alt.test"))
        self.assertFalse(p.matches("a.b.alt.test"))  # a wildcard is one label
        self.assertFalse(p.matches("alt.test"))
        self.assertFalse(p.matches("mx.evil.test"))
        lf = mtasts.parse_policy(POLICY.replace("\r\n", "\n") + "extension: x\n", "g", "1", 0)
        self.assertEqual(lf.mx, p.mx)  # LF line ends, unknown keys ignored
        self.assertEqual(mtasts.parse_policy(POLICY.replace("86400", "99999999"), "g", "1",
                                             0).max_age, mtasts.MAX_AGE)
        for bad in (POLICY.replace("STSv1", "STSv2"), POLICY.replace("enforce", "strict"),
                    POLICY.replace("86400", "a day"), "version: STSv1\nmode: enforce\n"
                    "max_age: 1\n", POLICY + "garbage\n", POLICY.replace("mx.good", "mx_good")):
            self.assertRaises(mtasts.PolicyInvalid, mtasts.parse_policy, bad, "g", "1", 0)
        none = mtasts.parse_policy("version: STSv1\nmode: none\nmax_age: 1\n", "g", "1", 0)
        self.assertEqual(none.mode, "none")


class PolicyWorld(TempPaths):
    """A DNS server for the test domains and an HTTPS policy server whose certificate the
    test CA signed for every mta-sts.<domain> name."""

    def setUp(self) -> None:
        super().setUp()
        base = Path(self.mktemp())
        self.ca = certs.TestCA(base / "ca")
        names = [f"mta-sts.{d}.test" for d in ("good", "big", "moved", "missing")]
        cert, key = self.ca.issue(names[0], names=tuple(names[1:]), chain=True)
        self.https = HTTPSServer(str(cert), str(key))
        self.https_port = self.https.listen()
        self.addCleanup(self.https.stop)
        self.https.files[("mta-sts.good.test", WELL_KNOWN)] = POLICY
        self.https.files[("mta-sts.big.test", WELL_KNOWN)] = POLICY + "x: " + "y" * 70000
        self.https.redirects[("mta-sts.moved.test", WELL_KNOWN)] = (
            f"https://mta-sts.good.test:{self.https_port}{WELL_KNOWN}")
        zone = {f"mta-sts.{d}.test": ["A 127.0.0.1"] for d in
                ("good", "big", "moved", "missing", "wrong")}  # wrong: not in the certificate
        zone["_mta-sts.good.test"] = ["TXT v=STSv1; id=one"]
        zone["good.test"] = ["MX 10 mx.good.test", "MX 20 mx.evil.test"]
        zone["mx.good.test"] = ["A 127.0.0.1"]
        zone["mx.evil.test"] = ["A 127.0.0.1"]
        self.dns = DNSServer(zone)
        self.dns.listen()
        self.addCleanup(self.dns.stop)
        self.lookup = DNSClient([self.dns.address], reactor)
        self.fetcher = mtasts.Fetcher(reactor, self.lookup, str(self.ca.cert_path),
                                      self.https_port)
        self.cache_dir = str(base / "mta-sts")


class FetchTests(PolicyWorld, unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_verified_policy_is_fetched(self):
        text = yield defer.ensureDeferred(self.fetcher.fetch("good.test"))
        self.assertEqual(text, POLICY)

    @defer.inlineCallbacks
    def test_what_is_refused(self):
        failures = {}
        for domain in ("big", "moved", "wrong", "missing", "nohost"):
            try:
                yield defer.ensureDeferred(self.fetcher.fetch(f"{domain}.test"))
            except mtasts.PolicyError as e:
                failures[domain] = str(e)
        self.assertIn("larger than 65536 bytes", failures["big"])
        self.assertIn("HTTP 301", failures["moved"])  # not followed
        self.assertIn("HTTP 404", failures["missing"])
        self.assertIn("mta-sts.nohost.test has no address", failures["nohost"])
        self.assertIn("TLS certificate does not match the host name", failures["wrong"])
        self.assertEqual(len(failures), 5)

    @defer.inlineCallbacks
    def test_a_body_that_never_ends_is_given_up(self):
        self.patch(mtasts, "FETCH_TIMEOUT", 0.5)
        self.https.stalls.add(("mta-sts.good.test", WELL_KNOWN))
        with self.assertRaises(mtasts.PolicyError) as raised:
            yield defer.ensureDeferred(self.fetcher.fetch("good.test"))
        self.assertEqual(str(raised.exception), "mta-sts.good.test: no answer in 0.5 s")

    @defer.inlineCallbacks
    def test_the_system_trust_roots_do_not_know_the_test_ca(self):
        fetcher = mtasts.Fetcher(reactor, self.lookup, "", self.https_port)
        with self.assertRaises(mtasts.PolicyError) as raised:
            yield defer.ensureDeferred(fetcher.fetch("good.test"))
        self.assertIn("certificate verify failed", str(raised.exception))
        self.assertEqual(raised.exception.kind, "sts-webpki-invalid")  # for TLS reports


class CacheTests(PolicyWorld, unittest.TestCase):
    def cache(self, clock):
        return mtasts.PolicyCache(self.lookup, self.fetcher.fetch, self.cache_dir, clock,
                                  in_thread=lambda f, *a: defer.succeed(f(*a)))

    @defer.inlineCallbacks
    def test_cached_by_id_on_disk_until_max_age(self):
        clock = task.Clock()
        clock.advance(1000)
        policy = yield defer.ensureDeferred(self.cache(clock).policy("good.test"))
        self.assertEqual((policy.id, policy.mode, policy.fetched), ("one", "enforce", 1000))
        saved = json.loads((Path(self.cache_dir) / "good.test.json").read_text())
        self.assertEqual(saved["id"], "one")
        self.assertEqual(len(self.https.gets), 1)

        # A new cache (a restart) uses the file; the TXT record removed changes nothing.
        self.dns.zone.pop("_mta-sts.good.test")
        self.https.files.clear()
        clock.advance(3600)
        again = yield defer.ensureDeferred(self.cache(clock).policy("good.test"))
        self.assertEqual(again, policy)
        self.assertEqual(len(self.https.gets), 1)

        # Past max_age, without the TXT record, there is no policy.
        clock.advance(86400)
        self.assertIsNone((yield defer.ensureDeferred(self.cache(clock).policy("good.test"))))

    @defer.inlineCallbacks
    def test_a_new_id_fetches_and_a_failed_fetch_keeps_the_old_policy(self):
        clock = task.Clock()
        cache = self.cache(clock)
        yield defer.ensureDeferred(cache.policy("good.test"))
        self.dns.zone["_mta-sts.good.test"] = ["TXT v=STSv1; id=two"]
        self.https.files[("mta-sts.good.test", WELL_KNOWN)] = POLICY.replace("enforce",
                                                                             "testing")
        policy = yield defer.ensureDeferred(cache.policy("good.test"))
        self.assertEqual((policy.id, policy.mode), ("two", "testing"))
        self.dns.zone["_mta-sts.good.test"] = ["TXT v=STSv1; id=three"]
        self.https.files.clear()
        failures = []
        cache.on_failure = lambda domain, e: failures.append((domain, e.kind))
        kept = yield defer.ensureDeferred(cache.policy("good.test"))
        self.assertEqual(kept, policy)
        self.assertEqual(failures, [("good.test", "sts-policy-fetch-error")])

    @defer.inlineCallbacks
    def test_refreshed_before_it_runs_out(self):
        clock = task.Clock()
        cache = self.cache(clock)
        first = yield defer.ensureDeferred(cache.policy("good.test"))
        clock.advance(mtasts.REFRESH + 1)
        yield defer.ensureDeferred(cache.policy("good.test"))  # the cached one, refreshing
        yield task.deferLater(reactor, 0.3, lambda: None)
        second = yield defer.ensureDeferred(cache.policy("good.test"))
        self.assertEqual(len(self.https.gets), 2)
        self.assertGreater(second.fetched, first.fetched)


class RouterTests(PolicyWorld, unittest.TestCase):
    @defer.inlineCallbacks
    def test_enforce_uses_only_listed_mx_hosts_with_a_verified_certificate(self):
        cache = mtasts.PolicyCache(self.lookup, self.fetcher.fetch, self.cache_dir, reactor)
        router = MXRouter(self.lookup, allow_local=True, sts=cache, ca_file="ca.pem")
        hops = yield router.route("good.test")
        self.assertEqual([h.host for h in hops], ["mx.good.test"])
        [hop] = hops
        self.assertEqual((hop.tls, hop.verify, hop.ca_file, hop.policy.level),
                         ("required", True, "ca.pem", "mta-sts"))
        self.assertIn("MTA-STS enforce (policy one of good.test)", str(hop.policy))

        self.dns.zone["good.test"] = ["MX 10 mx.evil.test"]
        reported = []
        router.on_session = lambda hop, problem: reported.append(
            (hop.host, hop.policy.domain, problem))
        with self.assertRaises(TemporaryRouteError) as raised:
            yield router.route("good.test")
        self.assertEqual(reported, [("mx.evil.test", "good.test",
                                     raised.exception.args[0])])  # for TLS reports
        self.assertEqual(raised.exception.text,
                         "4.7.5 mx.evil.test: not an MX host of MTA-STS enforce (policy one "
                         "of good.test) (mx: mx.good.test *.alt.test), not used")

    @defer.inlineCallbacks
    def test_dane_wins_over_mta_sts(self):
        # mx.evil.test is not in the policy, but has DNSSEC-validated TLSA records
        self.dns.zone["good.test"] = ["MX 10 mx.evil.test"]
        self.dns.zone["_25._tcp.mx.evil.test"] = ["TLSA 3 1 1 " + "ab" * 32]
        self.dns.secure.add("good.test")
        self.dns.secure.add("mx.evil.test")
        cache = mtasts.PolicyCache(self.lookup, self.fetcher.fetch, self.cache_dir, reactor)
        router = MXRouter(self.lookup, allow_local=True, sts=cache,
                          policies=dane.PolicyTable(default="dane"))
        [hop] = yield router.route("good.test")
        self.assertEqual((hop.policy.level, hop.policy.domain), ("dane", "good.test"))
        self.assertEqual(len(self.https.gets), 1)  # the policy was fetched, not applied


class ConfigTests(TempPaths, unittest.TestCase):
    def test_settings_and_an_unreadable_ca_file(self):
        base = Path(self.mktemp())
        base.mkdir()
        ini = base / "mailrelay.ini"
        ini.write_text(f"[server]\ndata_dir = {base}\n[delivery]\n"
                       "dns_servers = 192.0.2.53\n")
        config = load_config(str(ini))
        d = config.delivery
        self.assertEqual((d.mta_sts, d.mta_sts_port, d.tls_ca_file, d.mta_sts_cache),
                         (True, 443, "", str(base / "mta-sts")))
        self.assertIsNotNone(router_from_config(config).sts)
        ini.write_text(ini.read_text() + f"tls_ca_file = {base}/missing.pem\n")
        with self.assertRaises(ConfigError) as raised:
            router_from_config(load_config(str(ini)))
        self.assertIn(f"[delivery] tls_ca_file: {base}/missing.pem: cannot read its "
                      "certificates", str(raised.exception))
        ini.write_text(ini.read_text().replace("tls_ca_file", "mta_sts = no\n#"))
        self.assertIsNone(router_from_config(load_config(str(ini))).sts)
