"""mailrelay-admin domain check DOMAIN: what a sending domain publishes in DNS for the mail
this relay sends -- SPF, DKIM (each key made with ``dkim add``), DMARC and, when the
domain's account has a bounce domain, the return path (its MX and SPF) -- each ok,
missing, wrong or unknown, with the record to publish. Asks the DNS servers of
``[delivery] dns_servers`` (or the system's). Exit status 0 when every check is ok, 3 when
one is not.
"""

from __future__ import annotations

import argparse

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin._reactor import run
from mailrelay.admin.cli import CommandError, Context
from mailrelay.admin.dkim import _keys, _result
from mailrelay.manage.dkim import DkimError, domain_name, txt_strings

NOT_OK = 3
TIMEOUT = 60.0  # seconds for every lookup together


def register(subparsers) -> None:
    parser = subparsers.add_parser("domain", help="sending domains: check their DNS records")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("check", help="SPF, DKIM and DMARC of a domain, as published in DNS")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=check)


def check(args: argparse.Namespace, context: Context) -> int:
    from mailrelay.delivery.router import make_resolver
    from mailrelay.manage.domaincheck import check_domain_with_return_path

    try:
        domain = domain_name(args.domain)
    except DkimError as e:
        raise CommandError(str(e))
    store = _keys(context)
    keys = [(k, _result(store.txtRecord(k))) for k in _result(store.ofDomain(domain))]
    delivery = context.config.delivery
    bounce_domain = _bounce_domain(context, domain)

    async def start(reactor):
        resolver = make_resolver(delivery.dns_servers, reactor)
        return await check_domain_with_return_path(
            resolver, domain, delivery.outbound_addresses, keys, bounce_domain,
            context.config.bounces.mx_host)

    report = run(start, TIMEOUT)
    if args.json:
        output.print_json(report)
    else:
        _print(report)
    return 0 if report["ok"] else NOT_OK


def _bounce_domain(context: Context, domain: str) -> str | None:
    """The bounce domain of the account ``domain`` is authorized for, if it has one."""
    accounts = directory.manage(context, lambda users: users.accounts())
    found = sorted(a.bounce_domain for a, _ in accounts
                   if domain in a.domains and a.bounce_domain)
    return found[0] if found else None


def _print(report: dict) -> None:
    rows = [("SPF", report["spf"])]
    rows += [(f"DKIM {k['selector']}", k) for k in report["dkim"]]
    rows.append(("DMARC", report["dmarc"]))
    if "return_path" in report:
        rp = report["return_path"]
        rows += [(f"return-path {kind}", {**rp[kind.lower()], "detail": (
            f"{rp['domain']}: {rp[kind.lower()]['detail']}")}) for kind in ("MX", "SPF")]
    width = max(len(label) for label, _ in rows)
    print(report["domain"])
    for label, c in rows:
        print(f"  {label.ljust(width)}  {c['status']:<7}  {c['detail']}")
        if c.get("record"):
            print(f"  {''.ljust(width)}  found:   {c['record']}")
        if c.get("publish"):
            p = c["publish"]
            if p["type"] == "TXT":
                quoted = " ".join(f'"{s}"' for s in txt_strings(p["value"]))
                print(f"  {''.ljust(width)}  publish: {p['name']}. IN TXT ( {quoted} )")
            else:
                print(f"  {''.ljust(width)}  publish: {p['name']}. IN {p['type']} {p['value']}")
    if not report["dkim"]:
        print(f"  no DKIM key: mailrelay-admin dkim add {report['domain']}")
