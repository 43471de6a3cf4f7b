"""The SMTP users' pages: the list, adding a user, a user's settings and senders, its
password and removal (its statistics are in stats.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.web.template import tags

from mailrelay.model import QUOTA_ACTIONS, Kind, Status, kind_of
from mailrelay.web import forms, ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages, redirect, user_path
from mailrelay.web.routing import Call, HttpError, Response
from mailrelay.web.templates import (
    Node,
    checkbox,
    csrf_field,
    error,
    link,
    post_button,
    select,
    table,
    text,
    text_input,
    when,
)

REFUSALS = (400, 409)  # shown above the form with what was typed


class UserPages(Pages):
    def register(self, add) -> None:
        user = t.user(t.path("username"))
        add("GET", "/users", self.users, account=t.account(t.query("account")))
        add("GET", "/users/new", self.new_user_form, account=t.SESSION)
        add("POST", "/users/new", self.add_user, account=t.NEW_USER)
        add("GET", "/users/{username}", self.user_form, account=user)
        add("POST", "/users/{username}", self.save_user, account=t.CHANGED_USER)
        add("POST", "/users/{username}/password", self.reset_password, account=user)
        add("POST", "/users/{username}/delete", self.delete_user, account=user)
        add("POST", "/users/{username}/senders/{sender}/verify", self.verify_sender,
            account=user)

    async def users(self, call: Call) -> Response:
        users = await ops.list_users(self.s, call.arg("account") or None, call.account)
        rows = []
        for u in users:
            pending = tags.span(f'({len(u["unverified"])} unverified)', class_="pending") \
                if u["unverified"] else ""  # fmt: skip
            rows.append([
                tags.span(u["status"], class_=f'status status-{u["status"]}'),
                link(user_path(u["username"]), u["username"]),
                u["note"],
                [tags.span(u["sender_scope"] or "-", class_="mono"),
                 " " if pending else "", pending],
                u["priority"],
                "default" if u["rate_limit"] is None else f'{u["rate_limit"]}/h',
                when(u["updated"]),
                _last_login(u),
                link(user_path(u["username"], "/stats"), "statistics"),
            ])  # fmt: skip
        body: list[Node] = []
        if self.s.users is None:
            body.append(tags.p(ops.LDAP_MANAGED, class_="flash"))
        else:
            body.append(tags.p(link("/users/new", "Add an SMTP user")))
        body.append(table(["Status", "Username", "Note", "Senders", "Priority", "Rate limit",
                           "Last updated", "Last login", ""], rows, "users")
                    if rows else tags.p("No SMTP users yet."))  # fmt: skip
        return self.render(call, "SMTP users", body, "/users")

    def _user_fields(self, values: dict[str, Any], kind: Kind | None, accounts: list[str],
                     new: bool) -> Node:  # fmt: skip
        v = values.get
        parts = []
        if new:
            parts.append(text_input("username", "Username", v("username", ""),
                                    "a domain (doe.com), an address, or any name", True))
        parts.append(select("account", "Account", accounts, v("account", "default")))
        if kind in (None, Kind.NAMED):
            parts.append(text_input("domains", "Authorized domains", v("domains", ""),
                                    "named users: a.com;b.com"))
            parts.append(text_input("addresses", "Authorized addresses", v("addresses", ""),
                                    "named users: x@a.com;y@b.com"))
        parts += [
            text_input("note", "Note", v("note", "")),
            select("status", "Status", [s.value for s in Status], v("status", "allowed")),
            text_input("priority", "Priority", v("priority", 3), "1 (highest) to 5",
                       kind="number"),
            text_input("rate_limit", "Rate limit", v("rate_limit"),
                       "messages per hour; empty: the default", kind="number"),
            text_input("max_connections", "Max connections", v("max_connections"),
                       "empty: the default", kind="number"),
            text_input("quota_day", "Quota per day", v("quota_day"),
                       "messages per UTC day; empty: the default; 0: none", kind="number"),
            text_input("quota_month", "Quota per month", v("quota_month"),
                       "messages per UTC month; empty: the default; 0: none", kind="number"),
            select("quota_action", "Over quota", list(QUOTA_ACTIONS), v("quota_action", "refuse")),
            text_input("audit_bcc", "Audit BCC", v("audit_bcc", ""), "x@a.com;y@b.com"),
            text_input("bounce_notify", "Bounce notifications", v("bounce_notify", "sender"),
                       "off, sender, or an address"),
            text_input("expires", "Expires", v("expires") or "",
                       "no login after this day (2027-01-31, UTC); empty: never"),
            text_input("allow_from", "Log in only from", v("allow_from", ""),
                       "networks: 203.0.113.0/24;2001:db8::/32; empty: anywhere"),
        ]  # fmt: skip
        toggles = [checkbox(name, label, bool(v(name))) for name, label in forms.TOGGLES]
        return [tags.div(parts, class_="grid"), tags.h2("Features"),
                tags.div(toggles, class_="grid")]  # fmt: skip

    async def _account_names(self, call: Call) -> list[str]:
        """The accounts a user may be put in: the caller's only, when it has one."""
        return [a.name for a, _ in await self.s.manager.accounts(call.account)]

    async def new_user_form(self, call: Call, values: dict | None = None, message: str = "",
                            status: int = 200) -> Response:  # fmt: skip
        ops.writer(self.s)
        kind = kind_of(values["username"]) if values and values.get("username") else None
        body = [
            error(message),
            tags.form(
                csrf_field(call.principal.csrf),
                self._user_fields(values or {}, kind, await self._account_names(call), True),
                tags.div(tags.button("Add user", type="submit", id="add"), class_="actions"),
                method="post", action="/users/new", class_="card"),
            tags.p("A password is generated and shown once. Senders added here must be "
                   "confirmed before use (a link mailed to each address, a DNS TXT record for "
                   "each domain).", class_="muted"),
        ]  # fmt: skip
        return self.render(call, "Add an SMTP user", body, "/users", status)

    async def add_user(self, call: Call) -> Response:
        form = call.form()
        username = form.get("username", "").strip()
        try:
            doc = {"username": username, **forms.user_settings(form, kind_of(username))}
            result = await ops.add_user(self.s, doc)
        except HttpError as e:
            if e.status not in REFUSALS:
                raise
            return await self.new_user_form(call, form, e.message, e.status)
        user = result["user"]
        body = [
            tags.p("Added ", user["kind"], " user ", tags.strong(user["username"]),
                   " to account ", user["account"], "."),
            _password_block(user["username"], result["password"]),
            _verification_block(result["verification"]),
            tags.p(link(user_path(user["username"]), "Settings of this user"), " · ",
                   link("/users", "All users")),
        ]  # fmt: skip
        return self.render(call, "User added", body, "/users")

    async def user_form(self, call: Call, values: dict | None = None, message: str = "",
                        status: int = 200) -> Response:  # fmt: skip
        user, account = await ops.find_user(self.s, call.params["username"])
        doc = await ops.user_with_login(self.s, user, account)
        csrf = call.principal.csrf
        path = user_path(user.username)
        readonly = self.s.users is None
        if readonly:
            settings: Node = [tags.p(ops.LDAP_MANAGED, class_="flash"), _user_summary(doc)]
        else:
            settings = tags.form(
                csrf_field(csrf),
                self._user_fields(values or doc, user.kind, await self._account_names(call),
                                 False),
                tags.div(tags.button("Save", type="submit", id="save"), class_="actions"),
                method="post", action=path, class_="card")  # fmt: skip
        rows = []
        for sd in ops.sender_docs(self.s, user):
            state = tags.span("verified", class_="verified") if sd["verified"] else \
                tags.span("waiting for confirmation", class_="pending")  # fmt: skip
            how: Node = ""
            if not sd["verified"] and sd.get("method") == "dns":
                rec = sd["record"]
                how = ["publish TXT ", tags.code(rec["value"]), " at ", tags.code(rec["name"]),
                       " "]  # fmt: skip
            action: Node = ""
            if not sd["verified"] and not readonly:
                label = "Send the link again" if sd["kind"] == "address" else "Check DNS now"
                action = post_button(f'{path}/senders/{quote(sd["sender"], safe="@")}/verify',
                                     label, csrf, "secondary")  # fmt: skip
            rows.append([tags.span(sd["sender"], class_="mono"), sd["kind"], state,
                         [how, action]])  # fmt: skip
        body = [
            error(message),
            tags.p(f'{doc["kind"]} user · account {doc["account"]} · last updated '
                   f'{when(doc["updated"])} · last login {_last_login(doc)} · ',
                   link(path + "/stats", "statistics"),
                   class_="muted"),
            settings,
            tags.h2("Senders"),
            table(["Sender", "Kind", "State", ""], rows),
        ]  # fmt: skip
        if not readonly:
            body += [
                tags.h2("Password and removal"),
                tags.section(tags.div(
                    post_button(path + "/password", "Reset password", csrf, "secondary"),
                    post_button(path + "/delete", "Delete user", csrf, "danger"),
                    class_="actions"), class_="card"),
            ]  # fmt: skip
        return self.render(call, f"SMTP user {user.username}", body, "/users", status)

    async def save_user(self, call: Call) -> Response:
        user, _ = await ops.find_user(self.s, call.params["username"])
        form = call.form()
        try:
            result = await ops.edit_user(self.s, user.username,
                                         forms.user_settings(form, user.kind))  # fmt: skip
        except HttpError as e:
            if e.status not in REFUSALS:
                raise
            return await self.user_form(call, form, e.message, e.status)
        notes = ["Saved."] + [verification_text(v) for v in result["verification"]]
        call.principal.flash.extend(notes)
        return redirect(user_path(user.username))

    async def reset_password(self, call: Call) -> Response:
        result = await ops.reset_password(self.s, call.params["username"])
        body = [_password_block(result["username"], result["password"]),
                tags.p(link(user_path(result["username"]), "Back to the user"))]  # fmt: skip
        return self.render(call, "New password", body, "/users")

    async def delete_user(self, call: Call) -> Response:
        username = call.params["username"]
        forgotten = await ops.delete_user(self.s, username)
        return self.done(call, "/users", f"Deleted user {username}; its suppressions and "
                                         f"statistics: {forgotten.said()}.")  # fmt: skip

    async def verify_sender(self, call: Call) -> Response:
        username, sender = call.params["username"], call.params["sender"]
        result = await ops.verify_sender(self.s, username, sender)
        if result.get("verified"):
            message = f"{sender} is verified."
        elif result.get("method") == "dns":
            message = (f"No TXT record {result['record']['value']} found at {sender} yet "
                       "(DNS changes can take a while).")  # fmt: skip
        else:
            message = verification_text(result)
        return self.done(call, user_path(username), message)


def _password_block(username: str, password: str) -> Node:
    return [
        tags.p("The password of ", tags.strong(username), " is:"),
        tags.p(tags.span(password, class_="secret", id="password")),
        tags.p("It is shown only this once: only a hash of it is stored.", class_="muted"),
    ]


def verification_text(v: dict[str, Any]) -> str:
    if v.get("method") == "dns":
        rec = v["record"]
        return f"To verify {v['sender']}, publish a TXT record {rec['value']} at {rec['name']}."
    if v.get("error"):
        return f"{v['sender']}: {v['error']}"
    return f"A confirmation link was mailed to {v['sender']}."


def _verification_block(items: list[dict[str, Any]]) -> Node:
    if not items:
        return ""
    return [tags.h2("Sender verification"),
            tags.ul([tags.li(verification_text(v)) for v in items])]  # fmt: skip


def _last_login(doc: dict[str, Any]) -> str:
    if doc.get("last_login") is None:
        return "never"
    return f'{when(doc["last_login"])} from {doc["last_login_ip"]}'


def _user_summary(doc: dict[str, Any]) -> Node:
    keys = ["status", "note", "sender_scope", "priority", "rate_limit", "max_connections",
            "quota_day", "quota_month", "quota_action", "archive", "audit_bcc", "bounce_notify",
            "unsubscribe_footer", "open_tracking", "click_tracking", "expires",
            "allow_from"]  # fmt: skip
    return table(["Setting", "Value"], [[k, text(doc[k])] for k in keys])
