"""The web admin page: server-rendered HTML over the same operations as the API (ops.py).

Every page but the login form, the static stylesheet and the public confirmation links
needs an admin session; every POST carries the session's CSRF token. A refused change is
shown above the form with what was typed, and changes nothing.
"""

from __future__ import annotations

import importlib.resources
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from twisted.internet import threads
from twisted.logger import Logger

from mailrelay.auth.passwords import DUMMY_HASH, verify_password
from mailrelay.model import Kind, Status, kind_of
from mailrelay.web import ops
from mailrelay.web.html import (
    chart,
    checkbox,
    csrf_field,
    h,
    page,
    post_button,
    select,
    table,
    text_input,
    when,
)
from mailrelay.web.routing import Call, HttpError, Response, Router, reason
from mailrelay.web.sessions import COOKIE, Session, Sessions

log = Logger()

HTML = "text/html; charset=utf-8"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
PUBLIC = ("/login", "/static/panel.css")
TOGGLES = [("archive", "Archive a copy of every message"),
           ("unsubscribe_footer", "Unsubscribe footer"),
           ("open_tracking", "Open tracking"), ("click_tracking", "Click tracking")]  # fmt: skip


def _css() -> bytes:
    return importlib.resources.files("mailrelay.web").joinpath("static/panel.css").read_bytes()


def html_response(text: str, status: int = 200, **headers: str) -> Response:
    return Response(status, text.encode("utf-8"), HTML,
                    {"content-security-policy": CSP, "cache-control": "no-store", **headers})


def redirect(location: str, cookies: list[str] | None = None) -> Response:
    return Response(303, b"", HTML, {"location": location}, cookies or [])


def link(path: str, text: str) -> str:
    return f'<a href="{h(path)}">{h(text)}</a>'


def user_path(username: str, suffix: str = "") -> str:
    return f"/users/{quote(username, safe='@')}{suffix}"


class Panel:
    def __init__(self, services: ops.Services, sessions: Sessions, verify_pages) -> None:
        self.s = services
        self.sessions = sessions
        self.verify_pages = verify_pages
        self._css = _css()
        self.router = Router()
        r = self.router.add
        r("GET", "/", self.home)
        r("GET", "/login", self.login_form)
        r("POST", "/login", self.login)
        r("POST", "/logout", self.logout)
        r("GET", "/static/panel.css", self.css)
        r("GET", "/users", self.users)
        r("GET", "/users/new", self.new_user_form)
        r("POST", "/users/new", self.add_user)
        r("GET", "/users/{username}", self.user_form)
        r("POST", "/users/{username}", self.save_user)
        r("POST", "/users/{username}/password", self.reset_password)
        r("POST", "/users/{username}/delete", self.delete_user)
        r("POST", "/users/{username}/senders/{sender}/verify", self.verify_sender)
        r("GET", "/users/{username}/stats", self.user_stats)
        r("GET", "/accounts", self.accounts)
        r("POST", "/accounts", self.add_account)
        r("GET", "/accounts/{name}", self.account_form)
        r("POST", "/accounts/{name}", self.save_account)
        r("POST", "/accounts/{name}/delete", self.delete_account)
        r("GET", "/queue", self.queue)
        r("GET", "/queue/{queue_id}", self.queued)
        r("POST", "/queue/{queue_id}/retry", self.retry)
        r("POST", "/queue/{queue_id}/delete", self.delete_queued)
        r("GET", "/suppressions", self.suppressions)
        r("POST", "/suppressions", self.add_suppression)
        r("POST", "/suppressions/delete", self.delete_suppression)
        r("GET", "/stats", self.stats)
        r("GET", "/verify/{token}", self.verify_pages.show)
        r("POST", "/verify/{token}", self.verify_pages.confirm)

    # ---- dispatch, sessions, CSRF

    async def dispatch(self, request, path: str) -> Response:
        method = request.method.decode("ascii", "replace").upper()
        handler, params = self.router.match(method, path)
        call = Call(request, params)
        if path in PUBLIC or path.startswith("/verify/"):
            return await handler(call)
        session = self.sessions.get(request.getCookie(COOKIE.encode()))
        if session is None or session.admin is None:
            if method == "GET":
                return redirect("/login")
            raise HttpError(403, "your session has ended: log in again")
        if method == "POST" and not self.sessions.csrf_ok(session, call.form().get("csrf")):
            raise HttpError(403, "the form was too old or not from this page: reload and retry")
        call.principal = session
        return await handler(call)

    def error_page(self, request, error: HttpError) -> Response:
        session = self.sessions.get(request.getCookie(COOKIE.encode()))
        admin = session.admin if session else None
        body = f'<p class="error">{h(error.message)}</p><p>{link("/users", "Back")}</p>'
        headers = {"allow": ", ".join(error.extra["allow"])} if "allow" in error.extra else {}
        title = f"{error.status} {reason(error.status)}"
        return html_response(page(title, body, admin, session.csrf if session else ""),
                             error.status, **headers)  # fmt: skip

    def render(self, call: Call, title: str, body: str, current: str = "",
               status: int = 200) -> Response:  # fmt: skip
        session: Session = call.principal
        flash, session.flash = session.flash, []
        return html_response(page(title, body, session.admin, session.csrf, flash, current),
                             status)  # fmt: skip

    def done(self, call: Call, location: str, message: str) -> Response:
        call.principal.flash.append(message)
        return redirect(location)

    # ---- login

    async def css(self, call: Call) -> Response:
        return Response(200, self._css, "text/css; charset=utf-8",
                        {"cache-control": "max-age=3600"})

    async def home(self, call: Call) -> Response:
        return redirect("/users")

    def _login_page(self, session: Session, error: str = "", status: int = 200) -> Response:
        message = f'<p class="error">{h(error)}</p>' if error else ""
        body = (
            f'<form method="post" action="/login" class="card login">{message}'
            f'{csrf_field(session.csrf)}'
            f'{text_input("name", "Admin name", required=True)}'
            f'{text_input("password", "Password", required=True, kind="password")}'
            '<div class="actions"><button type="submit" id="login">Log in</button></div></form>'
        )
        return html_response(page("Log in", body), status)

    async def login_form(self, call: Call) -> Response:
        session = self.sessions.get(call.request.getCookie(COOKIE.encode()))
        if session is not None and session.admin is not None:
            return redirect("/users")
        session = session or self.sessions.start()
        response = self._login_page(session)
        response.cookies.append(self.sessions.cookie(session))
        return response

    async def login(self, call: Call) -> Response:
        form = call.form()
        session = self.sessions.get(call.request.getCookie(COOKIE.encode()))
        if session is None or not self.sessions.csrf_ok(session, form.get("csrf")):
            session = self.sessions.start()
            response = self._login_page(session, "The login form had expired: try again.", 403)
            response.cookies.append(self.sessions.cookie(session))
            return response
        client = call.request.getClientAddress()
        client = getattr(client, "host", str(client))
        if self.sessions.login_blocked(client):
            return self._login_page(session, "Too many failed logins: wait a few minutes.", 429)
        name, password = form.get("name", ""), form.get("password", "")
        admin = self.s.access.current().admins.get(name)
        ok = await threads.deferToThreadPool(
            self.s.reactor, self.s.reactor.getThreadPool(), verify_password,
            admin.password_hash if admin else DUMMY_HASH, password,
        )  # fmt: skip
        if not ok or admin is None:
            self.sessions.login_failed(client)
            log.warn("control panel: failed login as {name} from {client}", name=name,
                     client=client)  # fmt: skip
            return self._login_page(session, "Wrong admin name or password.", 401)
        self.sessions.login_succeeded(client)
        self.sessions.end(session)
        session = self.sessions.start(admin.name, admin.fingerprint)
        log.info("control panel: {name} logged in from {client}", name=name, client=client)
        return redirect("/users", [self.sessions.cookie(session)])

    async def logout(self, call: Call) -> Response:
        self.sessions.end(call.principal)
        return redirect("/login", [self.sessions.cookie(None)])

    # ---- users

    async def users(self, call: Call) -> Response:
        users = await ops.list_users(self.s, call.arg("account") or None)
        rows = []
        for u in users:
            pending = f' <span class="pending">({len(u["unverified"])} unverified)</span>' \
                if u["unverified"] else ""  # fmt: skip
            rows.append([
                f'<span class="status status-{h(u["status"])}">{h(u["status"])}</span>',
                link(user_path(u["username"]), u["username"]),
                h(u["note"]),
                f'<span class="mono">{h(u["sender_scope"]) or "-"}</span>{pending}',
                h(u["priority"]),
                h("default" if u["rate_limit"] is None else f'{u["rate_limit"]}/h'),
                h(when(u["updated"])),
                link(user_path(u["username"], "/stats"), "statistics"),
            ])  # fmt: skip
        add = "" if self.s.users is None else \
            f'<p>{link("/users/new", "Add an SMTP user")}</p>'  # fmt: skip
        ro = "" if self.s.users is not None else f'<p class="flash">{h(ops.LDAP_MANAGED)}</p>'
        body = ro + add + (table(
            ["Status", "Username", "Note", "Senders", "Priority", "Rate limit",
             "Last updated", ""], rows, "users") if rows else "<p>No SMTP users yet.</p>")
        return self.render(call, "SMTP users", body, "/users")

    def _user_fields(self, values: dict[str, Any], kind: Kind | None, accounts: list[str],
                     new: bool) -> str:  # fmt: skip
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
            text_input("rate_limit", "Rate limit", _blank(v("rate_limit")),
                       "messages per hour; empty: the default", kind="number"),
            text_input("max_connections", "Max connections", _blank(v("max_connections")),
                       "empty: the default", kind="number"),
            text_input("audit_bcc", "Audit BCC", v("audit_bcc", ""), "x@a.com;y@b.com"),
            text_input("bounce_notify", "Bounce notifications", v("bounce_notify", "sender"),
                       "off, sender, or an address"),
        ]  # fmt: skip
        toggles = "".join(checkbox(name, label, bool(v(name))) for name, label in TOGGLES)
        return f'<div class="grid">{"".join(parts)}</div><h2>Features</h2>' \
               f'<div class="grid">{toggles}</div>'  # fmt: skip

    async def _account_names(self) -> list[str]:
        return [a.name for a in await self.s.directory.listAccounts()]

    async def new_user_form(self, call: Call, values: dict | None = None, error: str = "",
                            status: int = 200) -> Response:  # fmt: skip
        ops.writer(self.s)
        message = f'<p class="error">{h(error)}</p>' if error else ""
        kind = kind_of(values["username"]) if values and values.get("username") else None
        body = (
            f'{message}<form method="post" action="/users/new" class="card">'
            f'{csrf_field(call.principal.csrf)}'
            f'{self._user_fields(values or {}, kind, await self._account_names(), True)}'
            '<div class="actions"><button type="submit" id="add">Add user</button></div></form>'
            '<p class="muted">A password is generated and shown once. Senders added here '
            "must be confirmed before use (a link mailed to each address, a DNS TXT record "
            "for each domain).</p>"
        )
        return self.render(call, "Add an SMTP user", body, "/users", status)

    async def add_user(self, call: Call) -> Response:
        form = call.form()
        username = form.get("username", "").strip()
        try:
            doc = {"username": username, **form_settings(form, kind_of(username))}
            result = await ops.add_user(self.s, doc)
        except HttpError as e:
            if e.status != 400 and e.status != 409:
                raise
            return await self.new_user_form(call, form, e.message, e.status)
        user = result["user"]
        body = (
            f'<p>Added {h(user["kind"])} user <strong>{h(user["username"])}</strong> to '
            f'account {h(user["account"])}.</p>'
            f'{_password_block(user["username"], result["password"])}'
            f'{_verification_block(result["verification"])}'
            f'<p>{link(user_path(user["username"]), "Settings of this user")} · '
            f'{link("/users", "All users")}</p>'
        )
        return self.render(call, "User added", body, "/users")

    async def user_form(self, call: Call, values: dict | None = None, error: str = "",
                        status: int = 200) -> Response:  # fmt: skip
        user, account = await ops.find_user(self.s, call.params["username"])
        doc = ops.user_doc(user, account)
        csrf = call.principal.csrf
        path = user_path(user.username)
        message = f'<p class="error">{h(error)}</p>' if error else ""
        readonly = self.s.users is None
        if readonly:
            settings = f'<p class="flash">{h(ops.LDAP_MANAGED)}</p>' + _user_summary(doc)
        else:
            settings = (
                f'<form method="post" action="{h(path)}" class="card">{csrf_field(csrf)}'
                f'{self._user_fields(values or doc, user.kind, await self._account_names(), False)}'
                '<div class="actions"><button type="submit" id="save">Save</button></div></form>'
            )
        senders = ops.sender_docs(self.s, user)
        rows = []
        for sd in senders:
            state = '<span class="verified">verified</span>' if sd["verified"] else \
                '<span class="pending">waiting for confirmation</span>'  # fmt: skip
            how = ""
            if not sd["verified"] and sd.get("method") == "dns":
                rec = sd["record"]
                how = (f'publish TXT <code>{h(rec["value"])}</code> at '
                       f'<code>{h(rec["name"])}</code> ')  # fmt: skip
            action = ""
            if not sd["verified"] and not readonly:
                label = "Send the link again" if sd["kind"] == "address" else "Check DNS now"
                action = post_button(f'{path}/senders/{quote(sd["sender"], safe="@")}/verify',
                                     label, csrf, "secondary")  # fmt: skip
            rows.append([f'<span class="mono">{h(sd["sender"])}</span>', h(sd["kind"]), state,
                         how + action])  # fmt: skip
        body = (
            f'{message}<p class="muted">{h(doc["kind"])} user · account {h(doc["account"])} · '
            f'last updated {h(when(doc["updated"]))} · '
            f'{link(path + "/stats", "statistics")}</p>{settings}'
            f'<h2>Senders</h2>{table(["Sender", "Kind", "State", ""], rows)}'
        )
        if not readonly:
            body += (
                '<h2>Password and removal</h2><section class="card"><div class="actions">'
                f'{post_button(path + "/password", "Reset password", csrf, "secondary")}'
                f'{post_button(path + "/delete", "Delete user", csrf, "danger")}'
                "</div></section>"
            )
        return self.render(call, f"SMTP user {user.username}", body, "/users", status)

    async def save_user(self, call: Call) -> Response:
        user, _ = await ops.find_user(self.s, call.params["username"])
        form = call.form()
        try:
            result = await ops.edit_user(self.s, user.username, form_settings(form, user.kind))
        except HttpError as e:
            if e.status != 400 and e.status != 409:
                raise
            return await self.user_form(call, form, e.message, e.status)
        notes = ["Saved."] + [_verification_text(v) for v in result["verification"]]
        call.principal.flash.extend(notes)
        return redirect(user_path(user.username))

    async def reset_password(self, call: Call) -> Response:
        result = await ops.reset_password(self.s, call.params["username"])
        body = (
            f'{_password_block(result["username"], result["password"])}'
            f'<p>{link(user_path(result["username"]), "Back to the user")}</p>'
        )
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
            message = _verification_text(result)
        return self.done(call, user_path(username), message)

    async def user_stats(self, call: Call) -> Response:
        user, _ = await ops.find_user(self.s, call.params["username"])
        period = call.arg("period") or "day"
        if period not in ("day", "hour"):
            raise HttpError(400, "period must be day or hour")
        span = 30 if period == "day" else 48
        since = self.s.reactor.seconds() - span * (86400 if period == "day" else 3600)
        result = await ops.stats(self.s, user.username, None, _iso(since), period)
        size = 86400 if period == "day" else 3600
        first = int(since // size) * size
        by_start = {int(p["start"]): p for p in result["periods"]}
        points = [(t, by_start.get(t, {})) for t in range(first, first + (span + 1) * size, size)]
        totals = result["totals"]
        other = "hour" if period == "day" else "day"
        body = (
            f'<p class="muted">Last {span} {period}s (UTC) · '
            f'{link(user_path(user.username, "/stats?period=" + other), "per " + other)} · '
            f'{link(user_path(user.username), "settings")}</p>'
            f"{chart(points, period)}"
            f'{table(["Event", "Total"], [[h(k), h(v)] for k, v in totals.items()], "totals")}'
        )
        return self.render(call, f"Statistics of {user.username}", body, "/stats")

    # ---- accounts

    async def accounts(self, call: Call, error: str = "", status: int = 200) -> Response:
        accounts = await ops.list_accounts(self.s)
        rows = [[link(f"/accounts/{quote(a['name'])}", a["name"]),
                 f'<span class="mono">{h(a["domains"]) or "-"}</span>', h(a["notify"] or "-"),
                 h(a["note"]), h(len(a["users"]))] for a in accounts]  # fmt: skip
        body = f'<p class="error">{h(error)}</p>' if error else ""
        body += table(["Account", "Domains", "Notify", "Note", "Users"], rows)
        if self.s.users is not None:
            body += (
                '<h2>Add an account</h2><form method="post" action="/accounts" class="card">'
                f'{csrf_field(call.principal.csrf)}<div class="grid">'
                f'{text_input("name", "Name", required=True)}'
                f'{text_input("domains", "Authorized domains", hint="a.com;b.com")}'
                f'{text_input("notify", "Notification address")}'
                f'{text_input("note", "Note")}</div><div class="actions">'
                '<button type="submit" id="add-account">Add account</button></div></form>'
            )
        return self.render(call, "Accounts", body, "/accounts", status)

    async def add_account(self, call: Call) -> Response:
        form = call.form()
        try:
            doc = await ops.add_account(self.s, {k: form.get(k, "") for k in
                                                 ("name", "domains", "notify", "note")})
        except HttpError as e:
            if e.status not in (400, 409):
                raise
            return await self.accounts(call, e.message, e.status)
        return self.done(call, "/accounts", f"Added account {doc['name']}.")

    async def account_form(self, call: Call, error: str = "", status: int = 200) -> Response:
        doc = await ops.get_account(self.s, call.params["name"])
        path = f"/accounts/{quote(doc['name'])}"
        csrf = call.principal.csrf
        users = ", ".join(link(user_path(u), u) for u in doc["users"]) or "none"
        body = f'<p class="error">{h(error)}</p>' if error else ""
        body += f"<p>Users: {users}</p>"
        if self.s.users is None:
            body += f'<p class="flash">{h(ops.LDAP_MANAGED)}</p>'
        else:
            body += (
                f'<form method="post" action="{h(path)}" class="card">{csrf_field(csrf)}'
                '<div class="grid">'
                f'{text_input("domains", "Authorized domains", doc["domains"], "a.com;b.com")}'
                f'{text_input("notify", "Notification address", doc["notify"] or "")}'
                f'{text_input("note", "Note", doc["note"])}</div><div class="actions">'
                '<button type="submit">Save</button></div></form>'
                f'{post_button(path + "/delete", "Delete account", csrf, "danger")}'
            )
        return self.render(call, f"Account {doc['name']}", body, "/accounts", status)

    async def save_account(self, call: Call) -> Response:
        form = call.form()
        name = call.params["name"]
        try:
            await ops.edit_account(self.s, name, {k: form.get(k, "") for k in
                                                  ("domains", "notify", "note")})
        except HttpError as e:
            if e.status not in (400, 409):
                raise
            return await self.account_form(call, e.message, e.status)
        return self.done(call, f"/accounts/{quote(name)}", "Saved.")

    async def delete_account(self, call: Call) -> Response:
        name = call.params["name"]
        try:
            await ops.delete_account(self.s, name)
        except HttpError as e:
            if e.status != 409:
                raise
            return await self.account_form(call, e.message, e.status)
        return self.done(call, "/accounts", f"Deleted account {name}.")

    # ---- queue

    async def queue(self, call: Call) -> Response:
        result = await ops.list_queue(self.s)
        csrf = call.principal.csrf
        rows = []
        for m in result["messages"]:
            path = f"/queue/{m['id']}"
            actions = post_button(path + "/delete", "Delete", csrf, "danger")
            if m["state"] == "queued" and self.s.control.can_retry:
                actions = post_button(path + "/retry", "Retry now", csrf, "secondary") + actions
            rows.append([link(path, m["id"]), h(m["state"]), h(m["sender"] or "<>"),
                         h(len(m["recipients"])), h(len(m["pending"])), h(m["user"] or "-"),
                         h(when(m["received_at"])), h(m["attempts"]),
                         h(when(m["next_attempt"]) if m["next_attempt"] else "never"),
                         h(m["last_error"]), actions])  # fmt: skip
        body = f'<p class="muted">{h(result["total"])} message(s).</p>'
        if rows:
            body += table(["Queue id", "State", "Sender", "Rcpts", "Pending", "User",
                           "Received", "Attempts", "Next attempt", "Last error", ""], rows,
                          "queue")  # fmt: skip
        return self.render(call, "Queue", body, "/queue")

    async def queued(self, call: Call) -> Response:
        m = await ops.show_queued(self.s, call.params["queue_id"])
        rows = [[h(r["address"]), h(r["status"]), h(r["code"] or ""), h(r["text"]),
                 h(r["remote"] or "")] for r in m["recipient_status"]]  # fmt: skip
        e = m["envelope"]
        facts = [("State", m["state"]), ("Sender", m["sender"] or "<>"), ("User", m["user"]),
                 ("Account", m["account"]), ("Client", e.get("client_ip")), ("Size", m["size"]),
                 ("Received", when(m["received_at"])), ("Attempts", m["attempts"]),
                 ("Next attempt", when(m["next_attempt"]) if m["next_attempt"] else "never"),
                 ("Last error", m["last_error"])]  # fmt: skip
        body = (
            table(["", ""], [[h(k), h(v)] for k, v in facts])
            + "<h2>Recipients</h2>" + table(["Recipient", "Status", "Code", "Text", "Remote"],
                                            rows)
            + f'<h2>Headers</h2><pre class="mono">{h(m["headers"])}</pre>'
        )  # fmt: skip
        return self.render(call, f"Message {m['id']}", body, "/queue")

    async def retry(self, call: Call) -> Response:
        await ops.retry_queued(self.s, call.params["queue_id"])
        return self.done(call, "/queue", f"{call.params['queue_id']}: delivery tried now.")

    async def delete_queued(self, call: Call) -> Response:
        await ops.delete_queued(self.s, call.params["queue_id"])
        return self.done(call, "/queue", f"Deleted {call.params['queue_id']}.")

    # ---- suppressions

    async def suppressions(self, call: Call, error: str = "", status: int = 200) -> Response:
        entries = await ops.list_suppressions(self.s)
        csrf = call.principal.csrf
        rows = [[h(e["address"]), h(e["account"] or "(global)"), h(e["user"] or "(all users)"),
                 h(e["reason"]), h(when(e["created"])),
                 post_button("/suppressions/delete", "Remove", csrf, "danger",
                             {"address": e["address"], "user": e["user"] or "",
                              "account": "" if e["user"] else e["account"] or ""})]
                for e in entries]  # fmt: skip
        body = f'<p class="error">{h(error)}</p>' if error else ""
        body += table(["Address", "Account", "User", "Reason", "Since"], rows) if rows else \
            "<p>No suppressed addresses.</p>"  # fmt: skip
        body += (
            '<h2>Suppress an address</h2><form method="post" action="/suppressions" '
            f'class="card">{csrf_field(csrf)}<div class="grid">'
            f'{text_input("address", "Address", required=True)}'
            f'{text_input("user", "For user", hint="empty: see account")}'
            f'{text_input("account", "For account", hint="both empty: the global list")}'
            '</div><div class="actions"><button type="submit">Suppress</button></div></form>'
        )
        return self.render(call, "Suppressions", body, "/suppressions", status)

    async def add_suppression(self, call: Call) -> Response:
        form = call.form()
        doc = {"address": form.get("address", ""), "user": form.get("user") or None,
               "account": form.get("account") or None}  # fmt: skip
        try:
            await ops.add_suppression(self.s, doc)
        except HttpError as e:
            if e.status not in (400, 404, 409):
                raise
            return await self.suppressions(call, e.message, e.status)
        return self.done(call, "/suppressions", f"Suppressed {doc['address']}.")

    async def delete_suppression(self, call: Call) -> Response:
        form = call.form()
        address = form.get("address", "")
        await ops.delete_suppression(self.s, address, form.get("user") or None,
                                     form.get("account") or None)  # fmt: skip
        return self.done(call, "/suppressions", f"Removed {address}.")

    # ---- statistics

    async def stats(self, call: Call) -> Response:
        since = self.s.reactor.seconds() - 30 * 86400
        users = await ops.list_users(self.s)
        rows = []
        for u in users:
            totals = (await ops.stats(self.s, u["username"], None, _iso(since)))["totals"]
            rows.append([link(user_path(u["username"], "/stats"), u["username"])]
                        + [f'{h(totals[k])}' for k in ("accepted", "delivered", "bounced",
                                                       "deferred", "rejected", "opens",
                                                       "clicks")])  # fmt: skip
        body = '<p class="muted">The last 30 days, per SMTP user.</p>' + table(
            ["User", "Sent", "Delivered", "Bounced", "Deferred", "Rejected", "Opens", "Clicks"],
            rows, "stats")
        return self.render(call, "Statistics", body, "/stats")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _blank(value: Any) -> Any:
    return "" if value is None else value


def form_settings(form: dict[str, str], kind: Kind) -> dict[str, Any]:
    """The user settings an edit form sends, typed as the API takes them."""
    out: dict[str, Any] = {}
    texts = ["account", "note", "status", "audit_bcc", "bounce_notify"]
    if kind is Kind.NAMED:
        texts += ["domains", "addresses"]
    for name in texts:
        if name in form:
            out[name] = form[name]
    for name, optional in (("priority", False), ("rate_limit", True), ("max_connections", True)):
        text = form.get(name, "").strip()
        if not text and optional:
            out[name] = None
        elif text or not optional:
            try:
                out[name] = int(text)
            except ValueError:
                raise HttpError(400, f"{name.replace('_', ' ')} must be a whole number")
    for name, _ in TOGGLES:
        out[name] = form.get(name) == "on"
    return out


def _password_block(username: str, password: str) -> str:
    return (
        f'<p>The password of <strong>{h(username)}</strong> is:</p>'
        f'<p><span class="secret" id="password">{h(password)}</span></p>'
        '<p class="muted">It is shown only this once: only a hash of it is stored.</p>'
    )


def _verification_text(v: dict[str, Any]) -> str:
    if v.get("method") == "dns":
        rec = v["record"]
        return f"To verify {v['sender']}, publish a TXT record {rec['value']} at {rec['name']}."
    if v.get("error"):
        return f"{v['sender']}: {v['error']}"
    return f"A confirmation link was mailed to {v['sender']}."


def _verification_block(items: list[dict[str, Any]]) -> str:
    if not items:
        return ""
    return "<h2>Sender verification</h2><ul>" + "".join(
        f"<li>{h(_verification_text(v))}</li>" for v in items
    ) + "</ul>"


def _user_summary(doc: dict[str, Any]) -> str:
    keys = ["status", "note", "sender_scope", "priority", "rate_limit", "max_connections",
            "archive", "audit_bcc", "bounce_notify", "unsubscribe_footer", "open_tracking",
            "click_tracking"]  # fmt: skip
    return table(["Setting", "Value"], [[h(k), h(doc[k])] for k in keys])
