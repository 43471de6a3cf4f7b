"""What every page of the panel shares: the HTML response with its headers, redirects,
and rendering a page in a logged-in session (its navigation and messages)."""

from __future__ import annotations

from urllib.parse import quote

from mailrelay.web import ops
from mailrelay.web.routing import Call, Response
from mailrelay.web.sessions import Session
from mailrelay.web.templates import Node, page

HTML = "text/html; charset=utf-8"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")  # fmt: skip


def html_response(body: bytes, status: int = 200, **headers: str) -> Response:
    return Response(status, body, HTML,
                    {"content-security-policy": CSP, "cache-control": "no-store", **headers})


def redirect(location: str, cookies: list[str] | None = None) -> Response:
    return Response(303, b"", HTML, {"location": location}, cookies or [])


def user_path(username: str, suffix: str = "") -> str:
    return f"/users/{quote(username, safe='@')}{suffix}"


def account_path(name: str) -> str:
    return f"/accounts/{quote(name)}"


class Pages:
    """A topic's pages; ``register`` adds its routes to the panel's router."""

    def __init__(self, services: ops.Services) -> None:
        self.s = services

    def register(self, add) -> None:
        raise NotImplementedError

    def render(self, call: Call, title: str, body: Node, current: str = "",
               status: int = 200) -> Response:  # fmt: skip
        """The page in the caller's session, with the messages left for it by ``done``."""
        session: Session = call.principal
        flash, session.flash = session.flash, []
        return html_response(page(title, body, session.admin, session.csrf, flash, current),
                             status)  # fmt: skip

    @staticmethod
    def done(call: Call, location: str, message: str) -> Response:
        """After a change: back to ``location``, which shows ``message`` once."""
        call.principal.flash.append(message)
        return redirect(location)
