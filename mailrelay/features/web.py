"""The tracking listener's resources: open pixel, click redirect, unsubscribe.

``GET /o/TOKEN`` records an open and returns a 1x1 GIF; ``GET /c/TOKEN`` records a click
and redirects (302) to the URL signed inside the token, and nowhere else; ``GET /u/TOKEN``
shows a confirmation form and ``POST /u/TOKEN`` with ``List-Unsubscribe=One-Click``
(RFC 8058; the form sends the same) adds the recipient to the user's suppression list. A
token that does not verify, or of the wrong kind, gets 404: nothing is recorded. GETs never
unsubscribe, because mail scanners follow links. What is recorded is reported too
(mailrelay/events.py): ``message.opened``, ``message.clicked``, ``message.unsubscribed``
(a recipient already unsubscribed is not reported again).
"""

from __future__ import annotations

import html
import re
from urllib.parse import quote

from twisted.internet import threads
from twisted.logger import Logger
from twisted.web import http, resource, server

from mailrelay.events import NO_EVENTS, EventKind
from mailrelay.features.stats import Event, StatsRecorder
from mailrelay.features.suppressions import Reason, SuppressionStore
from mailrelay.features.tokens import Kind, Token, TokenError, TokenSigner

log = Logger()

GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em">
<h1 style="font-size:1.3em">{title}</h1>{body}</body></html>
"""
_FORM = (
    "<p>Stop sending messages from this sender to <strong>{address}</strong>?</p>"
    '<form method="post" action="">'
    '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
    '<button type="submit">Unsubscribe</button></form>'
)


class TrackingRoot(resource.Resource):
    """Mount at the listener's root (or under the path that ``base_url`` names)."""

    def __init__(
        self,
        signer: TokenSigner,
        suppressions: SuppressionStore,
        stats: StatsRecorder,
        reactor,
        threadpool=None,
        events=NO_EVENTS,
    ) -> None:
        super().__init__()
        self.putChild(b"o", _Open(signer, stats, events))
        self.putChild(b"c", _Click(signer, stats, events))
        self.putChild(b"u", _Unsubscribe(signer, stats, events, suppressions, reactor,
                                         threadpool))

    def getChild(self, path, request):
        return self  # anything else: rendered as 404 below

    def render(self, request):
        return _error(request, http.NOT_FOUND)


class _TokenResource(resource.Resource):
    isLeaf = True
    kind: Kind

    def __init__(self, signer: TokenSigner, stats: StatsRecorder, events) -> None:
        super().__init__()
        self.signer = signer
        self.stats = stats
        self.events = events  # IEventSink

    def token(self, request) -> Token | None:
        _private(request)
        if len(request.postpath) != 1:
            return None
        try:
            return self.signer.verify(request.postpath[0].decode("ascii"), self.kind)
        except (TokenError, UnicodeDecodeError):
            return None

    def track(self, event: Event, token: Token, url: str | None = None) -> None:
        self.stats.track(event, token.account, token.user, token.queue_id, token.recipient, url=url)
        data = {"queue_id": token.queue_id, "recipient": token.recipient}
        if url is not None:
            data["url"] = url
        self.events.emit(_KINDS[event], token.account, token.user, data)


_KINDS = {Event.OPENS: EventKind.OPENED, Event.CLICKS: EventKind.CLICKED,
          Event.UNSUBSCRIBES: EventKind.UNSUBSCRIBED}


class _Open(_TokenResource):
    kind = Kind.OPEN

    def render_GET(self, request):
        token = self.token(request)
        if token is None:
            return _error(request, http.NOT_FOUND)
        self.track(Event.OPENS, token)
        request.setHeader(b"content-type", b"image/gif")
        return GIF


class _Click(_TokenResource):
    kind = Kind.CLICK

    def render_GET(self, request):
        token = self.token(request)
        if token is None or not _redirectable(token.url):
            return _error(request, http.NOT_FOUND)
        self.track(Event.CLICKS, token, token.url)
        # Location is ASCII: an IRI's other characters are sent percent-encoded (RFC 3987).
        request.redirect(quote(token.url, safe=_URL_SAFE).encode("ascii"))
        return b""


class _Unsubscribe(_TokenResource):
    kind = Kind.UNSUBSCRIBE

    def __init__(self, signer, stats, events, suppressions, reactor, threadpool) -> None:
        super().__init__(signer, stats, events)
        self.suppressions = suppressions
        self.reactor = reactor
        self.threadpool = threadpool

    def render_GET(self, request):
        token = self.token(request)
        if token is None:
            return _error(request, http.NOT_FOUND)
        return _page(request, "Unsubscribe", _FORM.format(address=html.escape(token.recipient)))

    def render_POST(self, request):
        token = self.token(request)
        if token is None:
            return _error(request, http.NOT_FOUND)
        if request.args.get(b"List-Unsubscribe") != [b"One-Click"]:
            return _error(request, http.BAD_REQUEST)
        gone = []
        request.notifyFinish().addBoth(gone.append)
        pool = self.threadpool or self.reactor.getThreadPool()
        d = threads.deferToThreadPool(
            self.reactor,
            pool,
            self.suppressions.add,
            token.recipient,
            token.account,
            token.user,
            Reason.UNSUBSCRIBE,
        )

        def added(new: bool) -> None:
            log.info(
                "unsubscribed {recipient} from {account}/{user} (queue id {queue_id})",
                recipient=token.recipient,
                account=token.account,
                user=token.user,
                queue_id=token.queue_id,
                already=not new,
            )
            if new:
                self.track(Event.UNSUBSCRIBES, token)
            if not gone:
                body = f"<p>{html.escape(token.recipient)} will get no more of these messages.</p>"
                request.write(_page(request, "Unsubscribed", body))
                request.finish()

        def failed(failure) -> None:
            log.failure("unsubscribe of {recipient} not saved", failure, recipient=token.recipient)
            if not gone:
                request.write(_error(request, http.SERVICE_UNAVAILABLE))
                request.finish()

        d.addCallbacks(added, failed)
        return server.NOT_DONE_YET


def _redirectable(url: str | None) -> bool:
    return bool(url) and url.startswith(("https://", "http://")) and url.isprintable()


def _private(request) -> None:
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-content-type-options", b"nosniff")


def _page(request, title: str, body: str) -> bytes:
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'")
    return _PAGE.format(title=html.escape(title), body=body).encode("utf-8")


def _error(request, code: int) -> bytes:
    request.setResponseCode(code)
    _private(request)
    return _page(request, http.RESPONSES[code].decode(), "")


class _RedactedRequest:
    """The request as the access log sees it: tokens (which name the recipient) removed."""

    _TOKEN = re.compile(rb"/([ocu])/[^/?#]+")

    def __init__(self, request) -> None:
        self._request = request
        self.uri = self._TOKEN.sub(rb"/\1/-", request.uri)

    def __getattr__(self, name):
        return getattr(self._request, name)


def make_site(root: resource.Resource) -> server.Site:
    """A Site for the tracking listener whose access log does not show tokens."""
    return server.Site(
        root,
        logFormatter=lambda ts, request: http.combinedLogFormatter(ts, _RedactedRequest(request)),
    )
