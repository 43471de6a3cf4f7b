"""A small router over twisted.web: ``METHOD /path/{param}`` -> ``async def handler(call)``.

The API and the web page each have a table of routes; a handler gets a Call (the request,
its path parameters, query and body) and returns a Response. Each route also says how the
account of its object is found (``account=``, see tenancy.py), checked before it runs.
Handlers run as coroutines (Deferreds underneath), so a slow directory or SQLite query
never blocks the reactor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, server

log = Logger()

MAX_BODY = 1 << 20  # bytes: more is refused with 413 before it is parsed


class HttpError(Exception):
    """Answer with ``status`` and ``message`` (JSON for the API, a page for the panel)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: list[str] = field(default_factory=list)  # full Set-Cookie values


def json_response(value: Any, status: int = 200, **headers: str) -> Response:
    body = json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    return Response(status, body, headers=headers)


class Call:
    """One request as a handler sees it."""

    def __init__(self, request, params: dict[str, str]) -> None:
        self.request = request
        self.params = params
        self.principal: Any = None  # set by the authentication of the API or the panel
        self.query = _query_only(request)

    @property
    def method(self) -> str:
        return request_method(self.request)

    @property
    def account(self) -> str | None:
        """The one account the caller may manage (an admin or API key limited with
        ``--account``); None: every account."""
        return getattr(self.principal, "account", None)

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def header(self, name: str) -> str | None:
        value = self.request.getHeader(name)
        return value if value is None else str(value)

    def body(self) -> bytes:
        self.request.content.seek(0)
        return self.request.content.read(MAX_BODY + 1)

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; HttpError 400 otherwise."""
        ctype = (self.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, "send the body as application/json")
        try:
            value = json.loads(self.body())
        except ValueError as e:
            raise HttpError(400, f"the body is not valid JSON: {e}")
        if not isinstance(value, dict):
            raise HttpError(400, "the body must be a JSON object")
        return value

    def fields(self) -> dict[str, Any]:
        """The body's fields, JSON or a form; {} for a JSON body the handler will refuse."""
        ctype = (self.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self.form()
        try:
            return self.json()
        except HttpError:
            return {}

    def form(self) -> dict[str, str]:
        """An application/x-www-form-urlencoded body, last value of each field."""
        return {
            k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace")
            for k, v in (self.request.args or {}).items()
        }


def _query_only(request) -> dict[str, list[str]]:
    _, _, query = request.uri.partition(b"?")
    return parse_qs(query.decode("utf-8", "replace"), keep_blank_values=True)


def request_method(request) -> str:
    return request.method.decode("ascii", "replace").upper()


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    handler: Handler
    query: tuple[str, ...] = ()  # the query parameters it takes
    account: Any = None  # how its object's account is found (tenancy.py); None: undeclared
    template: str = ""  # the path as added, "/users/{username}"


class Router:
    """Routes under a prefix; ``{name}`` matches one path segment (percent-decoded)."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, path: str, handler: Handler, query: tuple[str, ...] = (),
            account: Any = None) -> None:  # fmt: skip
        """``account``: the route's tenancy rule; a route without one is refused to every
        account-limited admin (and fails tests/test_web_tenancy.py)."""
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", re.escape(path).replace(r"\{", "{")
                       .replace(r"\}", "}"))
        self.routes.append(Route(method, re.compile(regex + "$"), handler, query, account,
                                 path))  # fmt: skip

    def route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route and its path parameters; HttpError 404 or 405 (with the allowed ones)."""
        allowed = []
        for route in self.routes:
            m = route.pattern.match(path)
            if m is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {k: unquote(v) for k, v in m.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise HttpError(405, f"{method} is not allowed here", allow=sorted(set(allowed)))
        raise HttpError(404, "no such resource")


def run_handler(
    request,
    respond: Callable[[], Awaitable[Response]],
    on_error: Callable[[Any, HttpError], Response],
) -> int:
    """Run ``respond()`` and write what it returns; HttpError and unexpected failures are
    turned into a Response by ``on_error``. Returns NOT_DONE_YET for twisted.web."""
    gone: list = []
    request.notifyFinish().addErrback(gone.append)

    def write(response: Response) -> None:
        if gone:
            return
        request.setResponseCode(response.status)
        request.setHeader(b"content-type", response.content_type.encode())
        for name, value in response.headers.items():
            request.setHeader(name.encode(), value.encode())
        for cookie in response.cookies:
            request.responseHeaders.addRawHeader(b"set-cookie", cookie.encode())
        request.setHeader(b"content-length", str(len(response.body)).encode())
        if request.method != b"HEAD":
            request.write(response.body)
        request.finish()

    def failed(failure) -> Response:
        if failure.check(HttpError):
            return on_error(request, failure.value)
        from mailrelay.interfaces import DirectoryUnavailable

        if failure.check(DirectoryUnavailable):
            return on_error(
                request,
                HttpError(503, f"the directory cannot answer now: {failure.getErrorMessage()}"),
            )
        from mailrelay.postgres.db import UNAVAILABLE
        from mailrelay.postgres.unavailable import Unavailable

        if failure.check(Unavailable, *UNAVAILABLE):  # [cluster] postgres is away
            why = failure.getErrorMessage().strip().splitlines()[0:1] or ["unreachable"]
            return on_error(request, HttpError(503, f"PostgreSQL cannot answer now: {why[0]}"))
        log.failure("control panel request {method} {uri} failed", failure,
                    method=request.method, uri=request.uri)
        return on_error(request, HttpError(500, "internal error (see the relay's log)"))

    d = defer.ensureDeferred(respond())
    d.addErrback(failed).addCallback(write)
    d.addErrback(lambda f: log.failure("cannot write the response", f))
    return server.NOT_DONE_YET


def reason(status: int) -> str:
    return http.RESPONSES.get(status, b"").decode() or str(status)
