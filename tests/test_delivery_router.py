"""Routing against a real twisted.names server on loopback."""

from __future__ import annotations

import random

from dns_server import DNSServer
from harness import TempPaths
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.names import client
from twisted.trial import unittest

from mailrelay.config import load_config
from mailrelay.delivery.router import (
    Hop,
    MXRouter,
    PermanentRouteError,
    RoutedRouter,
    SmarthostRouter,
    TemporaryRouteError,
    make_resolver,
    router_from_config,
)
from mailrelay.logtext import GatheringObserver, classic_text

ZONE = {
    "example.test": ["MX 20 mx2.example.test", "MX 10 mx1.example.test"],
    "mx1.example.test": ["A 127.0.0.11", "AAAA ::1"],
    "mx2.example.test": ["A 127.0.0.12"],
    "equal.test": ["MX 10 a.equal.test", "MX 10 b.equal.test", "MX 10 c.equal.test"],
    "a.equal.test": ["A 127.0.1.1"],
    "b.equal.test": ["A 127.0.1.2"],
    "c.equal.test": ["A 127.0.1.3"],
    "nomx.test": ["A 127.0.0.21", "TXT v=spf1 -all"],
    "null.test": ["MX 0 ."],
    "broken.test": ["SERVFAIL"],
    "slow.test": ["TIMEOUT"],
    "alias.test": ["CNAME example.test"],
    "public.test": ["MX 10 mx.public.test"],
    "mx.public.test": ["A 192.0.2.25"],  # TEST-NET-1: reserved, treated as not public
    "ghost.test": ["MX 10 missing.ghost.test"],
    "xn--bcher-kva.test": ["A 127.0.0.31"],
    "xn--fa-hia.test": ["A 127.0.0.32"],  # faß.test (IDNA 2008)
    "fass.test": ["A 127.0.0.33"],  # what IDNA 2003 makes of faß.test
}


class MXRouterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dns = DNSServer(ZONE)
        self.addr = self.dns.listen()
        self.addCleanup(self.dns.stop)
        self.resolver = make_resolver([self.addr])
        self.router = MXRouter(self.resolver, port=2525, allow_local=True,
                               rng=random.Random(7))

    @defer.inlineCallbacks
    def test_preference_order_each_host_resolved(self):
        hops = yield self.router.route("Example.TEST")
        self.assertEqual([(h.host, h.address, h.port) for h in hops], [
            ("mx1.example.test", "127.0.0.11", 2525),
            ("mx1.example.test", "::1", 2525),
            ("mx2.example.test", "127.0.0.12", 2525),
        ])
        self.assertEqual({h.tls for h in hops}, {"opportunistic"})

    @defer.inlineCallbacks
    def test_equal_preferences_are_shuffled(self):
        orders = set()
        for _ in range(20):
            hops = yield self.router.route("equal.test")
            orders.add(tuple(h.host for h in hops))
        self.assertGreater(len(orders), 1)
        self.assertEqual({frozenset(o) for o in orders},
                         {frozenset({"a.equal.test", "b.equal.test", "c.equal.test"})})

    @defer.inlineCallbacks
    def test_no_mx_falls_back_to_address(self):
        hops = yield self.router.route("nomx.test")
        self.assertEqual([(h.host, h.address) for h in hops], [("nomx.test", "127.0.0.21")])

    @defer.inlineCallbacks
    def test_cname_followed(self):
        hops = yield self.router.route("alias.test")
        self.assertEqual(hops[0].host, "mx1.example.test")

    def test_null_mx_is_permanent(self):
        d = self.router.route("null.test")
        return self.assertFailure(d, PermanentRouteError).addCallback(
            lambda e: self.assertIn("5.1.10", e.text))

    def test_nxdomain_is_permanent(self):
        d = self.router.route("nowhere.test")
        return self.assertFailure(d, PermanentRouteError).addCallback(
            lambda e: self.assertEqual((e.code, e.status), (550, "5.1.2")))

    def test_mx_without_address_is_permanent(self):
        d = self.router.route("ghost.test")
        return self.assertFailure(d, PermanentRouteError).addCallback(
            lambda e: self.assertEqual(e.status, "5.4.4"))

    def test_servfail_is_temporary(self):
        d = self.router.route("broken.test")
        return self.assertFailure(d, TemporaryRouteError).addCallback(
            lambda e: self.assertEqual(e.code, 451))

    def test_timeout_is_temporary(self):
        router = MXRouter(client.Resolver(servers=[self.addr], timeout=(0.3,)))
        return self.assertFailure(router.route("slow.test"), TemporaryRouteError)

    def test_local_targets_refused_by_default(self):
        router = MXRouter(self.resolver)
        d = router.route("example.test")
        return self.assertFailure(d, PermanentRouteError).addCallback(
            lambda e: self.assertIn("local or private", str(e)))

    def test_reserved_addresses_refused_too(self):
        return self.assertFailure(MXRouter(self.resolver).route("public.test"),
                                  PermanentRouteError)

    @defer.inlineCallbacks
    def test_international_domain_asked_as_a_labels(self):
        hops = yield self.router.route("Bücher.test")
        self.assertEqual([(h.host, h.address) for h in hops],
                         [("xn--bcher-kva.test", "127.0.0.31")])
        # IDNA 2008, as scopes convert: ß is a letter of its own, not "ss".
        hops = yield self.router.route("faß.test")
        self.assertEqual([(h.host, h.address) for h in hops],
                         [("xn--fa-hia.test", "127.0.0.32")])
        yield self.assertFailure(self.router.route("a..b.test"), PermanentRouteError)

    def test_address_literal(self):
        self.assertFailure(MXRouter(self.resolver).route("[127.0.0.1]"), PermanentRouteError)
        return self.router.route("[127.0.0.1]").addCallback(
            lambda hops: self.assertEqual(hops[0].address, "127.0.0.1"))


class OtherRouterTests(TempPaths, unittest.TestCase):
    @defer.inlineCallbacks
    def test_routes_override_fallback(self):
        smarthost = Hop("smart.test", 587, tls="required", verify=True, username="u",
                        password="secret")
        router = RoutedRouter({"Inside.Test": ("10.1.2.3", 2525)}, SmarthostRouter(smarthost))
        self.assertEqual((yield router.route("inside.test")), [Hop("10.1.2.3", 2525)])
        self.assertEqual((yield router.route("outside.test")), [smarthost])
        self.assertNotIn("secret", repr(smarthost))

    @defer.inlineCallbacks
    def test_routes_match_u_labels_and_a_labels(self):
        fallback = SmarthostRouter(Hop("smart.test"))
        router = RoutedRouter({"Bücher.test": ("10.1.2.3", 2525),
                               "xn--exmple-cua.test": ("10.1.2.4", 2525)}, fallback)
        for domain, host in [("xn--bcher-kva.test", "10.1.2.3"), ("BÜCHER.test", "10.1.2.3"),
                             ("exämple.test", "10.1.2.4"), ("fass.test", "smart.test")]:
            self.assertEqual((yield router.route(domain))[0].host, host, domain)

    def test_from_config(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[delivery]\nmode = smarthost\nsmarthost = smart.test:587\n"
                    "smarthost_username = u\nsmarthost_password = p\n"
                    "[routes]\nexample.org = mx.example.net:2525\n")
        router = router_from_config(load_config(path))
        self.assertIsInstance(router, RoutedRouter)
        self.assertEqual(router.fallback.hop, Hop("smart.test", 587, tls="required",
                                                  verify=True, username="u", password="p"))
        with open(path, "w") as f:
            f.write("[delivery]\ndns_servers = 127.0.0.1:5353\n")
        router = router_from_config(load_config(path))
        self.assertIsInstance(router, MXRouter)
        self.assertFalse(router.allow_local)
        self.assertEqual(router.lookup.servers, [("127.0.0.1", 5353)])  # loopback: DNSSEC
        self.assertEqual(router.policies.level("example.org"), ("dane", "default"))


class QuietTests(unittest.TestCase):
    """A lookup, and the system resolver reading resolv.conf, write no line to the log."""

    def setUp(self) -> None:
        self.dns = DNSServer(ZONE)
        self.addr = self.dns.listen()
        self.addCleanup(self.dns.stop)
        self.lines: list[str] = []
        observer = GatheringObserver(self, classic_text)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.addCleanup(observer.flush)

    def write(self, text: str) -> None:  # the log file
        self.lines += text.splitlines()

    def flush(self) -> None:
        pass

    def chatter(self) -> list[str]:
        return [line for line in self.lines
                if any(word in line for word in ("DNSDatagramProtocol", "UDP Port", " 0x",
                                                 "resolv.conf", "Resolver added"))]

    @defer.inlineCallbacks
    def test_a_lookup(self):
        router = MXRouter(make_resolver([self.addr]), port=2525, allow_local=True)
        hops = yield router.route("example.test")
        self.assertEqual(len(hops), 3)
        yield deferLater(reactor, 0.1, lambda: None)  # the ports close, the lines gathered
        self.assertEqual(self.chatter(), [])

    def test_the_system_resolver_reading_resolv_conf(self):
        chain = make_resolver()
        system = chain.resolvers[-1]
        if system._parseCall is not None and system._parseCall.active():
            system._parseCall.cancel()
        self.assertEqual(self.chatter(), [])
