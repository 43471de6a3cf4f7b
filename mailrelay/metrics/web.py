"""/metrics over HTTP: prometheus-client's Twisted resource behind an optional bearer token.

Served by the control panel's listener (``[metrics] endpoint = admin``, the default: the
panel routes /metrics here) or by a listener of its own (``metrics_site``). The exposition
is made in the reactor's thread pool, so a scrape never holds the reactor.
"""

from __future__ import annotations

import hmac

from prometheus_client.twisted import MetricsResource
from twisted.web import resource, server


class MetricsPage(resource.Resource):
    """GET /metrics; with a ``token``, only for ``Authorization: Bearer <token>``. Not a
    leaf: a path below it is not found."""

    def __init__(self, registry, token: str = "") -> None:
        super().__init__()
        self._exposition = MetricsResource(registry)
        self._token = token.encode("utf-8")

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b"method not allowed\n"
        if self._token and not self._authorized(request.getHeader(b"authorization") or b""):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="metrics"')
            return b"a bearer token is required\n"
        return self._exposition.render(request)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)


class MetricsRoot(resource.Resource):
    """The root of a listener of its own: /metrics, and 404 for everything else."""

    def __init__(self, page: MetricsPage) -> None:
        super().__init__()
        self.putChild(b"metrics", page)

    def render(self, request):
        request.setResponseCode(404)
        return b"not found\n"


def metrics_site(page: MetricsPage) -> server.Site:
    site = server.Site(MetricsRoot(page))
    site.displayTracebacks = False
    site.noisy = False
    return site
