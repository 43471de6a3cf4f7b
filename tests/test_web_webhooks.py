"""Webhook endpoints and failed events through the management API and the panel page,
over real HTTP on loopback; every API answer is checked against the OpenAPI document."""

from __future__ import annotations

import shutil
import tempfile

import test_web_pages
from panel import Panel
from standardwebhooks.webhooks import Webhook
from test_web_api import check_response
from test_web_pages import Seen
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay.events import EventKind
from mailrelay.webhooks.sink import WebhookSink
from mailrelay.webhooks.store import FAILED

URL = "https://hooks.example.com/mail"


def failed_event(services, account: str = "acme") -> int:
    """One event of ``account`` failed for good at its endpoints; the last row's id."""
    store = services.webhooks.store
    sink = WebhookSink(store, reactor)
    sink.emit(EventKind.BOUNCED, account, "news@acme.test", {"bounce": "hard"})
    sink._write(sink._take())
    rows = store.due(1e12, 100)
    for delivery, _ in rows:
        store.attempted(delivery.id, FAILED, 1.0, 400, "HTTP 400: no")
    return rows[-1][0].id


class WebhookApiTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        tmp = tempfile.mkdtemp(prefix="mailrelay-web-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.panel = yield Panel.start(tmp)
        self.addCleanup(self.panel.stop)

    @defer.inlineCallbacks
    def api(self, method, path, doc=None, key="rw", expect=None):
        code, headers, body = yield self.panel.call(method, "/api/v1" + path, doc, key)
        check_response(method, "/api/v1" + path, code, body)
        self.assertEqual(code, expect, f"{method} {path}: {body}")
        return code, headers, body

    @defer.inlineCallbacks
    def test_endpoints_added_listed_rotated_and_deleted(self):
        _, headers, doc = yield self.api("POST", "/webhooks", {
            "account": "acme", "url": URL, "events": ["message.bounced"],
            "users": ["news@acme.test"]}, expect=201)  # fmt: skip
        secret = doc["secrets"][0]
        assert Webhook(secret)  # a secret the standard's library takes
        assert headers.getRawHeaders(b"location") == [f"/api/v1/webhooks/{doc['id']}".encode()]
        _, _, listed = yield self.api("GET", "/webhooks?account=acme", expect=200)
        assert [(e["url"], e["events"], e["users"]) for e in listed] == [
            (URL, ["message.bounced"], ["news@acme.test"])]
        assert "secrets" not in listed[0]
        _, _, listed = yield self.api("GET", "/webhooks?account=default", expect=200)
        assert listed == []
        _, _, rotated = yield self.api("POST", f"/webhooks/{doc['id']}/rotate-secret",
                                       expect=200)
        assert rotated["secrets"][1:] == [secret] and rotated["secrets"][0] != secret
        yield self.api("DELETE", f"/webhooks/{doc['id']}", expect=204)
        yield self.api("GET", f"/webhooks/{doc['id']}", expect=404)
        yield self.api("POST", "/webhooks", {"account": "acme", "url": URL}, key="ro",
                       expect=403)

    @defer.inlineCallbacks
    def test_bad_endpoints_refused(self):
        for doc, code in [({"account": "acme", "url": "ftp://x.example/"}, 400),
                          ({"account": "acme", "url": "http://127.0.0.1:8080/"}, 400),
                          ({"account": "acme", "url": "http://[::1]/"}, 400),
                          ({"account": "acme", "url": URL, "events": ["mail.sent"]}, 400),
                          ({"account": "nobody", "url": URL}, 404),
                          ({"url": URL}, 400)]:
            _, _, body = yield self.api("POST", "/webhooks", doc, expect=code)
            if "127.0.0.1" in doc["url"]:
                assert "private or local address" in body["error"]
        _, _, listed = yield self.api("GET", "/webhooks", expect=200)
        assert listed == []

    @defer.inlineCallbacks
    def test_failed_events_listed_per_account_and_retried(self):
        _, _, endpoint = yield self.api("POST", "/webhooks", {"account": "acme", "url": URL},
                                        expect=201)
        event = failed_event(self.panel.services)
        _, _, failed = yield self.api("GET", "/webhooks/failed?account=acme", expect=200)
        assert [(f["id"], f["type"], f["last_status"]) for f in failed] == [
            (event, "message.bounced", 400)]
        assert failed[0]["payload"]["data"]["bounce"] == "hard"
        _, _, other = yield self.api("GET", "/webhooks/failed?account=default", expect=200)
        assert other == []
        store = self.panel.services.webhooks.store
        store.set_enabled(endpoint["id"], "acme", False, "answered 410 Gone")
        yield self.api("POST", f"/webhooks/failed/{event}/retry", expect=409)
        _, _, doc = yield self.api("POST", f"/webhooks/{endpoint['id']}/enable", expect=200)
        assert doc["enabled"]
        yield self.api("POST", f"/webhooks/failed/{event}/retry", expect=202)
        _, _, failed = yield self.api("GET", "/webhooks/failed", expect=200)
        assert failed == []
        assert [d.id for d, _ in store.due(1e12, 10)] == [event]
        yield self.api("POST", f"/webhooks/failed/{event}/retry", expect=404)


class WebhookPageTests(test_web_pages.LoggedIn):
    @defer.inlineCallbacks
    def test_add_an_endpoint_and_retry_a_failed_event_on_the_page(self):
        yield self.web.request("GET", "/webhooks")
        code, body = yield self.web.request("POST", "/webhooks", {
            "account": "acme", "url": URL, "users": "", "events": "message.bounced"})
        self.assertEqual(code, 303, body)
        code, body = yield self.web.request("GET", "/webhooks")
        text = Seen(body).text()
        assert URL in text and "whsec_" in text and "message.bounced" in text
        code, body = yield self.web.request("POST", "/webhooks", {
            "account": "acme", "url": "http://10.0.0.1/", "users": "", "events": ""})
        self.assertEqual(code, 400)
        assert "private or local address" in Seen(body).text()
        event = failed_event(self.panel.services)
        code, body = yield self.web.request("GET", "/webhooks")
        assert "HTTP 400: no" in Seen(body).text()
        code, body = yield self.web.request("POST", "/webhooks/retry", {"id": str(event)})
        self.assertEqual(code, 303, body)
        code, body = yield self.web.request("GET", "/webhooks")
        assert "No failed events." in Seen(body).text()
