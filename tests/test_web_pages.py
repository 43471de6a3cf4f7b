"""The web admin page over real HTTP on loopback: text typed by anyone (a username, a note)
comes back as text on every page that shows it, never as markup; and failed web logins
are counted by the relay's LoginGuard, the one SMTP AUTH uses."""

from __future__ import annotations

import re
import shutil
import tempfile
from html.parser import HTMLParser
from urllib.parse import quote, urlencode

from panel import ADMIN_PASSWORD, Panel
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.auth.passwords import hash_password
from mailrelay.manage.access import Access, AccessFile, AccessStore, access_path
from mailrelay.policy.bruteforce import LoginGuard

# No space, '@' or ':' (a named username may hold anything else).
HOSTILE_NAME = "x\"'<script>alert(1)</script>&amp;"
HOSTILE_NOTE = "<script>alert('note')</script> \"quoted\" & <b>bold</b>"
FORM = "application/x-www-form-urlencoded"


class Seen(HTMLParser):
    """Every text and attribute value of a page, as a browser would read them."""

    def __init__(self, body: bytes) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: list[str] = []
        self.values: list[str] = []
        self.feed(body.decode())
        self.close()

    def handle_starttag(self, tag, attrs):
        self.values += [v for _, v in attrs if v is not None]

    def handle_data(self, data):
        self.texts.append(data)

    def text(self) -> str:
        return "".join(self.texts)


class WebSession:
    """A browser's cookie and the CSRF token of the page it last saw."""

    def __init__(self, panel: Panel) -> None:
        self.panel = panel
        self.cookie = ""
        self.csrf = ""

    @defer.inlineCallbacks
    def request(self, method: str, path: str, form: dict | None = None):
        headers = {"cookie": self.cookie} if self.cookie else {}
        body = None
        if form is not None:
            body = urlencode({"csrf": self.csrf, **form}).encode()
            headers["content-type"] = FORM
        code, response_headers, content = yield self.panel.request(method, path, body, headers)
        for cookie in response_headers.getRawHeaders(b"set-cookie") or []:
            self.cookie = cookie.decode().split(";", 1)[0]
        found = re.search(rb'name="csrf" value="([^"]+)"', content)
        if found:
            self.csrf = found.group(1).decode()
        return code, content

    @defer.inlineCallbacks
    def login(self, name: str = "alice", password: str = ADMIN_PASSWORD):
        """(status, body) of posting the login form."""
        yield self.request("GET", "/login")
        result = yield self.request("POST", "/login", {"name": name, "password": password})
        return result


class LoggedIn(unittest.TestCase):
    """A panel, and a WebSession logged in to it as alice."""

    @defer.inlineCallbacks
    def setUp(self):
        tmp = tempfile.mkdtemp(prefix="mailrelay-pages-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.panel = yield Panel.start(tmp)
        self.addCleanup(self.panel.stop)
        self.web = WebSession(self.panel)
        code, _ = yield self.web.login()
        self.assertEqual(code, 303)


class EscapingTests(LoggedIn):

    def shown(self, body: bytes, *texts: str, values: tuple[str, ...] = ()) -> None:
        """``texts`` read as text and ``values`` as attribute values, and no markup of
        them got into the page."""
        self.assertNotIn(b"<script", body)
        self.assertNotIn(b"<b>", body)
        seen = Seen(body)
        for text in texts:
            self.assertIn(text, seen.text())
        for value in values:
            self.assertIn(value, seen.values)

    @defer.inlineCallbacks
    def test_a_hostile_username_and_note_are_text_on_every_page(self):
        code, _, body = yield self.panel.call("PATCH", "/api/v1/accounts/default",
                                              {"note": HOSTILE_NOTE})  # fmt: skip
        self.assertEqual(code, 200, body)
        yield self.web.request("GET", "/users/new")
        code, body = yield self.web.request("POST", "/users/new", {
            "username": HOSTILE_NAME, "account": "default", "note": HOSTILE_NOTE,
            "status": "allowed", "priority": "3", "domains": "doe.test",
            "bounce_notify": "sender"})  # fmt: skip
        self.assertEqual(code, 200, body)
        self.shown(body, f"Added named user {HOSTILE_NAME} to account default.")
        path = f"/users/{quote(HOSTILE_NAME, safe='@')}"
        self.assertIn(path, Seen(body).values)  # the link to its settings

        # A refused change shows what was typed, as it was typed.
        code, body = yield self.web.request("POST", path, {
            "account": "default", "note": HOSTILE_NOTE + "!", "status": "allowed",
            "priority": "9", "domains": HOSTILE_NOTE})  # fmt: skip
        self.assertEqual(code, 400, body)
        self.shown(body, f"SMTP user {HOSTILE_NAME}",
                   values=(HOSTILE_NOTE + "!", HOSTILE_NOTE))  # fmt: skip

        code, _, body = yield self.panel.call("POST", "/api/v1/suppressions", {
            "address": "gone@example.org", "user": HOSTILE_NAME})  # fmt: skip
        self.assertEqual(code, 201, body)
        pages = {
            "/users": (HOSTILE_NAME, HOSTILE_NOTE),
            path: (f"SMTP user {HOSTILE_NAME}",),
            path + "/stats": (f"Statistics of {HOSTILE_NAME}",),
            "/stats": (HOSTILE_NAME,),
            "/accounts": (HOSTILE_NOTE,),
            "/accounts/default": (HOSTILE_NAME,),
            "/suppressions": (HOSTILE_NAME,),
        }
        for page, texts in pages.items():
            code, body = yield self.web.request("GET", page)
            self.assertEqual(code, 200, page)
            self.shown(body, *texts)
        code, body = yield self.web.request("GET", path)
        self.shown(body, values=(HOSTILE_NOTE, f"{path}/delete"))

        code, body = yield self.web.request("POST", path + "/password", {})
        self.shown(body, f"The password of {HOSTILE_NAME} is:")
        code, body = yield self.web.request("POST", path + "/delete", {})
        self.assertEqual(code, 303)
        code, body = yield self.web.request("GET", "/users")
        self.shown(body, f"Deleted user {HOSTILE_NAME};")

    @defer.inlineCallbacks
    def test_error_pages_show_what_was_asked_as_text(self):
        code, body = yield self.web.request("GET", f"/users/{quote(HOSTILE_NAME, safe='')}")
        self.assertEqual(code, 404)
        self.shown(body, f"unknown user {HOSTILE_NAME!r}")


class ExplainPageTests(LoggedIn):
    """The explain form: the steps as the API gives them, a refusal shown above the form
    with what was typed, and a POST without the session's CSRF token refused."""

    shown = EscapingTests.shown

    @defer.inlineCallbacks
    def test_explain_form(self):
        code, body = yield self.web.request("GET", "/explain?username=webapp")
        self.assertEqual(code, 200)
        self.shown(body, "Explain", values=("webapp", "/explain"))
        code, body = yield self.web.request("POST", "/explain", {
            "username": "webapp", "sender": "a@shop.test", "from_header": "",
            "recipients": "1", "size": ""})  # fmt: skip
        self.assertEqual(code, 200, body)
        self.shown(body, "webapp sending from <a@shop.test>: would be accepted.",
                   "250 2.1.0 Ok", "scope entry *@shop.test of user webapp",
                   "relay not running: limit state unknown")
        code, body = yield self.web.request("POST", "/explain", {
            "username": "webapp", "sender": HOSTILE_NOTE, "recipients": "1"})
        self.assertEqual(code, 200, body)
        self.shown(body, "would be refused", "550 5.7.1 Sender address",
                   values=(HOSTILE_NOTE,))
        code, body = yield self.web.request("POST", "/explain", {
            "username": HOSTILE_NAME, "sender": "a@shop.test", "recipients": "x"})
        self.assertEqual(code, 400, body)
        self.shown(body, "recipients must be a whole number", values=(HOSTILE_NAME,))
        code, body = yield self.web.request("POST", "/explain", {
            "username": HOSTILE_NAME, "sender": "a@shop.test"})
        self.assertEqual(code, 404, body)
        self.shown(body, f"unknown user {HOSTILE_NAME!r}")
        self.web.csrf = "forged"
        code, _ = yield self.web.request("POST", "/explain", {
            "username": "webapp", "sender": "a@shop.test"})
        self.assertEqual(code, 403)


class LoginThrottleTests(unittest.TestCase):
    """The panel's LoginGuard runs on a Clock of the test's: its waits and blocks pass only
    when the test advances it."""

    @defer.inlineCallbacks
    def start(self, **settings):
        tmp = tempfile.mkdtemp(prefix="mailrelay-login-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.clock = task.Clock()
        self.guard = LoginGuard(self.clock, **settings)
        self.panel = yield Panel.start(tmp, logins=self.guard)
        self.addCleanup(self.panel.stop)

    @defer.inlineCallbacks
    def test_failures_block_the_address_whatever_the_password(self):
        yield self.start(delay_after=3, block_after=3, block_time=900.0)
        web = WebSession(self.panel)
        for _ in range(3):
            code, body = yield web.login(password="wrong")
            self.assertEqual(code, 401)
            self.assertIn(b"Wrong admin name or password.", body)
        code, body = yield web.login()
        self.assertEqual(code, 429)
        self.assertIn(b"Too many failed logins: wait a few minutes.", body)
        self.clock.advance(901)
        code, _ = yield web.login()
        self.assertEqual(code, 303)

    @defer.inlineCallbacks
    def test_failures_at_smtp_auth_count_too(self):
        yield self.start(delay_after=2, block_after=2)
        # What the SMTP session records for two failed AUTHs from this address.
        self.guard.failed("127.0.0.1", "doe.test")
        self.guard.failed("127.0.0.1", "webapp")
        code, body = yield WebSession(self.panel).login()
        self.assertEqual(code, 429, body)

    @defer.inlineCallbacks
    def test_a_good_login_forgives_its_own_typos(self):
        yield self.start(delay_after=2, block_after=2)
        web = WebSession(self.panel)
        for _ in range(3):
            code, _ = yield web.login(password="wrong")
            self.assertEqual(code, 401)
            code, _ = yield web.login()
            self.assertEqual(code, 303)
            yield web.request("POST", "/logout", {})

    @defer.inlineCallbacks
    def test_after_failures_the_password_is_checked_only_after_a_wait(self):
        yield self.start(delay_after=1, block_after=5, base_delay=2.0)
        web = WebSession(self.panel)
        code, _ = yield web.login(password="wrong")
        self.assertEqual(code, 401)
        yield web.request("GET", "/login")
        answer = web.request("POST", "/login", {"name": "alice", "password": ADMIN_PASSWORD})
        for _ in range(500):  # until the request waits on the guard's clock
            if self.clock.getDelayedCalls() or answer.called:
                break
            yield task.deferLater(reactor, 0.01)
        self.assertFalse(answer.called)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 2.0)
        self.clock.advance(2.0)
        code, _ = yield answer
        self.assertEqual(code, 303)


class FreshAccessTests(unittest.TestCase):
    """An admin login or an API key made by mailrelay-admin a moment ago works at once,
    before the panel's periodic look at the access file (frozen here: its clock never
    moves)."""

    @defer.inlineCallbacks
    def test_a_new_admin_and_a_new_key_work_at_once(self):
        tmp = tempfile.mkdtemp(prefix="mailrelay-access-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.panel = yield Panel.start(tmp)
        self.addCleanup(self.panel.stop)
        path = access_path(self.panel.config)
        self.panel.services.access = AccessFile(path, task.Clock())
        store = AccessStore(path)
        with store.change():
            store.set_admin("bob", hash_password("bob-password-1"), new=True)
            key = store.add_key("fresh", Access.READ_ONLY)
        code, _ = yield WebSession(self.panel).login("bob", "bob-password-1")
        self.assertEqual(code, 303)
        code, _, _ = yield self.panel.request("GET", "/api/v1/users",
                                              headers={"authorization": f"Bearer {key}"})
        self.assertEqual(code, 200)
        code, _ = yield WebSession(self.panel).login("bob", "wrong password")
        self.assertEqual(code, 401)


class AccountPageTests(LoggedIn):

    @defer.inlineCallbacks
    def test_an_accounts_bounce_domain_is_set_on_its_page(self):
        yield self.web.request("GET", "/accounts")
        code, body = yield self.web.request("POST", "/accounts", {
            "name": "shop", "domains": "shop.test", "notify": "", "note": "",
            "bounce_domain": "bounces.shop.test"})  # fmt: skip
        self.assertEqual(code, 303, body)  # done: back to the list
        _, _, doc = yield self.panel.call("GET", "/api/v1/accounts/shop")
        self.assertEqual(doc["bounce_domain"], "bounces.shop.test")
        code, body = yield self.web.request("GET", "/accounts")
        self.assertIn("bounces.shop.test", Seen(body).text())  # the list shows it
        code, body = yield self.web.request("GET", "/accounts/shop")
        self.assertIn("bounces.shop.test", Seen(body).values)  # the form holds it
        # Not under the account's domains: refused on the page, nothing changed.
        code, body = yield self.web.request("POST", "/accounts/shop", {
            "domains": "shop.test", "notify": "", "note": "",
            "bounce_domain": "bounces.other.test"})  # fmt: skip
        self.assertEqual(code, 400, body)
        _, _, doc = yield self.panel.call("GET", "/api/v1/accounts/shop")
        self.assertEqual(doc["bounce_domain"], "bounces.shop.test")
        code, body = yield self.web.request("POST", "/accounts/shop", {
            "domains": "shop.test", "notify": "", "note": "", "bounce_domain": ""})
        self.assertEqual(code, 303, body)
        _, _, doc = yield self.panel.call("GET", "/api/v1/accounts/shop")
        self.assertIsNone(doc["bounce_domain"])

    @defer.inlineCallbacks
    def test_an_accounts_quotas_are_set_on_its_page(self):
        yield self.web.request("GET", "/accounts")
        code, body = yield self.web.request("POST", "/accounts", {
            "name": "bulk", "domains": "bulk.test", "quota_day": "500", "quota_month": ""})
        self.assertEqual(code, 303, body)
        _, _, doc = yield self.panel.call("GET", "/api/v1/accounts/bulk")
        self.assertEqual((doc["quota_day"], doc["quota_month"]), (500, None))
        code, body = yield self.web.request("GET", "/accounts/bulk")
        self.assertIn("500", Seen(body).values)  # the form holds it
        code, body = yield self.web.request("POST", "/accounts/bulk", {
            "domains": "bulk.test", "quota_day": "many"})
        self.assertEqual(code, 400, body)
        code, body = yield self.web.request("POST", "/accounts/bulk", {
            "domains": "bulk.test", "quota_day": "", "quota_month": "9000"})
        self.assertEqual(code, 303, body)
        _, _, doc = yield self.panel.call("GET", "/api/v1/accounts/bulk")
        self.assertEqual((doc["quota_day"], doc["quota_month"]), (None, 9000))

class LifecycleTests(LoggedIn):
    @defer.inlineCallbacks
    def test_last_login_shown_and_expiry_and_networks_edited(self):
        from mailrelay.auth.lifecycle import LoginStore

        store = LoginStore(self.panel.config.directory.logins_db)  # as the relay writes it
        self.addCleanup(store.close)
        store.add({"doe.test": (1700000000.0, "127.0.0.2")})
        code, body = yield self.web.request("GET", "/users")
        self.assertEqual(code, 200)
        self.assertIn("2023-11-14 22:13 from 127.0.0.2", Seen(body).text())
        code, body = yield self.web.request("GET", "/users/doe.test")
        self.assertIn("last login 2023-11-14 22:13 from 127.0.0.2", Seen(body).text())
        code, body = yield self.web.request("POST", "/users/doe.test", {
            "account": "default", "status": "allowed", "priority": "3", "note": "office",
            "bounce_notify": "sender", "expires": "2027-01-31",
            "allow_from": "203.0.113.0/24"})  # fmt: skip
        self.assertEqual(code, 303, body)
        code, _, doc = yield self.panel.call("GET", "/api/v1/users/doe.test")
        self.assertEqual((doc["expires"], doc["allow_from"]),
                         ("2027-02-01T00:00:00Z", "203.0.113.0/24"))
        code, body = yield self.web.request("POST", "/users/doe.test", {
            "account": "default", "status": "allowed", "priority": "3",
            "bounce_notify": "sender", "expires": "", "allow_from": "203.0.113.9/24"})
        self.assertEqual(code, 400, body)
        self.assertIn("did you mean 203.0.113.0/24?", Seen(body).text())


class QueuePageTests(LoggedIn):

    @defer.inlineCallbacks
    def test_a_message_held_over_quota_is_shown_so_and_released_by_its_button(self):
        from mailrelay.manage.queue import QueueControl
        from mailrelay.manage.stores import threaded
        from mailrelay.model import Envelope
        from mailrelay.policy.quotahold import QuotaRelease

        spool = self.panel.spool
        holds = QuotaRelease(spool, None, self.panel.directory, None, reactor, threaded(reactor))
        self.panel.services.control = QueueControl(spool, reactor, None, holds)
        ids = []
        for sandboxed in (False, True):
            envelope = Envelope("", "a@doe.test", ["r@example.org"], "doe.test", "default",
                                "127.0.0.1", "client.test", True, reactor.seconds(),
                                sandboxed=sandboxed, held_until=1796601600.0,  # 2026-12-07
                                held_quota="daily quota of 1 messages of user doe.test")
            ids.append((yield spool.submit(envelope, b"Subject: x\r\n\r\nbody\r\n")))
        over, sandboxed = ids
        code, body = yield self.web.request("GET", "/queue")
        text = Seen(body).text()
        self.assertIn("held: quota until 2026-12-07 00:00 UTC", text)
        self.assertIn("held: sandbox", text)
        self.assertIn(f"/queue/{over}/release".encode(), body)
        self.assertNotIn(f"/queue/{sandboxed}/release".encode(), body)  # never released
        code, body = yield self.web.request("POST", f"/queue/{over}/release", {})
        self.assertEqual(code, 303, body)
        self.assertEqual((spool.queued(), spool.held()), ([over], [sandboxed]))
        code, body = yield self.web.request("POST", f"/queue/{sandboxed}/release", {})
        self.assertEqual(code, 409, body)
