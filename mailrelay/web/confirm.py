"""The public pages of sender verification: ``/verify/TOKEN`` (the link mailed to a new
sender address). GET shows what would be confirmed and a button; only the POST confirms,
because mail scanners follow links. A token that does not verify or has expired gets 404.
"""

from __future__ import annotations

from twisted.web.template import tags

from mailrelay.verification import VerificationError
from mailrelay.web import ops
from mailrelay.web.routing import Call, HttpError, Response
from mailrelay.web.templates import Node, page

HTML = "text/html; charset=utf-8"
CSP = "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'"


def _page(title: str, body: Node, status: int = 200) -> Response:
    headers = {"content-security-policy": CSP, "cache-control": "no-store",
               "referrer-policy": "no-referrer"}  # fmt: skip
    return Response(status, page(title, body), HTML, headers)


class ConfirmPages:
    def __init__(self, services: ops.Services) -> None:
        self.s = services

    def _claim(self, call: Call):
        if self.s.verifier is None:
            raise HttpError(404, "sender verification is switched off")
        try:
            return self.s.verifier.tokens.check_link(call.params["token"],
                                                     self.s.reactor.seconds())  # fmt: skip
        except VerificationError as e:
            raise HttpError(404, str(e))

    async def show(self, call: Call) -> Response:
        claim = self._claim(call)
        body = [
            tags.p("Allow the SMTP user ", tags.strong(claim.username), " of this relay to "
                   "send mail as ", tags.strong(claim.address), "?"),
            tags.form(tags.div(tags.button("Confirm", type="submit", id="confirm"),
                               class_="actions"), method="post", action="", class_="card"),
            tags.p("If you did not expect this, close this page: nothing changes."),
        ]  # fmt: skip
        return _page("Confirm a sender address", body)

    async def confirm(self, call: Call) -> Response:
        claim = self._claim(call)
        if await ops.confirm(self.s, claim.username, claim.address):
            text = f"{claim.address} is confirmed: user {claim.username} may send as it."
        else:
            text = f"{claim.address} has nothing left to confirm for {claim.username}."
        return _page("Sender confirmed", tags.p(text))
