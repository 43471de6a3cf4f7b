"""The DKIM keys' pages: every key with its state, whether its record is in DNS (now, and
at the relay's last scheduled check) and buttons to activate a pending key or delete a
retiring one, with a form to make one; one domain's keys with the TXT records to publish
and a button to delete each. No private key is ever shown."""

from __future__ import annotations

from urllib.parse import quote

from twisted.web.template import tags

from mailrelay.web import forms, ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages
from mailrelay.web.routing import Call, HttpError, Response
from mailrelay.web.templates import (
    Node,
    csrf_field,
    error,
    link,
    post_button,
    select,
    table,
    text_input,
    when,
)


def dkim_path(domain: str, suffix: str = "") -> str:
    return f"/dkim/{quote(domain)}{suffix}"


def pill(status: str) -> Node:
    """A state or a look-up result, coloured by what it means."""
    return tags.span(status, class_=f"status status-{status}") if status != "-" else "-"


def last_check(key: dict) -> Node:
    if key.get("dns_checked") is None:
        return "-"
    return [pill(key["dns_status"]), " ", when(key["dns_checked"])]


def actions(key: dict, csrf: str) -> Node:
    """Activate for a pending key, Retire for a retiring one (as mailrelay-admin does)."""
    path = dkim_path(key["domain"], f"/{quote(key['selector'])}")
    if key["state"] == "pending":
        return post_button(f"{path}/activate", "Activate", csrf)
    if key["state"] == "retiring":
        withdraw = key.get("withdraw_after")
        note = f" (withdraw its record from {when(withdraw)})" if withdraw else ""
        return [post_button(f"{path}/retire", "Retire", csrf, "secondary"),
                tags.small(note, class_="muted")]
    return ""


class DkimPages(Pages):
    def register(self, add) -> None:
        domain = t.domain(t.path("domain"))
        add("GET", "/dkim", self.keys, account=t.LISTED)
        add("POST", "/dkim", self.add_key, account=t.domain(t.body("domain")))
        add("GET", "/dkim/{domain}", self.domain, account=domain)
        add("POST", "/dkim/{domain}/{selector}/delete", self.delete_key, account=t.DKIM_KEY)
        add("POST", "/dkim/{domain}/{selector}/activate", self.activate_key,
            account=t.DKIM_KEY)
        add("POST", "/dkim/{domain}/{selector}/retire", self.retire_key, account=t.DKIM_KEY)

    async def keys(self, call: Call, message: str = "", status: int = 200) -> Response:
        csrf = call.principal.csrf
        rows = [[link(dkim_path(k["domain"]), k["domain"]), k["selector"], k["type"],
                 pill(k["state"]), pill(k.get("published", "-")), last_check(k),
                 k["account"] or "(relay domain)", when(k["created"]), actions(k, csrf)]
                for k in await ops.list_dkim(self.s, call.account)]  # fmt: skip
        body: list[Node] = [
            error(message),
            table(["Domain", "Selector", "Type", "State", "In DNS now", "Relay's last check",
                   "Account", "Made", ""], rows) if rows
            else tags.p("No DKIM keys."),
            tags.p("A pending key signs once its record is in DNS: the relay looks every "
                   "record up on a schedule and switches by itself, or Activate does it now. "
                   "A retiring key no longer signs; keep its record published until it can "
                   "be withdrawn, then Retire deletes the key.", class_="muted"),
            tags.h2("Make a key"),
            tags.p("A domain's first key of a type is active at once: publish its TXT record "
                   "(on the domain's page) before mail from the domain goes out. A further "
                   "one is pending until its record is seen in DNS."),
            tags.form(
                csrf_field(call.principal.csrf),
                tags.div(text_input("domain", "Domain", required=True,
                                    hint="an authorized domain of one account"),
                         text_input("selector", "Selector", hint="empty: YYYYMM"),
                         select("type", "Type", ["rsa", "ed25519"], "rsa"),
                         text_input("bits", "RSA bits", "2048", kind="number"),
                         class_="grid"),
                tags.div(tags.button("Make key", type="submit", id="add-dkim"),
                         class_="actions"),
                method="post", action="/dkim", class_="card"),
        ]  # fmt: skip
        return self.render(call, "DKIM keys", body, "/dkim", status)

    async def add_key(self, call: Call) -> Response:
        try:
            key = await ops.add_dkim(self.s, forms.dkim_key(call.form()))
        except HttpError as e:
            if e.status not in (400, 409):
                raise
            return await self.keys(call, e.message, e.status)
        return self.done(call, "/dkim", f"DKIM key {key['selector']} made for "
                         f"{key['domain']}: publish its record.")  # fmt: skip

    async def domain(self, call: Call) -> Response:
        keys = await ops.show_dkim(self.s, call.params["domain"])
        domain = keys[0]["domain"]
        csrf = call.principal.csrf
        body: list[Node] = []
        for k in keys:
            quoted = " ".join(f'"{s}"' for s in k["dns_strings"])
            owner = f"account {k['account']}" if k["account"] else "the relay domain's key"
            body += [
                tags.h2(f"Selector {k['selector']}"),
                tags.p(pill(k["state"]), f" {k['type']}, {owner}, made "
                       f"{when(k['created'])} UTC"),
                tags.p("In DNS now: ", pill(k.get("published", "-")),
                       "; at the relay's last check: ", last_check(k)),
                tags.p("Publish this TXT record:"),
                tags.pre(f"{k['dns_name']}. IN TXT ( {quoted} )", class_="mono"),
                tags.div(actions(k, csrf),
                         post_button(dkim_path(domain, f"/{quote(k['selector'])}/delete"),
                                     "Delete key", csrf, "danger"), class_="actions"),
            ]  # fmt: skip
        body.append(tags.p(link(f"/domains/{quote(domain)}",
                                f"Check all DNS records of {domain}")))
        body.append(tags.p(link("/dkim", "All DKIM keys")))
        return self.render(call, f"DKIM keys of {domain}", body, "/dkim")

    async def activate_key(self, call: Call) -> Response:
        p = call.params
        return await self._switch(call, ops.activate_dkim(self.s, p["domain"], p["selector"]),
                                  lambda done: f"{done['active']['domain']} is signed with "
                                  f"selector {done['active']['selector']} from now on.")

    async def retire_key(self, call: Call) -> Response:
        p = call.params
        return await self._switch(call, ops.retire_dkim(self.s, p["domain"], p["selector"]),
                                  lambda key: f"Deleted retiring DKIM key {key['selector']} of "
                                  f"{key['domain']}: its record can be withdrawn from DNS.")

    async def _switch(self, call: Call, change, message) -> Response:
        """Back to the keys with ``message(result)`` of ``change``; a key not in the state
        it needs (409) is said above them."""
        try:
            result = await change
        except HttpError as e:
            if e.status != 409:
                raise
            return await self.keys(call, e.message, e.status)
        return self.done(call, "/dkim", message(result))

    async def delete_key(self, call: Call) -> Response:
        key = await ops.delete_dkim(self.s, call.params["domain"], call.params["selector"])
        return self.done(call, "/dkim", f"Deleted DKIM key {key['selector']} of "
                         f"{key['domain']}.")  # fmt: skip
