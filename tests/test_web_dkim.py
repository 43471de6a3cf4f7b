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
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay.dkim import read_index
from mailrelay.manage.dkimcheck import DkimChecker
from mailrelay.web.templates import when


class ApiCalls(unittest.TestCase):
    """A panel (with ``extra`` configuration) and its API, each answer checked against the
    OpenAPI document."""

    extra = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="mailrelay-web-dkim-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.panel = yield Panel.start(self.tmp, self.extra)
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


class DkimApiTests(ApiCalls):
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


    @defer.inlineCallbacks
    def test_a_second_key_waits_for_its_record_then_activate_and_retire(self):
        _, _, first = yield self.api("POST", "/dkim", {"domain": "doe.test", "selector": "s1"},
                                     expect=201)  # fmt: skip
        _, _, second = yield self.api("POST", "/dkim", {"domain": "doe.test",
                                                        "selector": "s2"}, expect=201)
        self.assertEqual((first["state"], second["state"]), ("active", "pending"))
        yield self.api("POST", "/dkim/doe.test/s2/activate", key="ro", expect=403)
        _, _, body = yield self.api("POST", "/dkim/doe.test/s2/activate", expect=409)
        self.assertIn("s2._domainkey.doe.test is missing in DNS", body["error"])
        yield self.api("POST", "/dkim/doe.test/s1/activate", expect=404)  # not pending
        self.panel.dns.zone["s2._domainkey.doe.test"] = [f"TXT {second['dns_value']}"]
        _, _, switched = yield self.api("POST", "/dkim/doe.test/s2/activate", expect=200)
        self.assertEqual((switched["active"]["selector"], switched["active"]["state"]),
                         ("s2", "active"))
        self.assertEqual([(k["selector"], k["state"]) for k in switched["retiring"]],
                         [("s1", "retiring")])
        _, _, listed = yield self.api("GET", "/dkim", expect=200)
        keys = {k["selector"]: k for k in listed}
        self.assertEqual(keys["s2"]["dns_status"], "ok")  # what activate saw, kept
        self.assertEqual(keys["s1"]["withdraw_after"],
                         keys["s1"]["changed"] + 7 * 86400)  # [dkim] retire_after
        self.assertNotIn("withdraw_after", keys["s2"])
        _, _, body = yield self.api("POST", "/dkim/doe.test/s2/retire", expect=409)
        self.assertIn("is active, not retiring", body["error"])
        _, _, gone = yield self.api("POST", "/dkim/doe.test/s1/retire", expect=200)
        self.assertEqual(gone["selector"], "s1")
        _, _, listed = yield self.api("GET", "/dkim", expect=200)
        self.assertEqual([k["selector"] for k in listed], ["s2"])

    @defer.inlineCallbacks
    def test_domain_check_is_the_document_of_the_command(self):
        _, _, key = yield self.api("POST", "/dkim", {"domain": "doe.test", "selector": "s1"},
                                   expect=201)  # fmt: skip
        self.panel.dns.zone.update({
            "doe.test": ["TXT v=spf1 ip4:192.0.2.0/24 -all"],
            "s1._domainkey.doe.test": [f"TXT {key['dns_value']}"],
        })  # fmt: skip
        _, _, domains = yield self.api("GET", "/domains", key="ro", expect=200)
        self.assertIn("doe.test", domains)
        self.assertIn("acme.test", domains)  # an authorized domain without keys
        _, _, report = yield self.api("GET", "/domains/Doe.Test/check", key="ro", expect=200)
        self.assertEqual(report["domain"], "doe.test")
        self.assertEqual(report["dkim"][0]["status"], "ok")
        self.assertEqual(report["dmarc"]["status"], "missing")
        self.assertEqual(report["dmarc"]["publish"]["value"], "v=DMARC1; p=none")
        self.assertFalse(report["ok"])
        proc = yield threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "mailrelay.admin.cli", "-c",
                             os.path.join(self.tmp, "mailrelay.ini"), "domain", "check",
                             "doe.test", "--json"],
            env=env(), capture_output=True, timeout=60)  # fmt: skip
        self.assertEqual(report, json.loads(proc.stdout))
        yield self.api("GET", "/domains/nobody.test/check", expect=404)
        yield self.api("GET", "/domains/not_a_domain/check", expect=400)


class RelayDomainApiTests(ApiCalls):
    """With ``[dkim] relay_domain``, a key for it belongs to no account."""

    extra = "\n[dkim]\nrelay_domain = relay.test\n"

    @defer.inlineCallbacks
    def test_a_key_of_the_relay_domain(self):
        _, _, made = yield self.api("POST", "/dkim", {"domain": "relay.test"}, expect=201)
        self.assertEqual((made["account"], made["state"]), (None, "active"))
        _, _, domains = yield self.api("GET", "/domains", expect=200)
        self.assertIn("relay.test", domains)
        _, _, report = yield self.api("GET", "/domains/relay.test/check", expect=200)
        self.assertEqual([c["selector"] for c in report["dkim"]], [made["selector"]])
        yield self.api("POST", "/dkim", {"domain": "elsewhere.test"}, expect=400)


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

    @defer.inlineCallbacks
    def test_key_states_the_relays_check_and_the_activate_and_retire_buttons(self):
        yield self.web.request("GET", "/dkim")
        for selector in ("s1", "s2"):
            code, _ = yield self.web.request("POST", "/dkim", {"domain": "shop.test",
                                                               "selector": selector,
                                                               "type": "rsa", "bits": "2048"})
            self.assertEqual(code, 303)
        code, body = yield self.web.request("GET", "/dkim")
        self.assertIn(b'class="status status-pending"', body)
        self.assertIn(b'action="/dkim/shop.test/s2/activate"', body)
        self.assertNotIn(b'action="/dkim/shop.test/s1/activate"', body)  # active already
        self.assertIn(b'status-missing', body)  # looked up now: neither is published
        code, body = yield self.web.request("POST", "/dkim/shop.test/s2/activate", {})
        self.assertEqual(code, 409)
        self.assertIn(b"s2._domainkey.shop.test is missing in DNS", body)

        # The relay's scheduled check: s2 published, so the relay activates it itself.
        _, _, shown = yield self.panel.call("GET", "/api/v1/dkim/shop.test")
        s2 = next(k for k in shown if k["selector"] == "s2")
        self.panel.dns.zone["s2._domainkey.shop.test"] = [f"TXT {s2['dns_value']}"]
        checker = DkimChecker(self.panel.services.dkim, self.panel.services.resolver, 3600,
                              7 * 86400, reactor)  # fmt: skip
        yield defer.ensureDeferred(checker.check())
        code, body = yield self.web.request("GET", "/dkim")
        self.assertIn(b'class="status status-retiring"', body)
        self.assertIn(b'class="status status-active"', body)
        self.assertNotIn(b"/activate", body)
        self.assertIn(b'action="/dkim/shop.test/s1/retire"', body)
        self.assertIn(b"withdraw its record from", body)
        listed = {k.selector: k for k in read_index(self.panel.config.dkim.directory)[0]}
        self.assertEqual((listed["s1"].dns_status, listed["s2"].dns_status), ("missing", "ok"))
        self.assertIn(b'<span class="status status-ok">ok</span> ' +
                      when(listed["s2"].dns_checked).encode(), body)

        code, _, _ = yield self.panel.request(
            "POST", "/dkim/shop.test/s1/retire", b"csrf=wrong",
            {"cookie": self.web.cookie, "content-type": "application/x-www-form-urlencoded"})
        self.assertEqual(code, 403)
        code, _ = yield self.web.request("POST", "/dkim/shop.test/s2/retire", {})
        self.assertEqual(code, 409)  # active, not retiring
        code, _ = yield self.web.request("POST", "/dkim/shop.test/s1/retire", {})
        self.assertEqual(code, 303)
        code, body = yield self.web.request("GET", "/dkim")
        self.assertIn(b"Deleted retiring DKIM key s1 of shop.test", body)
        self.assertNotIn(b"/dkim/shop.test/s1/", body)

    @defer.inlineCallbacks
    def test_the_domain_page_shows_each_check_and_the_record_to_publish(self):
        yield self.web.request("GET", "/dkim")
        code, _ = yield self.web.request("POST", "/dkim", {"domain": "shop.test",
                                                           "selector": "s1", "type": "rsa",
                                                           "bits": "2048"})  # fmt: skip
        self.assertEqual(code, 303)
        self.panel.dns.zone["_dmarc.shop.test"] = ["TXT v=DMARC1; p=reject"]
        code, body = yield self.web.request("GET", "/domains")
        self.assertEqual(code, 200)
        self.assertIn(b'href="/domains/shop.test"', body)
        code, body = yield self.web.request("GET", "/dkim/shop.test")
        self.assertIn(b'href="/domains/shop.test"', body)
        code, body = yield self.web.request("GET", "/domains/shop.test")
        self.assertEqual(code, 200)
        _, _, report = yield self.panel.call("GET", "/api/v1/domains/shop.test/check")
        self.assertEqual([c["status"] for c in (report["spf"], *report["dkim"],
                                                report["dmarc"])],
                         ["missing", "missing", "ok"])  # fmt: skip
        self.assertIn(b'<span class="status status-missing">missing</span>', body)
        self.assertIn(b'<span class="status status-ok">ok</span>', body)
        self.assertIn(b"v=DMARC1; p=reject", body)  # the record found
        dkim_line = (f"s1._domainkey.shop.test. IN TXT ( "
                     f"\"{report['dkim'][0]['publish']['value'][:200]}").encode()
        self.assertIn(dkim_line, body)  # the record to publish, as a zone file line
        self.assertIn(b'shop.test. IN TXT ( "v=spf1 ip4:ADDRESS ~all" )', body)
        code, _ = yield self.web.request("GET", "/domains/nobody.test")
        self.assertEqual(code, 404)
