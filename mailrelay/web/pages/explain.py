"""The explain page: a form (user, envelope sender, From: header, recipients, size) and
what the relay would answer at each step, with the rule that decided (ops.explain, the
API's POST /api/v1/explain)."""

from __future__ import annotations

from twisted.web.template import tags

from mailrelay.manage.explain import quota_text
from mailrelay.web import forms, ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages
from mailrelay.web.routing import Call, HttpError, Response
from mailrelay.web.templates import Node, csrf_field, error, table, text_input


class ExplainPages(Pages):
    def register(self, add) -> None:
        add("GET", "/explain", self.form, account=t.SESSION)
        add("POST", "/explain", self.explain, account=t.user(t.body("username")))

    async def form(self, call: Call) -> Response:
        return self._page(call, {"username": call.arg("username") or ""})

    async def explain(self, call: Call) -> Response:
        values = call.form()
        try:
            doc = await ops.explain(self.s, forms.explain(values))
        except HttpError as e:
            if e.status not in (400, 404):
                raise
            return self._page(call, values, message=e.message, status=e.status)
        return self._page(call, values, doc)

    def _page(self, call: Call, values: dict[str, str], doc=None, message: str = "",
              status: int = 200) -> Response:  # fmt: skip
        body: list[Node] = [error(message)]
        if doc is not None:
            verdict = "accepted" if doc["accepted"] else "refused"
            limits = doc["limits"]
            if isinstance(limits, dict):
                limits = "; ".join([f"rate limit: {limits['used_hour']} counted this hour, "
                                    f"{limits['used_minute']} this minute",
                                    *map(quota_text, limits.get("quota", []))])
            body += [
                tags.p(f"{doc['user']} sending from <{doc['sender']}>: would be {verdict}.",
                       class_="verdict"),
                table(["Step", "Reply", "Rule"],
                      [[s["step"], tags.code(s["reply"]), s["rule"]] for s in doc["steps"]]),
                tags.p(limits),
            ]
        v = values.get
        body.append(tags.form(
            csrf_field(call.principal.csrf),
            tags.div(text_input("username", "User", v("username", ""), required=True),
                     text_input("sender", "Envelope sender (MAIL FROM)", v("sender", ""),
                                required=True),
                     text_input("from_header", "From: header", v("from_header", ""),
                                hint="empty: the envelope sender"),
                     text_input("ip", "Client address", v("ip", ""),
                                hint="empty: not asked"),
                     text_input("recipients", "Recipients", v("recipients", "1"),
                                kind="number"),
                     text_input("size", "Size (bytes)", v("size", ""), kind="number",
                                hint="empty: no SIZE= given"),
                     class_="grid"),
            tags.div(tags.button("Explain", type="submit"), class_="actions"),
            method="post", action="/explain", class_="card"))
        return self.render(call, "Explain", body, "/explain", status)
