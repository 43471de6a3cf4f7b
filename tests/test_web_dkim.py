"""DKIM keys in the management API and on the web admin page, over a real loopback
listener: the same documents as ``mailrelay-admin dkim list|show --json``, the TXT records
to publish, refusals with the status that fits, and never a private key in an answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from harness import env
from panel import Panel
from test_web_api import check_response
from test_web_pages import LoggedIn
from twisted.internet import defer, threads
from twisted.trial import unittest

from mailrelay.dkim import read_index


class DkimApiTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="mailrelay-web-dkim-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.panel = yield Panel.start(self.tmp)
        self.addCleanup(self.panel.stop)
        self.bodies: list[bytes] = []

    @defer.inlineCallbacks
    def api(self, method, path, doc=None, key="rw", expect=None):
        code, headers, body = yield self.panel.call(method, "/api/v1" + path, doc, key)
        self.bodies.append(json.dumps(body).encode())
        check_response(method, "/api/v1" + path, code, body)
        if expect is not None:
            self.assertEqual(code, expect, f"{method} {path}: {body}")
        return code, headers, body

    def admin_json(self, *args: str):
        """What mailrelay-admin prints for ``args`` (--json), run as its own process."""
        out = subprocess.run(
            [sys.executable, "-m", "mailrelay.admin.cli", "-c",
             os.path.join(self.tmp, "mailrelay.ini"), *args, "--json"],
            env=env(), capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        return json.loads(out.stdout)

    @defer.inlineCallbacks
    def test_keys_made_listed_shown_and_deleted(self):
        _, _, empty = yield self.api("GET", "/dkim", expect=200)
        self.assertEqual(empty, [])
        _, headers, made = yield self.api("POST", "/dkim", {"domain": "Doe.Test",
                                                            "selector": "s1"}, expect=201)
        self.assertEqual((made["domain"], made["selector"], made["type"], made["account"]),
                         ("doe.test", "s1", "rsa", "default"))
        self.assertEqual(made["dns_name"], "s1._domainkey.doe.test")
        self.assertTrue(made["dns_value"].startswith("v=DKIM1; k=rsa; p="))
        self.assertEqual(headers.getRawHeaders(b"location"), [b"/api/v1/dkim/doe.test"])
        self.panel.dns.zone["s1._domainkey.doe.test"] = [f"TXT {made['dns_value']}"]
        yield self.api("POST", "/dkim", {"domain": "doe.test", "selector": "e1",
                                         "type": "ed25519"}, expect=201)  # fmt: skip
        yield self.api("POST", "/dkim", {"domain": "acme.test", "type": "ed25519"},
                       expect=201)  # the default selector

        _, _, listed = yield self.api("GET", "/dkim", key="ro", expect=200)
        _, _, shown = yield self.api("GET", "/dkim/doe.test", key="ro", expect=200)
        self.assertEqual([(k["domain"], k["selector"], k["account"]) for k in listed][1:],
                         [("doe.test", "e1", "default"), ("doe.test", "s1", "default")])
        self.assertEqual(listed[0]["account"], "acme")
        self.assertEqual([k["selector"] for k in shown], ["e1", "s1"])
        self.assertEqual(shown[1]["dns_value"], made["dns_value"])
        self.assertTrue(shown[0]["dns_value"].startswith("v=DKIM1; k=ed25519; p="))
        self.assertEqual([k["published"] for k in shown], ["missing", "ok"])
        # The same documents as mailrelay-admin prints.
        cli_list = yield threads.deferToThread(self.admin_json, "dkim", "list")
        cli_show = yield threads.deferToThread(self.admin_json, "dkim", "show", "doe.test")
        self.assertEqual((listed, shown), (cli_list, cli_show))

        yield self.api("DELETE", "/dkim/doe.test/s1", key="ro", expect=403)
        yield self.api("DELETE", "/dkim/doe.test/s1", expect=204)
        yield self.api("DELETE", "/dkim/doe.test/s1", expect=404)
        keys, _ = read_index(self.panel.config.dkim.directory)
        self.assertEqual([(k.domain, k.selector) for k in keys],
                         [(listed[0]["domain"], listed[0]["selector"]), ("doe.test", "e1")])
        self.assertFalse(os.path.exists(os.path.join(self.panel.config.dkim.directory,
                                                     "doe.test.s1.pem")))
        for body in self.bodies:
            self.assertNotIn(b"PRIVATE KEY", body)

    @defer.inlineCallbacks
    def test_refusals_change_nothing(self):
        yield self.api("POST", "/dkim", {"domain": "doe.test"}, key="ro", expect=403)
        for doc, code in (
            ({}, 400), ({"domain": "nobody.test"}, 400), ({"domain": "not a domain"}, 400),
            ({"domain": "doe.test", "type": "dsa"}, 400),
            ({"domain": "doe.test", "bits": 512}, 400),
            ({"domain": "doe.test", "bits": "2048"}, 400),
            ({"domain": "doe.test", "selector": "a_b"}, 400),
            ({"domain": "doe.test", "colour": "red"}, 400),
        ):  # fmt: skip
            _, _, body = yield self.api("POST", "/dkim", doc, expect=code)
            self.assertIn("error", body)
        _, _, listed = yield self.api("GET", "/dkim", expect=200)
        self.assertEqual(listed, [])
        yield self.api("GET", "/dkim/doe.test", expect=404)
        yield self.api("GET", "/dkim/not_a_domain", expect=400)
        yield self.api("DELETE", "/dkim/doe.test/s1", expect=404)
        yield self.api("POST", "/dkim", {"domain": "doe.test", "selector": "s1",
                                         "type": "ed25519"}, expect=201)  # fmt: skip
        _, _, body = yield self.api("POST", "/dkim", {"domain": "doe.test", "selector": "s1"},
                                    expect=409)  # fmt: skip
        self.assertIn("already has a key", body["error"])


class DkimPageTests(LoggedIn):
    @defer.inlineCallbacks
    def test_add_show_and_delete_a_key_on_the_page(self):
        code, body = yield self.web.request("GET", "/dkim")
        self.assertEqual(code, 200)
        self.assertIn(b'href="/dkim"', body)  # in the navigation
        self.assertIn(b"No DKIM keys", body)
        code, body = yield self.web.request("POST", "/dkim", {"domain": "nobody.test",
                                                              "type": "rsa", "bits": "2048"})
        self.assertEqual(code, 400)
        self.assertIn(b"not an authorized domain", body)
        code, _ = yield self.web.request("POST", "/dkim", {"domain": "shop.test",
                                                           "selector": "s1", "type": "rsa",
                                                           "bits": "2048"})  # fmt: skip
        self.assertEqual(code, 303)
        code, body = yield self.web.request("GET", "/dkim")
        self.assertIn(b'href="/dkim/shop.test"', body)
        self.assertIn(b"DKIM key s1 made for shop.test", body)
        code, body = yield self.web.request("GET", "/dkim/shop.test")
        self.assertEqual(code, 200)
        _, _, shown = yield self.panel.call("GET", "/api/v1/dkim/shop.test")
        self.assertIn(b"s1._domainkey.shop.test", body)
        self.assertIn(shown[0]["dns_strings"][0].encode(), body)
        self.assertNotIn(b"PRIVATE KEY", body)
        # Without the page's CSRF token the delete is refused.
        code, _, _ = yield self.panel.request(
            "POST", "/dkim/shop.test/s1/delete", b"csrf=wrong",
            {"cookie": self.web.cookie, "content-type": "application/x-www-form-urlencoded"})
        self.assertEqual(code, 403)
        code, _ = yield self.web.request("POST", "/dkim/shop.test/s1/delete", {})
        self.assertEqual(code, 303)
        code, body = yield self.web.request("GET", "/dkim")
        self.assertIn(b"Deleted DKIM key s1 of shop.test", body)
        self.assertIn(b"No DKIM keys", body)
