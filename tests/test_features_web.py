"""The tracking listener over a real loopback socket, driven by a real HTTP client."""

from __future__ import annotations

import shutil
import tempfile
from io import BytesIO

from event_list import EventList
from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mailrelay.features.links import Links, Recipient
from mailrelay.features.stats import StatsRecorder, StatsStore
from mailrelay.features.suppressions import SuppressionStore
from mailrelay.features.tokens import TokenSigner
from mailrelay.features.web import GIF, TrackingRoot, make_site

R = Recipient("30193a2b4c5d6e7f8a9b", "acme", "news@acme.example", "alice@example.org")
ONE_CLICK = b"List-Unsubscribe=One-Click"


class TrackingWebTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="mailrelay-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.signer = TokenSigner.from_key_file(f"{directory}/token.key")
        self.suppressions = SuppressionStore(f"{directory}/suppressions.sqlite")
        self.stats_store = StatsStore(f"{directory}/stats.sqlite")
        self.stats = StatsRecorder(self.stats_store, reactor)
        self.addCleanup(self.suppressions.close)
        self.addCleanup(self.stats_store.close)
        self.events = EventList()
        root = TrackingRoot(self.signer, self.suppressions, self.stats, reactor,
                            events=self.events)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = yield endpoint.listen(make_site(root))
        self.addCleanup(self.port.stopListening)
        self.links = Links(self.signer, f"http://127.0.0.1:{self.port.getHost().port}")
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def request(self, method: bytes, url: str, body: bytes | None = None, ctype=None):
        headers = Headers({b"content-type": [ctype]}) if ctype else None
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = yield self.agent.request(method, url.encode(), headers, producer)
        content = yield readBody(response)
        return response, content

    @defer.inlineCallbacks
    def totals(self):
        yield self.stats.flush()
        return self.stats_store.query("acme", "news@acme.example")

    @defer.inlineCallbacks
    def test_open_pixel(self):
        response, body = yield self.request(b"GET", self.links.open_url(R))
        self.assertEqual((response.code, body), (200, GIF))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"image/gif"])
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        totals = yield self.totals()
        self.assertEqual(totals["opens"], 1)
        (row,) = self.stats_store.tracked("acme", R.queue_id)
        self.assertEqual(row.recipient, "alice@example.org")

    @defer.inlineCallbacks
    def test_click_redirects_to_the_signed_target_only(self):
        target = "https://shop.example/sale?a=1&b=%C3%A9"
        response, _ = yield self.request(b"GET", self.links.click_url(R, target))
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [target.encode()])
        # The target cannot be swapped: any change to the token breaks its signature.
        url = self.links.click_url(R, target)
        for forged in (
            url.replace("/c/", "/c/x"),
            url[:-2] + ("AA" if not url.endswith("AA") else "BB"),
            url + "?next=https://evil.example/",
        ):
            response, _ = yield self.request(b"GET", forged)
            if forged.endswith("evil.example/"):  # query strings are ignored, not followed
                self.assertEqual(response.headers.getRawHeaders(b"location"), [target.encode()])
            else:
                self.assertEqual(response.code, 404)
        response, _ = yield self.request(b"GET", self.links.click_url(R, "https://shop.example/é"))
        self.assertEqual(
            response.headers.getRawHeaders(b"location"), [b"https://shop.example/%C3%A9"]
        )
        totals = yield self.totals()
        self.assertEqual(totals["clicks"], 3)
        self.assertEqual(
            [r.url for r in self.stats_store.tracked("acme")],
            [target, target, "https://shop.example/é"],
        )

    @defer.inlineCallbacks
    def test_forged_and_wrong_kind_tokens_refused(self):
        other = TokenSigner(b"x" * 32)
        forged = Links(other, self.links.base_url)
        base = self.links.base_url
        open_token = self.links.open_url(R).rsplit("/", 1)[1]
        for url in (
            forged.open_url(R),
            forged.click_url(R, "https://evil.example/"),
            forged.unsubscribe_url(R),
            f"{base}/c/{open_token}",  # a valid token of another kind
            f"{base}/u/{open_token}",
            f"{base}/o/",
            f"{base}/o/a/b",
            f"{base}/",
            f"{base}/nothing",
        ):
            response, body = yield self.request(b"GET", url)
            self.assertEqual(response.code, 404, url)
            self.assertNotIn(b"evil", body)
        response, _ = yield self.request(
            b"POST", forged.unsubscribe_url(R), ONE_CLICK, b"application/x-www-form-urlencoded"
        )
        self.assertEqual(response.code, 404)
        totals = yield self.totals()
        self.assertEqual((totals["opens"], totals["clicks"], totals["unsubscribes"]), (0, 0, 0))
        self.assertEqual(self.suppressions.list("acme"), [])

    @defer.inlineCallbacks
    def test_unsubscribe_get_shows_a_form_and_does_not_unsubscribe(self):
        response, body = yield self.request(b"GET", self.links.unsubscribe_url(R))
        self.assertEqual(response.code, 200)
        self.assertIn(b'<form method="post"', body)
        self.assertIn(b'name="List-Unsubscribe" value="One-Click"', body)
        self.assertIn(b"alice@example.org", body)
        self.assertFalse(self.suppressions.contains("alice@example.org", "acme", R.user))

    @defer.inlineCallbacks
    def test_one_click_post_suppresses(self):
        url = self.links.unsubscribe_url(R)
        response, _ = yield self.request(b"POST", url, b"", b"application/x-www-form-urlencoded")
        self.assertEqual(response.code, 400)  # RFC 8058: the body must say One-Click
        response, body = yield self.request(
            b"POST", url, ONE_CLICK, b"application/x-www-form-urlencoded"
        )
        self.assertEqual(response.code, 200)
        self.assertIn(b"no more", body)
        (entry,) = self.suppressions.list("acme", R.user)
        self.assertEqual((entry.address, entry.reason), ("alice@example.org", "unsubscribe"))
        self.assertEqual(self.suppressions.suppressed("acme", "other-user", [R.recipient]), set())
        # multipart/form-data, as some mailbox providers send it; already suppressed now.
        form = (
            b'--xx\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
            b"One-Click\r\n--xx--\r\n"
        )
        response, _ = yield self.request(b"POST", url, form, b"multipart/form-data; boundary=xx")
        self.assertEqual(response.code, 200)
        totals = yield self.totals()
        self.assertEqual(totals["unsubscribes"], 1)

    @defer.inlineCallbacks
    def test_opens_clicks_and_unsubscribes_are_reported(self):
        target = "https://shop.example/sale"
        for method, url, body in ((b"GET", self.links.open_url(R), None),
                                  (b"GET", self.links.click_url(R, target), None),
                                  (b"GET", self.links.unsubscribe_url(R), None),  # the form
                                  (b"POST", self.links.unsubscribe_url(R), ONE_CLICK),
                                  (b"POST", self.links.unsubscribe_url(R), ONE_CLICK),
                                  (b"GET", self.links.open_url(R) + "x", None)):  # forged
            yield self.request(method, url, body, b"application/x-www-form-urlencoded")
        about = {"queue_id": R.queue_id, "recipient": "alice@example.org"}
        self.assertEqual(self.events, [
            ("message.opened", "acme", "news@acme.example", about),
            ("message.clicked", "acme", "news@acme.example", {**about, "url": target}),
            # Once: the second POST finds the recipient unsubscribed already.
            ("message.unsubscribed", "acme", "news@acme.example", about),
        ])

    @defer.inlineCallbacks
    def test_access_log_hides_tokens(self):
        site = make_site(TrackingRoot(self.signer, self.suppressions, self.stats, reactor))
        lines = []
        formatter = site._logFormatter
        site._logFormatter = lambda ts, request: lines.append(formatter(ts, request)) or ""
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        token = self.links.open_url(R).rsplit("/", 1)[1]
        yield self.request(b"GET", f"http://127.0.0.1:{port.getHost().port}/o/{token}")
        self.assertEqual(len(lines), 1)
        self.assertIn('"GET /o/- HTTP/1.1" 200', lines[0])
        self.assertNotIn(token, lines[0])
