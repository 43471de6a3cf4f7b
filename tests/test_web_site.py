"""make_admin_service: the [admin] listener as the relay starts it, over HTTPS with the
relay's own certificate, session cookies marked Secure; and off when disabled."""

from __future__ import annotations

import shutil
import tempfile
from types import SimpleNamespace

from panel import listen_dns, seed, write_config
from twisted.internet import defer, reactor
from twisted.internet.ssl import Certificate
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody

from mailrelay.config import load_config
from mailrelay.directory import open_directory
from mailrelay.features.stats import StatsStore
from mailrelay.features.suppressions import SuppressionStore
from mailrelay.spool.spool import Spool
from mailrelay.tls import server_options
from mailrelay.web.site import make_admin_service


class AdminServiceTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="mailrelay-site-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.dns = listen_dns()
        self.addCleanup(self.dns.stop)
        self.config = load_config(write_config(self.tmp, self.dns.address[1]))
        seed(self.config)
        self.spool = Spool(self.config.spool.directory, reactor=reactor)
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.stores = (SuppressionStore(f"{self.tmp}/s.sqlite"), StatsStore(f"{self.tmp}/t.sqlite"))
        for store in self.stores:
            self.addCleanup(store.close)

    def service(self, **admin):
        self.config.admin = SimpleNamespace(**(vars(self.config.admin) | admin))
        tls = self.config.tls
        options = server_options(tls.certificate, tls.key, True, "relay.test")
        return make_admin_service(self.config, open_directory(self.config, reactor), self.spool,
                                  *self.stores, tls_options=options, reactor=reactor)

    @defer.inlineCallbacks
    def test_https_with_the_relays_certificate(self):
        top = self.service(endpoint="tcp:0:interface=127.0.0.1", tls=True)
        top.startService()
        self.addCleanup(top.stopService)
        listening: defer.Deferred = defer.Deferred()
        # Pass the port on: stopService needs it from the same Deferred.
        top.getServiceNamed("admin")._waitingForPort.addCallback(
            lambda p: listening.callback(p) or p)
        port = yield listening
        with open(self.config.tls.certificate, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
        url = f"https://127.0.0.1:{port.getHost().port}/login"
        response = yield agent.request(b"GET", url.encode())
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"Log in", body)
        [cookie] = response.headers.getRawHeaders(b"set-cookie")
        self.assertIn(b"; Secure", cookie)
        names = {s.name for s in top}
        self.assertEqual(names, {"admin", "admin-dns-check"})

    def test_disabled(self):
        self.assertEqual(list(self.service(enabled=False)), [])
