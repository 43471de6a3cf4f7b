"""Logging in to the panel and out of it.

The login form gets a session of its own (its CSRF token); logging in starts a new one.
Failed logins go through the daemon's LoginGuard (policy/bruteforce.py), the same one
SMTP AUTH uses: counted per client address and per admin name, each attempt from an address
with recent failures waits before its password is checked, and after ``[policy]
login_block_after`` failures the address gets 429 until ``login_block_time`` has passed.
"""

from __future__ import annotations

from twisted.internet import task, threads
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web.template import tags

from mailrelay.auth.passwords import DUMMY_HASH, verify_password
from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.reply import Reply
from mailrelay.web import ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages, html_response, redirect
from mailrelay.web.routing import Call, Response
from mailrelay.web.sessions import COOKIE, Session, Sessions
from mailrelay.web.templates import csrf_field, error, page, text_input

log = Logger()

EXPIRED = "The login form had expired: try again."
BLOCKED = "Too many failed logins: wait a few minutes."
WRONG = "Wrong admin name or password."


class LoginPages(Pages):
    def __init__(self, services: ops.Services, sessions: Sessions, logins: LoginGuard) -> None:
        super().__init__(services)
        self.sessions = sessions
        self.logins = logins

    def register(self, add) -> None:
        add("GET", "/login", self.login_form, account=t.PUBLIC)
        add("POST", "/login", self.login, account=t.PUBLIC)
        add("POST", "/logout", self.logout, account=t.SESSION)

    def _login_page(self, session: Session, message: str = "", status: int = 200) -> Response:
        form = tags.form(
            error(message),
            csrf_field(session.csrf),
            text_input("name", "Admin name", required=True),
            text_input("password", "Password", required=True, kind="password"),
            tags.div(tags.button("Log in", type="submit", id="login"), class_="actions"),
            method="post", action="/login", class_="card login",
        )  # fmt: skip
        return html_response(page("Log in", form), status)

    async def login_form(self, call: Call) -> Response:
        session = self.sessions.get(call.request.getCookie(COOKIE.encode()))
        if session is not None and session.admin is not None:
            return redirect("/users")
        session = session or self.sessions.start()
        response = self._login_page(session)
        response.cookies.append(self.sessions.cookie(session))
        return response

    async def login(self, call: Call) -> Response:
        form = call.form()
        session = self.sessions.get(call.request.getCookie(COOKIE.encode()))
        if session is None or not self.sessions.csrf_ok(session, form.get("csrf")):
            session = self.sessions.start()
            response = self._login_page(session, EXPIRED, 403)
            response.cookies.append(self.sessions.cookie(session))
            return response
        client = call.request.getClientAddress()
        client = getattr(client, "host", str(client))
        try:
            wait = await maybeDeferred(self.logins.check, client)  # Redis: a Deferred
        except Reply:
            return self._login_page(session, BLOCKED, 429)
        if wait:
            # Before the check, as for AUTH: the wait says nothing about the outcome.
            await task.deferLater(self.logins.clock, wait)
        name, password = form.get("name", ""), form.get("password", "")
        admin, ok = await self._verify(self.s.access.current(), name, password)
        if (not ok or admin is None) and self.s.access.refresh():
            admin, ok = await self._verify(self.s.access.current(), name, password)
        if not ok or admin is None:
            self.logins.failed(client, name)
            log.warn("control panel: failed login as {name} from {client}", name=name,
                     client=client)  # fmt: skip
            return self._login_page(session, WRONG, 401)
        self.logins.succeeded(client, name)
        self.sessions.end(session)
        session = self.sessions.start(admin.name, admin.fingerprint, admin.account)
        log.info("control panel: {name} logged in from {client}", name=name, client=client)
        return redirect("/users", [self.sessions.cookie(session)])

    async def _verify(self, data, name: str, password: str):
        """(the admin named, whether the password is theirs); an unknown name costs a
        verification too, so the time does not tell."""
        admin = data.admins.get(name)
        ok = await threads.deferToThreadPool(
            self.s.reactor, self.s.reactor.getThreadPool(), verify_password,
            admin.password_hash if admin else DUMMY_HASH, password,
        )  # fmt: skip
        return admin, ok

    async def logout(self, call: Call) -> Response:
        self.sessions.end(call.principal)
        return redirect("/login", [self.sessions.cookie(None)])
