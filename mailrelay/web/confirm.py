"""The public pages of sender verification: ``/verify/TOKEN`` (the link mailed to a new
sender address). GET shows what would be confirmed and a button; only the POST confirms,
because mail scanners follow links. A token that does not verify or has expired gets 404.
"""

from __future__ import annotations

from mailrelay.verification import VerificationError
from mailrelay.web import ops
from mailrelay.web.html import h, page
from mailrelay.web.routing import Call, HttpError, Response

HTML = "text/html; charset=utf-8"
CSP = "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'"


def _page(title: str, body: str, status: int = 200) -> Response:
    headers = {"content-security-policy": CSP, "cache-control": "no-store",
               "referrer-policy": "no-referrer"}  # fmt: skip
    return Response(status, page(title, body).encode(), HTML, headers)


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
        body = (
            f"<p>Allow the SMTP user <strong>{h(claim.username)}</strong> of this relay to "
            f"send mail as <strong>{h(claim.address)}</strong>?</p>"
            '<form method="post" action="" class="card"><div class="actions">'
            '<button type="submit" id="confirm">Confirm</button></div></form>'
            "<p>If you did not expect this, close this page: nothing changes.</p>"
        )
        return _page("Confirm a sender address", body)

    async def confirm(self, call: Call) -> Response:
        claim = self._claim(call)
        if await ops.confirm(self.s, claim.username, claim.address):
            text = f"{h(claim.address)} is confirmed: user {h(claim.username)} may send as it."
        else:
            text = f"{h(claim.address)} has nothing left to confirm for {h(claim.username)}."
        return _page("Sender confirmed", f"<p>{text}</p>")
