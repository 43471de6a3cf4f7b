"""The suppression list's page: every suppressed address with a button to remove it, and
a form to add one (for a user, an account or everyone)."""

from __future__ import annotations

from twisted.web.template import tags

from mailrelay.web import forms, ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages
from mailrelay.web.routing import Call, HttpError, Response
from mailrelay.web.templates import Node, csrf_field, error, post_button, table, text_input, when


class SuppressionPages(Pages):
    def register(self, add) -> None:
        named = t.level(t.body("user"), t.body("account"))  # neither: the global list
        add("GET", "/suppressions", self.suppressions, account=t.LISTED)
        add("POST", "/suppressions", self.add_suppression, account=named)
        add("POST", "/suppressions/delete", self.delete_suppression, account=named)

    async def suppressions(self, call: Call, message: str = "", status: int = 200) -> Response:
        entries = await ops.list_suppressions(self.s, within=call.account)
        csrf = call.principal.csrf
        rows = [[e["address"], e["account"] or "(global)", e["user"] or "(all users)",
                 e["reason"], when(e["created"]),
                 post_button("/suppressions/delete", "Remove", csrf, "danger",
                             {"address": e["address"], "user": e["user"] or "",
                              "account": "" if e["user"] else e["account"] or ""})]
                for e in entries]  # fmt: skip
        body: list[Node] = [
            error(message),
            table(["Address", "Account", "User", "Reason", "Since"], rows) if rows else
            tags.p("No suppressed addresses."),
            tags.h2("Suppress an address"),
            tags.form(
                csrf_field(csrf),
                tags.div(text_input("address", "Address", required=True),
                         text_input("user", "For user", hint="empty: see account"),
                         text_input("account", "For account",
                                    hint="both empty: the global list"), class_="grid"),
                tags.div(tags.button("Suppress", type="submit"), class_="actions"),
                method="post", action="/suppressions", class_="card"),
        ]  # fmt: skip
        return self.render(call, "Suppressions", body, "/suppressions", status)

    async def add_suppression(self, call: Call) -> Response:
        doc = forms.suppression(call.form())
        try:
            await ops.add_suppression(self.s, doc)
        except HttpError as e:
            if e.status not in (400, 404, 409):
                raise
            return await self.suppressions(call, e.message, e.status)
        return self.done(call, "/suppressions", f"Suppressed {doc['address']}.")

    async def delete_suppression(self, call: Call) -> Response:
        doc = forms.suppression(call.form())
        await ops.delete_suppression(self.s, doc["address"], doc["user"], doc["account"])
        return self.done(call, "/suppressions", f"Removed {doc['address']}.")
