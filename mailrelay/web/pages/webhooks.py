"""The webhooks page: the accounts' endpoints (add, rotate the secret, enable after a 410,
delete) and the events that could not be sent, each with a button to send it again."""

from __future__ import annotations

import re

from twisted.web.template import tags

from mailrelay.web import ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages
from mailrelay.web.routing import Call, HttpError, Response
from mailrelay.web.templates import Node, csrf_field, error, post_button, table, text_input, when

PAGE = "/webhooks"


def _names(text: str) -> list[str]:
    return [n for n in re.split(r"[\s,;]+", text.strip()) if n]


class WebhookPages(Pages):
    def register(self, add) -> None:
        endpoint, event = t.webhook(t.body("id")), t.failed_event(t.body("id"))
        add("GET", PAGE, self.webhooks, account=t.LISTED)
        add("POST", PAGE, self.add_webhook, account=t.account(t.body("account")))
        add("POST", "/webhooks/delete", self.delete_webhook, account=endpoint)
        add("POST", "/webhooks/rotate", self.rotate_secret, account=endpoint)
        add("POST", "/webhooks/enable", self.enable, account=endpoint)
        add("POST", "/webhooks/retry", self.retry, account=event)

    async def webhooks(self, call: Call, message: str = "", status: int = 200) -> Response:
        endpoints = await ops.list_webhooks(self.s, None, call.account)
        failed = await ops.failed_webhooks(self.s, None, call.account)
        csrf = call.principal.csrf

        def button(action: str, label: str, value: int, css: str = "") -> Node:
            return post_button(f"/webhooks/{action}", label, csrf, css, {"id": str(value)})

        rows = [[str(e["id"]), e["account"], e["url"], ", ".join(e["users"]) or "all",
                 ", ".join(e["events"]) or "all",
                 "enabled" if e["enabled"] else f"disabled: {e['disabled_reason']}",
                 [button("rotate", "Rotate secret", e["id"]),
                  "" if e["enabled"] else button("enable", "Enable", e["id"]),
                  button("delete", "Delete", e["id"], "danger")]]
                for e in endpoints]  # fmt: skip
        failed_rows = [[str(d["id"]), d["account"], str(d["endpoint"]), d["type"],
                        when(d["created"]), str(d["attempts"]), d["last_error"],
                        button("retry", "Retry", d["id"])] for d in failed]  # fmt: skip
        body: list[Node] = [
            error(message),
            table(["ID", "Account", "URL", "Users", "Events", "State", ""], rows) if rows
            else tags.p("No webhook endpoints."),
            tags.h2("Add an endpoint"),
            tags.form(
                csrf_field(csrf),
                tags.div(text_input("account", "Account", call.account or "", required=True),
                         text_input("url", "URL", required=True, hint="https://..."),
                         text_input("users", "Only these SMTP users", hint="empty: all"),
                         text_input("events", "Only these events",
                                    hint="e.g. message.bounced message.complained; empty: all"),
                         class_="grid"),
                tags.div(tags.button("Add", type="submit"), class_="actions"),
                method="post", action=PAGE, class_="card"),
            tags.h2("Failed events"),
            table(["ID", "Account", "Endpoint", "Event", "Created", "Attempts", "Last error",
                   ""], failed_rows) if failed_rows else tags.p("No failed events."),
        ]  # fmt: skip
        return self.render(call, "Webhooks", body, PAGE, status)

    async def _refused(self, call: Call, change) -> Response | None:
        try:
            await change
        except HttpError as e:
            if e.status not in (400, 404, 409):
                raise
            return await self.webhooks(call, e.message, e.status)
        return None

    async def add_webhook(self, call: Call) -> Response:
        form = call.form()
        doc = {"account": form.get("account", "").strip(), "url": form.get("url", ""),
               "users": _names(form.get("users", "")), "events": _names(form.get("events", ""))}
        try:
            added = await ops.add_webhook(self.s, doc, call.account)
        except HttpError as e:
            if e.status not in (400, 404):
                raise
            return await self.webhooks(call, e.message, e.status)
        return self.done(call, PAGE, f"Added endpoint {added['id']}; its secret (shown only "
                         f"now): {added['secrets'][0]}")

    async def delete_webhook(self, call: Call) -> Response:
        number = call.form().get("id", "")
        await ops.delete_webhook(self.s, number, call.account)
        return self.done(call, PAGE, f"Deleted endpoint {number}.")

    async def rotate_secret(self, call: Call) -> Response:
        doc = await ops.rotate_webhook_secret(self.s, call.form().get("id", ""),
                                              call.account)
        return self.done(call, PAGE, f"New secret of endpoint {doc['id']} (shown only now): "
                         f"{doc['secrets'][0]}; the old one signs too for a while.")

    async def enable(self, call: Call) -> Response:
        doc = await ops.enable_webhook(self.s, call.form().get("id", ""), call.account)
        return self.done(call, PAGE, f"Endpoint {doc['id']} enabled.")

    async def retry(self, call: Call) -> Response:
        number = call.form().get("id", "")
        refused = await self._refused(call, ops.retry_webhook(self.s, number, call.account))
        return refused or self.done(call, PAGE, f"Event {number} will be sent again.")
