"""Admins limited to one account, over the real listener with real clients: an API key
made with ``--account alpha`` and a panel login of an admin made with ``--account alpha``
(cookies and CSRF tokens as a browser sends them) try EVERY route of the API and of the
panel, as read from their routing tables: alpha's objects are allowed, beta's are refused
(and stay as they were), relay-wide routes are refused, and lists hold only alpha's.

A route added without an account rule (``Router.add(..., account=...)``, web/tenancy.py)
fails here, and so does one whose path parameters or body this test has no sample for:
a new route has to say how it keeps accounts apart, and be tried here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from urllib.parse import quote, urlencode

from panel import Panel
from test_web_api import OPERATIONS
from test_web_pages import WebSession
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay.auth.passwords import hash_password
from mailrelay.events import EventKind
from mailrelay.manage.access import Access, AccessStore, access_path
from mailrelay.manage.queue import QueueControl
from mailrelay.manage.stores import threaded
from mailrelay.model import Envelope
from mailrelay.policy.quotahold import QuotaRelease
from mailrelay.web import tenancy
from mailrelay.web.routing import json_response
from mailrelay.webhooks.sink import WebhookSink
from mailrelay.webhooks.store import FAILED

LIMITED_PASSWORD = "alpha-admin-password"
FORM = "application/x-www-form-urlencoded"

# What each side's objects are called; queue ids are added once the messages are queued.
SIDES = {
    "A": {"account": "alpha", "username": "app-a", "name": "alpha", "domain": "alpha.test",
          "selector": "s-a", "sender": "alpha.test", "address": "supp-a@example.org",
          "token": "any"},
    "B": {"account": "beta", "username": "app-b", "name": "beta", "domain": "beta.test",
          "selector": "s-b", "sender": "beta.test", "address": "supp-b@example.org",
          "token": "any"},
}  # fmt: skip
# Text that must never appear in what alpha's admin is shown: the other accounts' objects.
FOREIGN = ("app-b", "beta", "webapp", "doe.test", "acme", "supp-b@", "supp-g@")
HOOK = "https://hooks.{}.example/{}"
# Where alpha is allowed but the handler itself cannot do it in this relay (no delivery
# process runs: a retry is refused with 409, as for any admin).
NOT_HERE = {("api", "POST", "/queue/{queue_id}/retry"): 409,
            ("panel", "POST", "/queue/{queue_id}/retry"): 409}


def failed_events(services, events: list[tuple[str, str]]) -> dict[str, list[int]]:
    """One event per (account, user), failed for good at each of its account's endpoints:
    the failed rows' ids by account."""
    store = services.webhooks.store
    sink = WebhookSink(store, reactor)
    for account, user in events:
        sink.emit(EventKind.BOUNCED, account, user, {"bounce": "hard"})
    sink._write(sink._take())
    ids: dict[str, list[int]] = {}
    for delivery, _ in store.due(1e12, 100):
        store.attempted(delivery.id, FAILED, 1.0, 400, "HTTP 400: no")
        ids.setdefault(delivery.account, []).append(delivery.id)
    return ids


def sample(surface: str, method: str, template: str, side: str, ids: dict) -> tuple:
    """(path params, query, body) for one route, on one side. Changes that remove or
    switch something take an object of their own, so every route finds its object."""
    s = dict(SIDES[side], **ids[side])
    a = side == "A"
    acct, dom, user = s["account"], s["domain"], s["username"]
    params: dict = {}
    query: dict = {}
    body = None
    api = surface == "api"
    key = (method, template)
    if key in (("GET", "/users"), ("GET", "/suppressions")) and not a:
        query = {"account": acct}  # a list filtered by a named account: beta's
    elif key == ("GET", "/stats") and not a:
        query = {"user": user}
    elif key in (("POST", "/users"), ("POST", "/users/new")):
        body = {"username": ("new-a" if api else "pnew-a") if a else "new-b", "account": acct,
                "domains": dom,
                "status": "allowed", "priority": "3"}
        if api:
            body = {"username": body["username"], "account": acct, "domains": dom}
    elif key in (("PATCH", "/users/{username}"), ("POST", "/users/{username}")):
        body = {"note": "changed", "account": acct}
        if not api:
            body |= {"status": "allowed", "priority": "3", "domains": dom}
    elif key in (("DELETE", "/users/{username}"), ("POST", "/users/{username}/delete")):
        params["username"] = ("gone-a" if api else "pgone-a") if a else user
    elif template == "/accounts" and method == "POST":
        body = {"name": "gamma"}
    elif key == ("PATCH", "/accounts/{name}") or key == ("POST", "/accounts/{name}"):
        body = {"note": "changed"}
    elif key == ("POST", "/suppressions"):
        body = {"address": ("new-a@example.org" if api else "pnew-a@example.org") if a
                else "new-b@example.org", "account": acct}
    elif key == ("DELETE", "/suppressions/{address}"):
        params["address"] = "del-a@example.org" if a else s["address"]
        query = {"account": acct}
    elif key == ("POST", "/suppressions/delete"):
        body = {"address": "pdel-a@example.org" if a else s["address"], "account": acct}
    elif key in (("DELETE", "/queue/{queue_id}"), ("POST", "/queue/{queue_id}/delete")):
        params["queue_id"] = s["delete_api" if api else "delete_panel"] if a else s["queue_id"]
    elif key == ("POST", "/queue/{queue_id}/release"):  # alpha's held over quota
        params["queue_id"] = s["release_api" if api else "release_panel"] if a else s["queue_id"]
    elif key == ("POST", "/dkim"):
        body = {"domain": "alpha3.test" if a else dom, "type": "ed25519",
                "selector": ("mk-a" if api else "pmk-a") if a else "mk-b"}
    elif key == ("POST", "/explain"):
        body = {"username": user, "sender": f"x@{dom}"}
        if not api:
            body["recipients"] = "1"
    if template.startswith("/dkim/{domain}/") and a:
        # Alpha's keys of each state, on a domain of each surface (one pending at a time).
        params["domain"] = dom if api else "alpha2.test"
        action = template.rpartition("/")[2]
        params["selector"] = {"activate": "new-a", "retire": "old-a"}.get(
            action, "del-a" if action in ("delete", "{selector}") else "s-a")
        params["selector"] = ("" if api else "p") + params["selector"]
    elif key == ("POST", "/webhooks"):
        body = {"account": acct, "url": f"https://hooks.{acct}.example/new"}
        if not api:
            body |= {"users": "", "events": ""}
    elif key in (("GET", "/webhooks"), ("GET", "/webhooks/failed")) and not a and api:
        query = {"account": acct}
    if template.startswith("/webhooks/"):
        # Alpha's endpoints to delete are of their own; each surface retries an event.
        gone = key in (("DELETE", "/webhooks/{endpoint}"), ("POST", "/webhooks/delete"))
        endpoint = s["gone_api" if api else "gone_panel"] if a and gone else s["endpoint"]
        event = s["event_api" if api else "event_panel"] if a else s["event"]
        params.update(endpoint=str(endpoint), event=str(event))
        if not api:
            body = {"id": str(event if template == "/webhooks/retry" else endpoint)}
    for name in ("username", "queue_id", "domain", "selector", "name", "sender", "address",
                 "token"):
        if "{" + name + "}" in template:
            params.setdefault(name, s[name])
    return params, query, body


def fill(template: str, params: dict) -> str:
    path = template
    for name, value in params.items():
        path = path.replace("{" + name + "}", quote(value, safe="@"))
    assert "{" not in path, f"{template}: no sample for its parameters: add one to sample()"
    return path


class AccountLimitedAdmins(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        tmp = tempfile.mkdtemp(prefix="mailrelay-tenancy-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.panel = yield Panel.start(tmp)
        self.addCleanup(self.panel.stop)
        # The relay's release of mail held over quota (no quotas counted here).
        spool = self.panel.spool
        holds = QuotaRelease(spool, None, self.panel.directory, None, reactor, threaded(reactor))
        self.panel.services.control = QueueControl(spool, reactor, None, holds)
        self.root = self.panel.port.factory.resource
        self.ids = yield self.seed()
        self.web = WebSession(self.panel)
        code, _ = yield self.web.login("alpha-admin", LIMITED_PASSWORD)
        self.assertEqual(code, 303)
        yield self.web.request("GET", "/users")  # the logged-in session's CSRF token

    @defer.inlineCallbacks
    def seed(self):
        """Two accounts with users, queued messages, suppressions, statistics and DKIM
        keys, made by an admin of the whole relay; a key and a login limited to alpha."""
        call = self.panel.call
        for name, domains in (("alpha", "alpha.test;alpha2.test;alpha3.test"),
                              ("beta", "beta.test")):
            code, _, doc = yield call("POST", "/api/v1/accounts", {"name": name,
                                                                   "domains": domains})
            self.assertEqual(code, 201, doc)
        for username, account, domain in (
            ("app-a", "alpha", "alpha.test"), ("gone-a", "alpha", "alpha.test"),
            ("pgone-a", "alpha", "alpha.test"), ("app-b", "beta", "beta.test"),
        ):  # fmt: skip
            code, _, doc = yield call("POST", "/api/v1/users", {
                "username": username, "account": account, "domains": domain})
            self.assertEqual(code, 201, doc)
        s = self.panel.suppressions
        for address, account in (("supp-a@example.org", "alpha"), ("del-a@example.org", "alpha"),
                                 ("pdel-a@example.org", "alpha"), ("supp-b@example.org", "beta"),
                                 ("supp-g@example.org", None)):  # fmt: skip
            s.add(address, account)
        hour = int(time.time() // 3600)
        self.panel.stats.add({("alpha", "app-a", hour, "accepted"): 5,
                              ("beta", "app-b", hour, "accepted"): 7,
                              ("default", "webapp", hour, "accepted"): 11})  # fmt: skip
        dkim = self.panel.services.dkim
        for domain, account, prefix in (("alpha.test", "alpha", ""),
                                        ("alpha2.test", "alpha", "p")):  # fmt: skip
            for selector, state in (("s-a", "active"), ("new-a", "pending"),
                                    ("old-a", "retiring"), ("del-a", "retiring")):  # fmt: skip
                key = yield dkim.add(domain, account, prefix + selector, "ed25519", 0, state)
                name, value = yield dkim.txtRecord(key)
                self.panel.dns.zone[name] = [f"TXT {value}"]
        yield dkim.add("beta.test", "beta", "s-b", "ed25519", 0)
        # A key of no account (as the relay domain's) on a domain of alpha's.
        yield dkim.add("alpha3.test", None, "relay", "ed25519", 0, "retiring")
        ids: dict = {"A": {}, "B": {}}
        for side, name, account, user in (
            ("A", "queue_id", "alpha", "app-a"), ("A", "delete_api", "alpha", "app-a"),
            ("A", "delete_panel", "alpha", "app-a"), ("B", "queue_id", "beta", "app-b"),
            ("A", "release_api", "alpha", "app-a"), ("A", "release_panel", "alpha", "app-a"),
        ):  # fmt: skip
            ids[side][name] = yield self.queue(account, user, held=name.startswith("release"))
        yield self.queue("default", "webapp")
        yield self.webhooks(ids)
        access = AccessStore(access_path(self.panel.config))
        with access.change():
            self.panel.keys["alpha"] = access.add_key("alpha-rw", Access.READ_WRITE, "alpha")
            access.set_admin("alpha-admin", hash_password(LIMITED_PASSWORD), True, "alpha")
        return ids

    @defer.inlineCallbacks
    def webhooks(self, ids: dict):
        """An endpoint of each account, with failed events (of alpha's, one retried
        through the API, one on the panel, one left), and two more of alpha's to delete."""
        for side, name in (("A", "endpoint"), ("B", "endpoint")):
            ids[side][name] = yield self.endpoint(side, name)
        failed = failed_events(self.panel.services, [("alpha", "app-a")] * 3 +
                               [("beta", "app-b")])  # fmt: skip
        ids["A"]["event_api"], ids["A"]["event_panel"], _ = failed["alpha"]  # one stays
        (ids["B"]["event"],) = failed["beta"]
        for name in ("gone_api", "gone_panel"):
            ids["A"][name] = yield self.endpoint("A", name)

    @defer.inlineCallbacks
    def endpoint(self, side: str, name: str):
        account = SIDES[side]["account"]
        code, _, doc = yield self.panel.call("POST", "/api/v1/webhooks", {
            "account": account, "url": HOOK.format(account, name)})  # fmt: skip
        self.assertEqual(code, 201, doc)
        return doc["id"]

    def queue(self, account: str, user: str, held: bool = False) -> str:
        envelope = Envelope(id="", sender=f"x@{account}.test", recipients=["r@example.org"],
                            user=user, account=account, client_ip="127.0.0.1",
                            helo="client.test", tls=True, received_at=time.time(),
                            held_until=time.time() + 3600 if held else None,
                            held_quota=f"daily quota of 1 messages of user {user}")
        message = self.panel.spool.create(envelope)
        message.write(b"Subject: hello\r\n\r\nbody\r\n")
        return message.commit()

    # ---- the two clients

    @defer.inlineCallbacks
    def api(self, method, path, query=None, body=None):
        """(status, body text) as the API key limited to alpha."""
        url = "/api/v1" + path + (("?" + urlencode(query)) if query else "")
        code, _, doc = yield self.panel.call(method, url, body, key="alpha")
        return code, json.dumps(doc)

    @defer.inlineCallbacks
    def page(self, method, path, query=None, body=None):
        """(status, page text) as the admin limited to alpha, logged in to the panel."""
        url = path + (("?" + urlencode(query)) if query else "")
        if method == "POST":
            body = body or {}
        code, content = yield self.web.request(method, url, body)
        return code, content.decode()

    def routes(self):
        """Every route: (surface, route, the client to try it with)."""
        for route in self.root.api.router.routes:
            yield "api", route, self.api
        for route in self.root.panel.router.routes:
            yield "panel", route, self.page

    # ---- what is seen of beta

    @defer.inlineCallbacks
    def beta_state(self):
        code, _, users = yield self.panel.call("GET", "/api/v1/users?account=beta")
        code, _, account = yield self.panel.call("GET", "/api/v1/accounts/beta")
        code, _, queued = yield self.panel.call("GET", f"/api/v1/queue/{self.ids['B']['queue_id']}")
        code, _, keys = yield self.panel.call("GET", "/api/v1/dkim/beta.test")
        code, _, supp = yield self.panel.call("GET", "/api/v1/suppressions?account=beta")
        code, _, failed = yield self.panel.call("GET", "/api/v1/webhooks/failed?account=beta")
        hooks = repr(self.panel.services.webhooks.store.endpoints("beta"))  # with secrets
        for doc in [*users, account]:
            doc.pop("last_login", None)
        return json.dumps([users, account, queued["id"], keys, supp, self.panel.spool.queued(),
                           failed, hooks], sort_keys=True)

    # ---- the tests

    def test_every_route_declares_its_account_rule(self):
        undeclared = [f"{surface} {r.method} {r.template}" for surface, r, _ in self.routes()
                      if r.account is None]
        self.assertEqual(undeclared, [], "declare how each route's account is found")
        documented = {(m, t) for m, t in OPERATIONS}
        routed = {(r.method, r.template) for r in self.root.api.router.routes}
        self.assertEqual(routed, documented)

    @defer.inlineCallbacks
    def test_a_route_without_a_rule_is_refused_to_limited_admins(self):
        async def handler(call):
            return json_response({"seen": True})

        self.root.api.router.add("GET", "/undeclared", handler)
        self.root.panel.router.add("GET", "/undeclared", handler)
        code, text = yield self.api("GET", "/undeclared")
        self.assertEqual(code, 403, text)
        self.assertIn("declares no account rule", text)
        code, text = yield self.page("GET", "/undeclared")
        self.assertEqual(code, 403, text)
        code, _, doc = yield self.panel.call("GET", "/api/v1/undeclared")  # every account
        self.assertEqual((code, doc), (200, {"seen": True}))

    @defer.inlineCallbacks
    def test_every_route_across_the_boundary(self):
        """Each route, as alpha's admin: beta's object refused (404, worded as for one
        that does not exist) and left as it was; a relay-wide route refused (403); alpha's
        own object allowed; a list holds alpha's objects and no one else's."""
        before = yield self.beta_state()
        tried = set()
        routes = list(self.routes())
        self.assertGreater(len(routes), 60)
        for surface, route, client in routes:
            rule = route.account
            self.assertIsNotNone(rule, f"{surface} {route.method} {route.template}: no rule")
            if rule in (tenancy.PUBLIC, tenancy.SESSION, tenancy.LISTED):
                continue
            params, query, body = sample(surface, route.method, route.template, "B", self.ids)
            code, text = yield client(route.method, fill(route.template, params), query, body)
            what = f"{surface} {route.method} {route.template} on beta's object"
            if rule is tenancy.RELAY_WIDE:
                self.assertEqual(code, 403, f"{what}: {text}")
                self.assertIn("relay-wide", text)
            else:
                self.assertEqual(code, 404, f"{what}: {text}")
                self.assertNotIn("relay-wide", text)
            tried.add((surface, route.method, route.template))

        # Names of beta's objects in a query or body are refused too, and so is moving
        # alpha's user to beta; the global suppression list is relay-wide.
        a, b = SIDES["A"], SIDES["B"]
        probes = [
            (self.api, "GET", "/users", {"account": "beta"}, None, 404),
            (self.api, "GET", "/stats", {"user": "app-b"}, None, 404),
            (self.api, "GET", "/stats", {"account": "beta"}, None, 404),
            (self.api, "GET", "/stats", {"user": "app-a", "account": "beta"}, None, 404),
            (self.api, "GET", "/suppressions", {"account": "beta"}, None, 404),
            (self.api, "GET", "/suppressions", {"user": "app-b"}, None, 404),
            (self.api, "GET", "/suppressions", {"global": "1"}, None, 403),
            (self.api, "POST", "/suppressions", None, {"address": "g@example.org"}, 403),
            (self.api, "DELETE", "/suppressions/supp-g@example.org", None, None, 403),
            (self.api, "PATCH", "/users/app-a", None, {"account": "beta"}, 404),
            (self.api, "POST", "/dkim", None, {"domain": "relay.test"}, 404),
            (self.api, "POST", "/dkim/alpha3.test/relay/retire", None, None, 404),
            (self.page, "POST", "/dkim/alpha3.test/relay/delete", None, None, 404),
            (self.page, "GET", "/users", {"account": "beta"}, None, 404),
            (self.page, "POST", "/users/app-a", None, {"account": "beta", "priority": "3"},
             404),
            (self.page, "POST", "/suppressions", None, {"address": "g@example.org"}, 403),
            (self.page, "POST", "/suppressions/delete", None,
             {"address": "supp-g@example.org"}, 403),
        ]  # fmt: skip
        for client, method, path, query, body, expected in probes:
            code, text = yield client(method, path, query, body)
            self.assertEqual(code, expected, f"{method} {path} {query} {body}: {text}")
        after = yield self.beta_state()
        self.assertEqual(after, before, "beta's objects changed")

        # Alpha's own objects, and the lists.
        logout = None
        for surface, route, client in routes:
            rule = route.account
            if rule is tenancy.PUBLIC:
                continue
            if route.template == "/logout":
                logout = route
                continue
            params, query, body = sample(surface, route.method, route.template, "A", self.ids)
            code, text = yield client(route.method, fill(route.template, params), query, body)
            what = f"{surface} {route.method} {route.template} on alpha's object: {text}"
            if rule is tenancy.RELAY_WIDE:
                self.assertEqual(code, 403, what)
                continue
            allowed = code < 400 or NOT_HERE.get((surface, route.method, route.template)) == code
            self.assertTrue(allowed, what)
            if rule is tenancy.LISTED or route.method == "GET":
                for foreign in FOREIGN:
                    self.assertNotIn(foreign, text, what)
            tried.add((surface, route.method, route.template))
        # The panel's lists show alpha's objects (and, above, nothing of the others').
        for page, mine in (("/users", "app-a"), ("/accounts", "alpha"),
                           ("/queue", self.ids["A"]["queue_id"]),
                           ("/suppressions", "supp-a@example.org"), ("/dkim", "alpha.test"),
                           ("/domains", "alpha2.test"), ("/stats", "app-a"),
                           ("/webhooks", HOOK.format("alpha", "endpoint"))):  # fmt: skip
            code, text = yield self.page("GET", page)
            self.assertEqual(code, 200, text)
            self.assertIn(mine, text, page)
        code, _ = yield self.page("POST", "/logout")
        self.assertEqual((code, logout is not None), (303, True))

        # The lists hold alpha's objects.
        code, text = yield self.api("GET", "/queue")
        queue = json.loads(text)
        self.assertEqual({m["account"] for m in queue["messages"]}, {"alpha"})
        self.assertEqual(queue["total"], len(queue["messages"]))
        code, text = yield self.api("GET", "/stats")
        self.assertEqual((json.loads(text)["account"], json.loads(text)["totals"]["accepted"]),
                         ("alpha", 5))
        code, text = yield self.api("GET", "/users")
        self.assertEqual({u["account"] for u in json.loads(text)}, {"alpha"})
        code, text = yield self.api("GET", "/suppressions")
        self.assertEqual({e["account"] for e in json.loads(text)}, {"alpha"})
        code, text = yield self.api("GET", "/dkim")
        self.assertEqual({k["account"] for k in json.loads(text)}, {"alpha"})
        code, text = yield self.api("GET", "/domains")
        self.assertEqual(json.loads(text), ["alpha.test", "alpha2.test", "alpha3.test"])
        code, text = yield self.api("GET", "/accounts")
        self.assertEqual([acc["name"] for acc in json.loads(text)], ["alpha"])
        self.assertIn(a["username"], text)
        self.assertNotIn(b["username"], text)
        code, text = yield self.api("GET", "/webhooks")
        self.assertEqual({e["account"] for e in json.loads(text)}, {"alpha"})
        code, text = yield self.api("POST", "/webhooks", None, {"url": HOOK.format("a", "x")})
        self.assertEqual((code, json.loads(text)["account"]), (201, "alpha"))
        code, text = yield self.api("GET", "/webhooks/failed")
        self.assertEqual({e["account"] for e in json.loads(text)}, {"alpha"})
