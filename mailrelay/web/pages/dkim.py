"""The DKIM keys' pages: every key with a form to make one, and one domain's keys with
the TXT records to publish and a button to delete each. No private key is ever shown."""

from __future__ import annotations

from urllib.parse import quote

from twisted.web.template import tags

from mailrelay.web import forms, ops
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


class DkimPages(Pages):
    def register(self, add) -> None:
        add("GET", "/dkim", self.keys)
        add("POST", "/dkim", self.add_key)
        add("GET", "/dkim/{domain}", self.domain)
        add("POST", "/dkim/{domain}/{selector}/delete", self.delete_key)

    async def keys(self, call: Call, message: str = "", status: int = 200) -> Response:
        rows = [[link(dkim_path(k["domain"]), k["domain"]), k["selector"], k["type"],
                 k["state"], k["account"], when(k["created"])]
                for k in await ops.list_dkim(self.s)]  # fmt: skip
        body: list[Node] = [
            error(message),
            table(["Domain", "Selector", "Type", "State", "Account", "Made"], rows) if rows
            else tags.p("No DKIM keys."),
            tags.h2("Make a key"),
            tags.p("The key is active at once: publish its TXT record (on the domain's "
                   "page) before mail from the domain goes out."),
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
            body += [
                tags.h2(f"Selector {k['selector']}"),
                tags.p(f"{k['type']}, {k['state']}, account {k['account']}, made "
                       f"{when(k['created'])} UTC"),
                tags.p("Publish this TXT record:"),
                tags.pre(f"{k['dns_name']}. IN TXT ( {quoted} )", class_="mono"),
                post_button(dkim_path(domain, f"/{quote(k['selector'])}/delete"),
                            "Delete key", csrf, "danger"),
            ]  # fmt: skip
        body.append(tags.p(link("/dkim", "All DKIM keys")))
        return self.render(call, f"DKIM keys of {domain}", body, "/dkim")

    async def delete_key(self, call: Call) -> Response:
        key = await ops.delete_dkim(self.s, call.params["domain"], call.params["selector"])
        return self.done(call, "/dkim", f"Deleted DKIM key {key['selector']} of "
                         f"{key['domain']}.")  # fmt: skip
