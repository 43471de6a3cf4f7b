"""The accounts' pages: the list with a form to add one, and one account's users,
settings and removal."""

from __future__ import annotations

from twisted.web.template import tags

from mailrelay.web import forms, ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages, account_path, user_path
from mailrelay.web.routing import Call, HttpError, Response
from mailrelay.web.templates import Node, csrf_field, error, link, post_button, table, text_input


class AccountPages(Pages):
    def register(self, add) -> None:
        add("GET", "/accounts", self.accounts, account=t.LISTED)
        add("POST", "/accounts", self.add_account, account=t.RELAY_WIDE)
        add("GET", "/accounts/{name}", self.account_form, account=t.account(t.path("name")))
        add("POST", "/accounts/{name}", self.save_account, account=t.RELAY_WIDE)
        add("POST", "/accounts/{name}/delete", self.delete_account, account=t.RELAY_WIDE)

    async def accounts(self, call: Call, message: str = "", status: int = 200) -> Response:
        accounts = await ops.list_accounts(self.s, call.account)
        rows = [[link(account_path(a["name"]), a["name"]),
                 tags.span(a["domains"] or "-", class_="mono"), a["notify"] or "-",
                 tags.span(a["bounce_domain"] or "-", class_="mono"), a["note"],
                 len(a["users"])] for a in accounts]  # fmt: skip
        body: list[Node] = [error(message),
                            table(["Account", "Domains", "Notify", "Bounce domain", "Note",
                                   "Users"], rows)]
        if self.s.users is not None:
            body += [
                tags.h2("Add an account"),
                tags.form(
                    csrf_field(call.principal.csrf),
                    tags.div(text_input("name", "Name", required=True),
                             text_input("domains", "Authorized domains", hint="a.com;b.com"),
                             text_input("notify", "Notification address"),
                             text_input("bounce_domain", "Bounce domain",
                                        hint="bounces.a.com"),
                             *_quota_inputs({}),
                             text_input("note", "Note"), class_="grid"),
                    tags.div(tags.button("Add account", type="submit", id="add-account"),
                             class_="actions"),
                    method="post", action="/accounts", class_="card"),
            ]  # fmt: skip
        return self.render(call, "Accounts", body, "/accounts", status)

    async def add_account(self, call: Call) -> Response:
        try:
            doc = await ops.add_account(self.s, forms.account(call.form(), new=True))
        except HttpError as e:
            if e.status not in (400, 409):
                raise
            return await self.accounts(call, e.message, e.status)
        return self.done(call, "/accounts", f"Added account {doc['name']}.")

    async def account_form(self, call: Call, message: str = "", status: int = 200) -> Response:
        doc = await ops.get_account(self.s, call.params["name"])
        path = account_path(doc["name"])
        csrf = call.principal.csrf
        users = [[", " if i else "", link(user_path(u), u)] for i, u in enumerate(doc["users"])]
        body: list[Node] = [error(message), tags.p("Users: ", users or "none")]
        if self.s.users is None:
            body.append(tags.p(ops.LDAP_MANAGED, class_="flash"))
        else:
            body += [
                tags.form(
                    csrf_field(csrf),
                    tags.div(
                        text_input("domains", "Authorized domains", doc["domains"],
                                   "a.com;b.com"),
                        text_input("notify", "Notification address", doc["notify"] or ""),
                        text_input("bounce_domain", "Bounce domain", doc["bounce_domain"] or "",
                                   "bounces.a.com"),
                        *_quota_inputs(doc),
                        text_input("note", "Note", doc["note"]), class_="grid"),
                    tags.div(tags.button("Save", type="submit"), class_="actions"),
                    method="post", action=path, class_="card"),
                post_button(path + "/delete", "Delete account", csrf, "danger"),
            ]  # fmt: skip
        return self.render(call, f"Account {doc['name']}", body, "/accounts", status)

    async def save_account(self, call: Call) -> Response:
        name = call.params["name"]
        try:
            await ops.edit_account(self.s, name, forms.account(call.form(), new=False))
        except HttpError as e:
            if e.status not in (400, 409):
                raise
            return await self.account_form(call, e.message, e.status)
        return self.done(call, account_path(name), "Saved.")

    async def delete_account(self, call: Call) -> Response:
        name = call.params["name"]
        try:
            await ops.delete_account(self.s, name)
        except HttpError as e:
            if e.status != 409:
                raise
            return await self.account_form(call, e.message, e.status)
        return self.done(call, "/accounts", f"Deleted account {name}.")


def _quota_inputs(doc: dict) -> list[Node]:
    """The account's quotas: messages its users send together; empty: none."""
    return [text_input(f"quota_{p}", f"Quota per {p}", doc.get(f"quota_{p}") or "",
                       f"messages per UTC {p}, all its users; empty: none", kind="number")
            for p in ("day", "month")]
