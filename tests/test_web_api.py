"""The management API over a real loopback listener, with a real HTTP client: every
documented operation, each response checked against the OpenAPI document, auth failures,
bad input (which changes nothing), the LDAP directory read-only."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from panel import Panel
from twisted.internet import defer
from twisted.trial import unittest

from mailrelay.model import Envelope
from mailrelay.web.openapi import openapi_document

DOC = openapi_document()


def _operations() -> dict[tuple[str, str], re.Pattern]:
    out = {}
    for template, item in DOC["paths"].items():
        regex = re.compile("^/api/v1" + re.sub(r"\{\w+\}", "[^/]+", template) + "$")
        for method in item:
            if method != "parameters":
                out[(method.upper(), template)] = regex
    return out


OPERATIONS = _operations()


def check_response(method: str, path: str, code: int, body) -> tuple[str, str]:
    """Validate ``body`` against the documented response; returns the operation."""
    bare = path.split("?")[0]
    matches = [op for op, regex in OPERATIONS.items() if op[0] == method and regex.match(bare)]
    # A literal path ("/users/new" is not one here) wins over a template.
    assert matches, f"{method} {bare} is not documented"
    op = min(matches, key=lambda o: o[1].count("{"))
    responses = DOC["paths"][op[1]][method.lower()]["responses"]
    spec = responses.get(str(code)) or responses["default"]
    if "$ref" in spec:
        spec = DOC["components"]["responses"][spec["$ref"].rpartition("/")[2]]
    content = spec.get("content", {}).get("application/json")
    if content is None:
        assert body is None, f"{method} {path} {code}: no body documented"
    elif op[1] != "/openapi.json":
        schema = {**content["schema"], "components": DOC["components"]}
        OAS30Validator(schema).validate(body)
    return op


class ApiTests(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="mailrelay-web-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.panel = yield Panel.start(self.tmp)
        self.addCleanup(self.panel.stop)
        self.exercised: set = set()

    @defer.inlineCallbacks
    def api(self, method, path, doc=None, key="rw", expect=None, **kw):
        code, headers, body = yield self.panel.call(method, "/api/v1" + path, doc, key, **kw)
        self.exercised.add(check_response(method, "/api/v1" + path, code, body))
        if expect is not None:
            self.assertEqual(code, expect, f"{method} {path}: {body}")
        return code, headers, body

    @defer.inlineCallbacks
    def authenticates(self, username, password):
        from twisted.cred.error import UnauthorizedLogin

        try:
            yield self.panel.directory.authenticate(username, password)
        except UnauthorizedLogin:
            return False
        return True

    def user_file(self) -> bytes:
        with open(self.panel.config.directory.file, "rb") as f:
            return f.read()

    # ---- the document and authentication

    @defer.inlineCallbacks
    def test_openapi_document_is_valid_and_public(self):
        code, headers, body = yield self.api("GET", "/openapi.json", key=None, expect=200)
        validate_spec(body)
        self.assertEqual(body, DOC)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])

    @defer.inlineCallbacks
    def test_authentication(self):
        code, headers, body = yield self.api("GET", "/users", key=None, expect=401)
        self.assertIn("Bearer", body["error"])
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="mailrelay"'])
        yield self.api("GET", "/users", key="mrk_not-a-key", expect=401)
        yield self.api("GET", "/users", headers={"authorization": "Basic eDp5"}, key=None,
                       expect=401)  # fmt: skip
        yield self.api("GET", "/users", key="ro", expect=200)
        before = self.user_file()
        code, _, body = yield self.api("POST", "/users", {"username": "x.test"}, key="ro",
                                       expect=403)  # fmt: skip
        self.assertIn("read-only", body["error"])
        yield self.api("DELETE", "/users/webapp", key="ro", expect=403)
        yield self.api("POST", "/suppressions", {"address": "a@b.test"}, key="ro", expect=403)
        self.assertEqual(self.user_file(), before)

    @defer.inlineCallbacks
    def test_revoked_key_is_refused(self):
        from mailrelay.manage.access import AccessStore, access_path

        store = AccessStore(access_path(self.panel.config))
        with store.change():
            store.delete_key("automation")
        self.panel.services.access._checked = -1e9  # re-read now, not within the second
        yield self.api("GET", "/users", expect=401)

    @defer.inlineCallbacks
    def test_unknown_path_and_method(self):
        code, _, body = yield self.panel.call("GET", "/api/v1/nothing")
        self.assertEqual((code, body["status"]), (404, 404))
        code, headers, body = yield self.panel.call("PUT", "/api/v1/users")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, POST"])

    @defer.inlineCallbacks
    def test_oversized_body_is_refused(self):
        before = self.user_file()
        code, _, body = yield self.panel.request("POST", "/api/v1/users", b"{" + b" " * (2 << 20)
                                                 + b"}", {
            "authorization": f"Bearer {self.panel.rw_key}", "content-type": "application/json"})
        self.assertEqual(code, 413, body)
        self.assertEqual(self.user_file(), before)

    @defer.inlineCallbacks
    def test_pages_send_security_headers(self):
        code, headers, _ = yield self.panel.request("GET", "/login")
        self.assertEqual(code, 200)
        [csp] = headers.getRawHeaders(b"content-security-policy")
        self.assertTrue(csp.startswith(b"default-src 'none';"))  # no script may run
        self.assertEqual(headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
        [cookie] = headers.getRawHeaders(b"set-cookie")
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"SameSite=Strict", cookie)
        code, headers, _ = yield self.panel.request("GET", "/users")
        self.assertEqual((code, headers.getRawHeaders(b"location")), (303, [b"/login"]))

    # ---- users

    @defer.inlineCallbacks
    def test_user_lifecycle(self):
        _, _, users = yield self.api("GET", "/users", expect=200)
        self.assertEqual([u["username"] for u in users], ["doe.test", "news@acme.test", "webapp"])
        _, _, users = yield self.api("GET", "/users?account=acme", expect=200)
        self.assertEqual([u["username"] for u in users], ["news@acme.test"])
        yield self.api("GET", "/users?account=nope", expect=404)

        code, headers, created = yield self.api("POST", "/users", {
            "username": "App2", "domains": "other.test", "note": "<b>newsletter</b>",
            "rate_limit": 500, "priority": 2, "open_tracking": True}, expect=201)  # fmt: skip
        user = created["user"]
        self.assertEqual((user["username"], user["kind"], user["rate_limit"]), ("App2", "named",
                                                                                  500))
        self.assertEqual(headers.getRawHeaders(b"location"), [b"/api/v1/users/App2"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertTrue((yield self.authenticates("App2", created["password"])))

        _, _, shown = yield self.api("GET", "/users/App2", expect=200)
        self.assertEqual(shown, user)
        self.assertNotIn("password", shown)
        self.assertNotIn(created["password"].encode(), self.user_file())

        _, _, changed = yield self.api("PATCH", "/users/App2", {"status": "sandboxed",
                                                                 "rate_limit": None})
        self.assertEqual((changed["user"]["status"], changed["user"]["rate_limit"]),
                         ("sandboxed", None))  # fmt: skip
        self.assertEqual(changed["user"]["note"], "<b>newsletter</b>")

        _, _, reset = yield self.api("POST", "/users/App2/password", expect=200)
        self.assertEqual(reset["username"], "App2")
        self.assertTrue((yield self.authenticates("App2", reset["password"])))
        self.assertFalse((yield self.authenticates("App2", created["password"])))

        yield self.api("DELETE", "/users/App2", expect=204)
        yield self.api("GET", "/users/App2", expect=404)
        yield self.api("DELETE", "/users/App2", expect=404)
        yield self.api("POST", "/users/App2/password", expect=404)
        yield self.api("PATCH", "/users/App2", {"note": "x"}, expect=404)

    @defer.inlineCallbacks
    def test_expiry_allow_list_and_last_login(self):
        from mailrelay.auth.lifecycle import LoginStore

        store = LoginStore(self.panel.config.directory.logins_db)  # as the relay writes it
        self.addCleanup(store.close)
        store.add({"doe.test": (1700000000.0, "127.0.0.2")})
        _, _, users = yield self.api("GET", "/users", expect=200)
        doe = next(u for u in users if u["username"] == "doe.test")
        self.assertEqual((doe["last_login"], doe["last_login_ip"]), (1700000000.0, "127.0.0.2"))
        self.assertIsNone(next(u for u in users if u["username"] == "webapp")["last_login"])
        _, _, changed = yield self.api("PATCH", "/users/doe.test", {
            "expires": "2027-01-31", "allow_from": "203.0.113.0/24;2001:DB8::/32"},
            expect=200)  # fmt: skip
        self.assertEqual((changed["user"]["expires"], changed["user"]["allow_from"]),
                         ("2027-02-01T00:00:00Z", "2001:db8::/32;203.0.113.0/24"))
        _, _, shown = yield self.api("GET", "/users/doe.test", expect=200)
        self.assertEqual(shown["last_login_ip"], "127.0.0.2")
        before = self.user_file()
        yield self.api("PATCH", "/users/doe.test", {"allow_from": "203.0.113.7/24"}, expect=400)
        yield self.api("PATCH", "/users/doe.test", {"expires": "soon"}, expect=400)
        self.assertEqual(self.user_file(), before)
        _, _, changed = yield self.api("PATCH", "/users/doe.test",
                                       {"expires": None, "allow_from": ""}, expect=200)
        self.assertEqual((changed["user"]["expires"], changed["user"]["allow_from"]), (None, ""))

    @defer.inlineCallbacks
    def test_domain_and_address_users(self):
        _, _, created = yield self.api("POST", "/users", {"username": "Shop.Test"}, expect=201)
        self.assertEqual((created["user"]["username"], created["user"]["kind"]),
                         ("shop.test", "domain"))  # fmt: skip
        code, _, body = yield self.api("POST", "/users", {"username": "shop.test"}, expect=409)
        self.assertIn("already exists", body["error"])
        _, _, created = yield self.api("POST", "/users", {"username": "bob@shop.test"},
                                       expect=201)  # fmt: skip
        self.assertEqual(created["user"]["sender_scope"], "bob@shop.test")

    @defer.inlineCallbacks
    def test_bad_input_changes_nothing(self):
        before = self.user_file()
        cases = [
            ({"username": "x", "domains": "a.test,b.test"}, "semicolons"),
            ({"username": "x", "domains": "far.test"}, "outside the domains"),
            ({"username": "x"}, "needs authorized domains"),
            ({"username": "x", "domains": "doe.test", "priority": "1"}, "whole number"),
            ({"username": "x", "domains": "doe.test", "priority": 7}, "outside 1..5"),
            ({"username": "x", "domains": "doe.test", "archive": "yes"}, "true or false"),
            ({"username": "x", "domains": "doe.test", "colour": "red"}, "unknown setting"),
            ({"username": "x", "domains": "doe.test", "status": "on"}, "not one of"),
            ({"username": "x", "domains": "doe.test", "account": "nope"}, "unknown account"),
            ({"username": "a b", "domains": "doe.test"}, "not a valid named username"),
            ({"domains": "doe.test"}, "username is required"),
        ]
        for doc, text in cases:
            code, _, body = yield self.api("POST", "/users", doc, expect=400)
            self.assertIn(text, body["error"], doc)
        for doc in ({"rate_limit": -1}, {"bounce_notify": "maybe"}, {"audit_bcc": "nobody"},
                    {}):  # fmt: skip
            yield self.api("PATCH", "/users/webapp", doc, expect=400)
        code, _, body = yield self.api("POST", "/users", None, expect=415,
                                       headers={"content-type": "text/plain"})  # fmt: skip
        code, _, body = yield self.panel.call("POST", "/api/v1/users", None,
                                              headers={"content-type": "application/json"})
        self.assertEqual(code, 400)
        for raw in (b"{not json", b"[1, 2]"):
            code, _, body = yield self.panel.request("POST", "/api/v1/users", raw, {
                "authorization": f"Bearer {self.panel.rw_key}",
                "content-type": "application/json"})  # fmt: skip
            self.assertEqual(code, 400, body)
        self.assertEqual(self.user_file(), before)

    @defer.inlineCallbacks
    def test_usernames_with_odd_characters_round_trip(self):
        _, _, body = yield self.api("POST", "/users", {"username": "app+1%é",
                                                       "domains": "doe.test"}, expect=201)
        _, _, shown = yield self.api("GET", "/users/app%2B1%25%C3%A9", expect=200)
        self.assertEqual(shown["username"], "app+1%é")

    # ---- senders

    @defer.inlineCallbacks
    def test_senders_listing(self):
        _, _, senders = yield self.api("GET", "/users/webapp/senders", expect=200)
        self.assertEqual(senders, [{"sender": "shop.test", "kind": "domain", "verified": True}])
        code, _, result = yield self.api("POST", "/users/webapp/senders/shop.test/verify",
                                         expect=200)  # fmt: skip
        self.assertEqual(result, {"sender": "shop.test", "verified": True})
        yield self.api("POST", "/users/webapp/senders/doe.test/verify", expect=404)
        yield self.api("GET", "/users/nobody/senders", expect=404)

    # ---- accounts

    @defer.inlineCallbacks
    def test_accounts(self):
        _, _, accounts = yield self.api("GET", "/accounts", expect=200)
        self.assertEqual([a["name"] for a in accounts], ["acme", "default"])
        _, headers, account = yield self.api("POST", "/accounts", {
            "name": "beta", "domains": "beta.test;b2.test", "notify": "ops@beta.test",
            "quota_month": 5000}, expect=201)  # fmt: skip
        self.assertEqual(account, {"name": "beta", "domains": "b2.test;beta.test",
                                   "notify": "ops@beta.test", "note": "", "users": [],
                                   "bounce_domain": None, "quota_day": None,
                                   "quota_month": 5000})
        yield self.api("POST", "/accounts", {"name": "beta"}, expect=409)
        yield self.api("POST", "/accounts", {"name": "bad name"}, expect=400)
        yield self.api("POST", "/accounts", {"name": "c", "domains": "x,y"}, expect=400)
        yield self.api("POST", "/accounts", {"name": "c", "colour": "x"}, expect=400)
        _, _, shown = yield self.api("GET", "/accounts/beta", expect=200)
        self.assertEqual(shown, account)
        _, _, changed = yield self.api("PATCH", "/accounts/beta", {"domains": "beta.test",
                                                                    "note": "n"}, expect=200)
        self.assertEqual((changed["domains"], changed["note"]), ("beta.test", "n"))
        code, _, body = yield self.api("PATCH", "/accounts/acme", {"domains": "other.test"},
                                       expect=409)  # fmt: skip
        self.assertIn("still used", body["error"])
        yield self.api("DELETE", "/accounts/acme", expect=409)
        yield self.api("DELETE", "/accounts/beta", expect=204)
        yield self.api("GET", "/accounts/beta", expect=404)
        yield self.api("PATCH", "/accounts/beta", {"note": "x"}, expect=404)

    @defer.inlineCallbacks
    def test_an_accounts_bounce_domain(self):
        _, _, account = yield self.api("POST", "/accounts", {
            "name": "beta", "domains": "beta.test", "bounce_domain": "Bounces.Beta.test"},
            expect=201)  # fmt: skip
        self.assertEqual(account["bounce_domain"], "bounces.beta.test")
        _, _, body = yield self.api("PATCH", "/accounts/acme",
                                    {"bounce_domain": "bounces.beta.test"}, expect=400)
        self.assertIn("not a subdomain", body["error"])
        _, _, changed = yield self.api("PATCH", "/accounts/beta", {"bounce_domain": None},
                                       expect=200)  # fmt: skip
        self.assertIsNone(changed["bounce_domain"])

    @defer.inlineCallbacks
    def test_ip_auth_is_read_from_the_configuration(self):
        _, _, doc = yield self.api("GET", "/ip-auth", expect=200)
        self.assertEqual(doc["networks"], [{"network": "127.0.0.2/32", "username": "app"},
                                           {"network": "2001:db8::/32", "username": "doe.test"}])
        self.assertEqual((doc["addresses"], doc["read_only"]), (["printer@doe.test"], True))
        code, _, _ = yield self.panel.call("POST", "/api/v1/ip-auth", {})
        self.assertEqual(code, 405)

    # ---- explain

    @defer.inlineCallbacks
    def test_explain(self):
        _, _, doc = yield self.api("POST", "/explain", {
            "username": "webapp", "sender": "a@shop.test", "from_header": "b@doe.test",
            "recipients": 2}, key="ro", expect=200)  # changes nothing: a read-only key may ask
        self.assertFalse(doc["accepted"])
        self.assertEqual([s["reply"] for s in doc["steps"]][1:], [
            "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
            "550 5.7.1 From: header address b@doe.test not allowed for user webapp"])
        self.assertEqual(doc["steps"][1]["rule"], "scope entry *@shop.test of user webapp")
        self.assertEqual(doc["limits"], "relay not running: limit state unknown")
        for body, code in (({"username": "nobody", "sender": "a@b.test"}, 404),
                           ({"username": "webapp"}, 400),
                           ({"username": "webapp", "sender": "a@shop.test", "size": -1}, 400),
                           ({"username": "webapp", "sender": "a@shop.test", "size": True}, 400),
                           ({"username": "webapp", "sender": "a@shop.test", "x": 1}, 400),
                           ({"username": "webapp", "sender": "a@shop.test", "ip": "1.2"}, 400),
                           ({"username": "webapp", "sender": "a@shop.test", "recipients": 0},
                            400)):
            yield self.api("POST", "/explain", body, expect=code)

    # ---- suppressions

    @defer.inlineCallbacks
    def test_suppressions(self):
        _, _, entry = yield self.api("POST", "/suppressions", {
            "address": "Bob@Example.org", "user": "webapp", "reason": "manual"}, expect=201)
        self.assertEqual((entry["address"], entry["account"], entry["user"]),
                         ("bob@example.org", "default", "webapp"))  # fmt: skip
        yield self.api("POST", "/suppressions", {"address": "bob@example.org",
                                                 "user": "webapp"}, expect=409)
        yield self.api("POST", "/suppressions", {"address": "all@example.org"}, expect=201)
        yield self.api("POST", "/suppressions", {"address": "a@example.org", "account": "acme"},
                       expect=201)  # fmt: skip
        for doc, code in (({"address": "nope"}, 400), ({"address": "a@b.test", "user": "zz"}, 404),
                          ({"address": "a@b.test", "reason": "spite"}, 400),
                          ({"address": "a@b.test", "user": "webapp", "account": "acme"}, 400)):
            yield self.api("POST", "/suppressions", doc, expect=code)
        _, _, everything = yield self.api("GET", "/suppressions", expect=200)
        self.assertEqual(len(everything), 3)
        _, _, mine = yield self.api("GET", "/suppressions?user=webapp", expect=200)
        self.assertEqual([e["address"] for e in mine], ["bob@example.org"])
        _, _, glob = yield self.api("GET", "/suppressions?global=1", expect=200)
        self.assertEqual([e["address"] for e in glob], ["all@example.org"])
        _, _, acme = yield self.api("GET", "/suppressions?account=acme", expect=200)
        self.assertEqual([e["address"] for e in acme], ["a@example.org"])
        yield self.api("DELETE", "/suppressions/bob@example.org?user=webapp", expect=204)
        yield self.api("DELETE", "/suppressions/bob@example.org?user=webapp", expect=404)
        yield self.api("DELETE", "/suppressions/all@example.org", expect=204)
        yield self.api("GET", "/suppressions?user=nobody", expect=404)

    @defer.inlineCallbacks
    def test_deleted_user_leaves_no_suppressions_to_a_new_user_of_its_name(self):
        yield self.api("POST", "/suppressions", {"address": "bob@example.org", "user": "webapp"},
                       expect=201)  # fmt: skip
        yield self.api("POST", "/suppressions", {"address": "all@example.org"}, expect=201)
        hour = int(self.panel.spool._reactor.seconds() // 3600)
        self.panel.stats.add({("default", "webapp", hour, "accepted"): 5})
        yield self.api("DELETE", "/users/webapp", expect=204)
        _, _, everything = yield self.api("GET", "/suppressions", expect=200)
        self.assertEqual([(e["address"], e["user"]) for e in everything],
                         [("all@example.org", None)])  # fmt: skip
        _, _, doc = yield self.api("GET", "/stats?account=default", expect=200)
        self.assertEqual(doc["totals"]["accepted"], 5)  # kept, under another name
        # Mail of the deleted user still queued bounces after all: it is not inherited.
        self.panel.suppressions.add("late@example.org", "default", "webapp")
        yield self.api("POST", "/users", {"username": "webapp", "domains": "shop.test"},
                       expect=201)  # fmt: skip
        _, _, mine = yield self.api("GET", "/suppressions?user=webapp", expect=200)
        self.assertEqual(mine, [])
        _, _, doc = yield self.api("GET", "/stats?user=webapp", expect=200)
        self.assertEqual(doc["totals"]["accepted"], 0)

    # ---- queue

    def queue_message(self, held=False, held_until=None):
        envelope = Envelope(id="", sender="john@doe.test", recipients=["a@example.org",
                            "b@example.org"], user="doe.test", account="default",
                            client_ip="127.0.0.1", helo="client.test", tls=True,
                            received_at=self.panel.spool._reactor.seconds(), sandboxed=held,
                            held_until=held_until,
                            held_quota="daily quota of 1 messages of user doe.test")
        message = self.panel.spool.create(envelope)
        message.write(b"Subject: hello\r\nFrom: <john@doe.test>\r\n\r\nbody\r\n")
        return message.commit()

    @defer.inlineCallbacks
    def test_queue(self):
        queued = yield self.queue_message()
        held = yield self.queue_message(held=True)
        _, _, listing = yield self.api("GET", "/queue", expect=200)
        self.assertEqual(listing["total"], 2)
        self.assertEqual([(m["id"], m["state"]) for m in listing["messages"]],
                         [(queued, "queued"), (held, "held")])  # fmt: skip
        _, _, listing = yield self.api("GET", "/queue?limit=1", expect=200)
        self.assertEqual((listing["total"], len(listing["messages"])), (2, 1))
        yield self.api("GET", "/queue?limit=zero", expect=400)
        _, _, shown = yield self.api("GET", f"/queue/{queued}", expect=200)
        self.assertEqual([r["address"] for r in shown["recipient_status"]],
                         ["a@example.org", "b@example.org"])  # fmt: skip
        self.assertEqual(shown["pending"], ["a@example.org", "b@example.org"])
        self.assertIn("Subject: hello", shown["headers"])
        # No delivery manager runs in this relay: a retry cannot be done.
        yield self.api("POST", f"/queue/{queued}/retry", expect=409)
        yield self.api("DELETE", f"/queue/{held}", expect=204)
        yield self.api("DELETE", f"/queue/{held}", expect=404)
        yield self.api("GET", f"/queue/{held}", expect=404)
        code, _, _ = yield self.panel.call("GET", "/api/v1/queue/x/../../users")
        self.assertEqual(code, 404)
        yield self.api("GET", "/queue/not-an-id", expect=404)
        self.assertEqual(self.panel.spool.queued(), [queued])

    @defer.inlineCallbacks
    def test_queue_retry_and_delete_through_the_delivery_manager(self):
        from twisted.internet import reactor

        from mailrelay.delivery.manager import DeliveryManager
        from mailrelay.delivery.router import MXRouter, make_resolver
        from mailrelay.manage.queue import QueueControl

        # DNS fails for the recipients' domain: the message waits for its next attempt.
        self.panel.dns.zone["example.org"] = ["SERVFAIL"]
        router = MXRouter(make_resolver([self.panel.dns.address], reactor), allow_local=True)
        manager = DeliveryManager(self.panel.spool, router, reactor, retry_first=3600,
                                  retry_max=3600, connect_timeout=5)  # fmt: skip
        yield manager.start()
        self.addCleanup(manager.stop)
        self.panel.services.control = QueueControl(self.panel.spool, reactor, manager)
        queue_id = yield self.queue_message()
        manager.enqueue(queue_id)
        yield manager.idle()
        _, _, shown = yield self.api("GET", f"/queue/{queue_id}", expect=200)
        self.assertEqual(shown["attempts"], 1)
        _, _, result = yield self.api("POST", f"/queue/{queue_id}/retry", expect=202)
        self.assertEqual(result["id"], queue_id)
        yield manager.idle()
        _, _, shown = yield self.api("GET", f"/queue/{queue_id}", expect=200)
        self.assertEqual(shown["attempts"], 2)
        yield self.api("POST", "/queue/1aaaaaaaaaaaaaaaaa/retry", expect=404)
        yield self.api("DELETE", f"/queue/{queue_id}", expect=204)
        self.assertEqual(self.panel.spool.queued(), [])

    @defer.inlineCallbacks
    def test_queue_while_the_delivery_process_restarts(self):
        from twisted.internet import reactor

        from mailrelay.delivery.process import DeliveryProcess
        from mailrelay.manage.queue import QueueControl

        # A delivery process that is not running (between a crash and its restart).
        restarting = DeliveryProcess(["/bin/false"], reactor)
        self.panel.services.control = QueueControl(self.panel.spool, reactor, restarting)
        queue_id = yield self.queue_message()
        _, _, doc = yield self.api("POST", f"/queue/{queue_id}/retry", expect=503)
        self.assertIn("restarting", str(doc))
        yield self.api("DELETE", f"/queue/{queue_id}", expect=204)  # done on the files
        self.assertEqual(self.panel.spool.queued(), [])

    @defer.inlineCallbacks
    def test_queue_release_of_mail_held_over_quota(self):
        from twisted.internet import reactor
        from twisted.internet.task import Clock

        now = reactor.seconds()

        from mailrelay.manage.queue import QueueControl
        from mailrelay.manage.stores import threaded
        from mailrelay.model import SmtpUser
        from mailrelay.policy.quota import QuotaCounter
        from mailrelay.policy.quotahold import QuotaRelease

        spool = self.panel.spool
        counter = QuotaCounter(Clock(), per_day=1)
        holds = QuotaRelease(spool, counter, self.panel.directory, None, Clock(),
                             threaded(reactor))
        self.panel.services.control = QueueControl(spool, reactor, None, holds)
        announced = []
        spool.subscribe(lambda envelope: announced.append(envelope.id))
        over = yield self.queue_message(held_until=now + 3600)
        sandboxed = yield self.queue_message(held=True, held_until=now + 3600)
        queued = yield self.queue_message()
        announced.clear()
        _, _, listing = yield self.api("GET", "/queue", expect=200)
        self.assertEqual({m["id"]: (m["state"], m["held"], m["held_quota"])
                          for m in listing["messages"]},
                         {queued: ("queued", None, None),
                          over: ("held", "quota", "daily quota of 1 messages of user doe.test"),
                          sandboxed: ("held", "sandbox", None)})  # fmt: skip
        _, _, doc = yield self.api("POST", f"/queue/{sandboxed}/release", expect=409)
        self.assertIn("sandboxed", str(doc))
        yield self.api("POST", f"/queue/{queued}/release", expect=404)
        yield self.api("POST", "/queue/not-an-id/release", expect=404)
        _, _, doc = yield self.api("POST", f"/queue/{over}/release", expect=200)
        self.assertEqual(doc, {"id": over, "released": True})
        self.assertEqual(announced, [over])  # delivery hears of it once
        self.assertEqual(sorted(spool.queued()), sorted([queued, over]))
        self.assertEqual(spool.held(), [sandboxed])
        used = counter.usage(SmtpUser("doe.test"), None)[0].used
        self.assertEqual(used, 1)  # counted in the current period
        yield self.api("POST", f"/queue/{over}/release", expect=404)

    # ---- statistics

    @defer.inlineCallbacks
    def test_stats(self):
        hour = int(self.panel.spool._reactor.seconds() // 3600)
        self.panel.stats.add({("default", "webapp", hour, "accepted"): 5,
                              ("default", "webapp", hour, "delivered"): 4,
                              ("default", "webapp", hour - 30, "bounced"): 1,
                              ("acme", "news@acme.test", hour, "accepted"): 7})  # fmt: skip
        _, _, doc = yield self.api("GET", "/stats?user=webapp&period=day", expect=200)
        self.assertEqual((doc["totals"]["accepted"], doc["totals"]["delivered"],
                          doc["totals"]["bounced"]), (5, 4, 1))  # fmt: skip
        self.assertEqual(sum(p["accepted"] for p in doc["periods"]), 5)
        _, _, doc = yield self.api("GET", "/stats?user=webapp&since=12h", expect=200)
        self.assertEqual(doc["totals"]["bounced"], 0)
        _, _, doc = yield self.api("GET", "/stats?account=acme", expect=200)
        self.assertEqual(doc["totals"]["accepted"], 7)
        _, _, doc = yield self.api("GET", "/stats", expect=200)
        self.assertEqual(doc["totals"]["accepted"], 12)
        yield self.api("GET", "/stats?period=week", expect=400)
        yield self.api("GET", "/stats?since=yesterday", expect=400)
        yield self.api("GET", "/stats?user=nobody", expect=404)
        yield self.api("GET", "/stats?account=nobody", expect=404)

    @defer.inlineCallbacks
    def test_every_documented_operation(self):
        """One pass through the whole document, each answer checked against it."""
        queue_id = yield self.queue_message()
        calls = [
            ("GET", "/openapi.json", None, 200), ("GET", "/users", None, 200),
            ("POST", "/users", {"username": "t", "domains": "doe.test"}, 201),
            ("GET", "/users/t", None, 200), ("PATCH", "/users/t", {"note": "n"}, 200),
            ("POST", "/users/t/password", None, 200), ("GET", "/users/t/senders", None, 200),
            ("POST", "/users/t/senders/doe.test/verify", None, 200),
            ("GET", "/accounts", None, 200), ("POST", "/accounts", {"name": "z"}, 201),
            ("GET", "/accounts/z", None, 200), ("PATCH", "/accounts/z", {"note": "n"}, 200),
            ("DELETE", "/accounts/z", None, 204), ("GET", "/ip-auth", None, 200),
            ("POST", "/suppressions", {"address": "a@b.test"}, 201),
            ("GET", "/suppressions", None, 200),
            ("DELETE", "/suppressions/a@b.test", None, 204), ("GET", "/queue", None, 200),
            ("GET", f"/queue/{queue_id}", None, 200),
            ("POST", f"/queue/{queue_id}/retry", None, 409),
            ("POST", f"/queue/{queue_id}/release", None, 404),  # queued, not held
            ("DELETE", f"/queue/{queue_id}", None, 204), ("GET", "/stats", None, 200),
            ("POST", "/webhooks", {"account": "acme", "url": "https://hooks.example.com/"}, 201),
            ("GET", "/webhooks", None, 200), ("GET", "/webhooks/1", None, 200),
            ("POST", "/webhooks/1/rotate-secret", None, 200),
            ("POST", "/webhooks/1/enable", None, 200), ("GET", "/webhooks/failed", None, 200),
            ("POST", "/webhooks/failed/1/retry", None, 404),
            ("DELETE", "/webhooks/1", None, 204),
            ("POST", "/dkim", {"domain": "doe.test", "type": "ed25519", "selector": "e1"}, 201),
            ("GET", "/dkim", None, 200), ("GET", "/dkim/doe.test", None, 200),
            ("POST", "/dkim", {"domain": "doe.test", "type": "ed25519", "selector": "e2"}, 201),
            ("POST", "/dkim/doe.test/e2/activate", None, 409),  # not in DNS
            ("POST", "/dkim/doe.test/e1/retire", None, 409),  # active
            ("GET", "/domains", None, 200), ("GET", "/domains/doe.test/check", None, 200),
            ("DELETE", "/dkim/doe.test/e2", None, 204),
            ("DELETE", "/dkim/doe.test/e1", None, 204),
            ("POST", "/explain", {"username": "t", "sender": "a@doe.test"}, 200),
            ("DELETE", "/users/t", None, 204),
        ]  # fmt: skip
        for method, path, doc, code in calls:
            yield self.api(method, path, doc, key=None if path == "/openapi.json" else "rw",
                           expect=code)  # fmt: skip
        self.assertEqual(set(OPERATIONS) - self.exercised, set())


class LdapApiTests(unittest.TestCase):
    """Behind the LDAP directory the API reads users and refuses to change them."""

    @defer.inlineCallbacks
    def setUp(self):
        from ldap_server import start_slapd

        if not os.path.exists("/usr/sbin/slapd"):
            raise AssertionError("slapd is not installed")
        self.tmp = tempfile.mkdtemp(prefix="mailrelay-web-ldap-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        os.makedirs(os.path.join(self.tmp, "slapd"))
        self.slapd = start_slapd(os.path.join(self.tmp, "slapd"))
        self.addCleanup(self.slapd.close)
        extra = "\n[directory]\nbackend = ldap\n\n" + self.slapd.config_text()
        self.panel = yield Panel.start(self.tmp, extra)
        self.addCleanup(self.panel.stop)

    @defer.inlineCallbacks
    def test_users_are_read_only(self):
        code, _, users = yield self.panel.call("GET", "/api/v1/users")
        self.assertEqual(code, 200)
        self.assertIn("john@doe.test", [u["username"] for u in users])
        code, _, user = yield self.panel.call("GET", "/api/v1/users/john@doe.test")
        self.assertEqual((code, user["username"]), (200, "john@doe.test"))
        for method, path, doc in (("POST", "/users", {"username": "x.test"}),
                                  ("PATCH", "/users/john@doe.test", {"note": "x"}),
                                  ("DELETE", "/users/john@doe.test", None),
                                  ("POST", "/users/john@doe.test/password", None),
                                  ("POST", "/accounts", {"name": "x"})):  # fmt: skip
            code, headers, body = yield self.panel.call(method, "/api/v1" + path, doc)
            self.assertEqual(code, 405, (method, path, body))
            self.assertIn("LDAP", body["error"])
            check_response(method, "/api/v1" + path, code, body)


class PostgresAwayApiTests(unittest.TestCase):
    """A store in PostgreSQL that cannot be reached: 503 saying so, not 500."""

    @defer.inlineCallbacks
    def test_users_listed_while_the_last_logins_cannot_be_read(self):
        import pg_server

        from mailrelay.postgres.logins import PgLoginStore

        server, db = pg_server.private(self)
        tmp = tempfile.mkdtemp(prefix="mailrelay-web-")
        self.addCleanup(shutil.rmtree, tmp, True)
        panel = yield Panel.start(tmp)
        self.addCleanup(panel.stop)
        panel.services.last_logins = PgLoginStore(db)
        code, _, _ = yield panel.call("GET", "/api/v1/users", None, "rw")
        self.assertEqual(code, 200)
        server.halt()
        code, _, body = yield panel.call("GET", "/api/v1/users", None, "rw")
        self.assertEqual(code, 503, body)
        self.assertIn("PostgreSQL cannot answer now", body["error"])
