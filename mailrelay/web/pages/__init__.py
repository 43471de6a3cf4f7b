"""The web admin page: server-rendered HTML over the same operations as the API (ops.py).

Every page but the login form, the static stylesheet and the public confirmation links
needs an admin session; every POST carries the session's CSRF token. Each route says how
its object's account is found (``account=``, tenancy.py), so an admin limited to one
account is refused everything else before the page's code runs. A refused change is
shown above the form with what was typed, and changes nothing.

One module per topic (login, users, accounts, queue, suppressions, DKIM, domains,
webhooks, stats, explain), each adding its routes to the router here; this module only
lets a request in or not.
"""

from __future__ import annotations

import importlib.resources

from twisted.web.template import tags

from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.web import ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.accounts import AccountPages
from mailrelay.web.pages.base import html_response, redirect
from mailrelay.web.pages.dkim import DkimPages
from mailrelay.web.pages.domains import DomainPages
from mailrelay.web.pages.explain import ExplainPages
from mailrelay.web.pages.login import LoginPages
from mailrelay.web.pages.queue import QueuePages
from mailrelay.web.pages.stats import StatsPages
from mailrelay.web.pages.suppressions import SuppressionPages
from mailrelay.web.pages.users import UserPages
from mailrelay.web.pages.webhooks import WebhookPages
from mailrelay.web.routing import Call, HttpError, Response, Router, reason
from mailrelay.web.sessions import COOKIE, Sessions
from mailrelay.web.templates import link, page


def _css() -> bytes:
    return importlib.resources.files("mailrelay.web").joinpath("static/panel.css").read_bytes()


class Panel:
    """``logins``: the daemon's LoginGuard, shared with SMTP AUTH."""

    def __init__(self, services: ops.Services, sessions: Sessions, verify_pages,
                 logins: LoginGuard) -> None:  # fmt: skip
        self.s = services
        self.sessions = sessions
        self.verify_pages = verify_pages
        self._css = _css()
        self.router = Router()
        r = self.router.add
        r("GET", "/", self.home, account=t.SESSION)
        r("GET", "/static/panel.css", self.css, account=t.PUBLIC)
        LoginPages(services, sessions, logins).register(r)
        for pages in (UserPages, StatsPages, AccountPages, QueuePages, SuppressionPages,
                      DkimPages, DomainPages, WebhookPages, ExplainPages):
            pages(services).register(r)
        r("GET", "/verify/{token}", self.verify_pages.show, account=t.PUBLIC)
        r("POST", "/verify/{token}", self.verify_pages.confirm, account=t.PUBLIC)

    async def dispatch(self, request, path: str) -> Response:
        method = request.method.decode("ascii", "replace").upper()
        route, params = self.router.route(method, path)
        call = Call(request, params)
        if t.is_public(route):
            return await route.handler(call)
        session = self.sessions.get(request.getCookie(COOKIE.encode()))
        if session is None or session.admin is None:
            if method == "GET":
                return redirect("/login")
            raise HttpError(403, "your session has ended: log in again")
        if method == "POST" and not self.sessions.csrf_ok(session, call.form().get("csrf")):
            raise HttpError(403, "the form was too old or not from this page: reload and retry")
        call.principal = session
        await t.enforce(self.s, route, call)
        return await route.handler(call)

    def error_page(self, request, error: HttpError) -> Response:
        session = self.sessions.get(request.getCookie(COOKIE.encode()))
        admin = session.admin if session else None
        body = [tags.p(error.message, class_="error"), tags.p(link("/users", "Back"))]
        headers = {"allow": ", ".join(error.extra["allow"])} if "allow" in error.extra else {}
        title = f"{error.status} {reason(error.status)}"
        return html_response(page(title, body, admin, session.csrf if session else ""),
                             error.status, **headers)  # fmt: skip

    async def css(self, call: Call) -> Response:
        return Response(200, self._css, "text/css; charset=utf-8",
                        {"cache-control": "max-age=3600"})

    async def home(self, call: Call) -> Response:
        return redirect("/users")
