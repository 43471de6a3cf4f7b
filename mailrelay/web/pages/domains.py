"""The sending domains' pages: every domain the relay sends for, and one domain's DNS
records checked now (mailrelay-admin domain check): SPF, each DKIM key and DMARC, each ok,
missing, wrong or unknown, with the record found and the record to publish."""

from __future__ import annotations

from urllib.parse import quote

from twisted.web.template import tags

from mailrelay.manage.domaincheck import record_line, return_path_rows
from mailrelay.web import ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages
from mailrelay.web.pages.dkim import dkim_path, pill
from mailrelay.web.routing import Call, Response
from mailrelay.web.templates import Node, link, table


def domain_path(domain: str) -> str:
    return f"/domains/{quote(domain)}"


class DomainPages(Pages):
    def register(self, add) -> None:
        add("GET", "/domains", self.domains, account=t.LISTED)
        add("GET", "/domains/{domain}", self.check, account=t.domain(t.path("domain")))

    async def domains(self, call: Call) -> Response:
        names = await ops.sending_domains(self.s, call.account)
        body: list[Node] = [
            tags.p("The accounts' authorized domains, those with DKIM keys and the relay "
                   "domain. Each one's page looks its SPF, DKIM and DMARC records up in DNS."),
            tags.ul([tags.li(link(domain_path(d), d)) for d in names]) if names
            else tags.p("No domains."),
        ]  # fmt: skip
        return self.render(call, "Sending domains", body, "/domains")

    async def check(self, call: Call) -> Response:
        report = await ops.check_domain(self.s, call.params["domain"])
        domain = report["domain"]
        checks = [("SPF", report["spf"])]
        checks += [(f"DKIM {c['selector']} ({c['state']})", c) for c in report["dkim"]]
        checks.append(("DMARC", report["dmarc"]))
        checks += return_path_rows(report)  # the account's bounce domain, if it has one
        rows = [[label, pill(c["status"]), c["detail"],
                 tags.code(c["record"]) if c.get("record") else "",
                 tags.pre(record_line(c["publish"]), class_="mono") if c.get("publish")
                 else ""]
                for label, c in checks]  # fmt: skip
        body: list[Node] = [
            tags.p("Every record is as published in DNS now: "
                   + ("all ok." if report["ok"] else "publish what the last column shows.")),
            table(["Check", "Status", "", "Found", "Publish"], rows),
        ]
        if not report["dkim"]:
            body.append(tags.p("No DKIM key: make one on the ", link("/dkim", "DKIM page"),
                               "."))
        else:
            body.append(tags.p(link(dkim_path(domain), f"The DKIM keys of {domain}")))
        body.append(tags.p(link("/domains", "All sending domains")))
        return self.render(call, f"DNS records of {domain}", body, "/domains")
