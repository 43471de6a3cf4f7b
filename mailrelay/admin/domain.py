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
from mailrelay.admin.dkim import _keys
from mailrelay.manage.dkim import DkimError, domain_name
from mailrelay.manage.domaincheck import record_line, return_path_rows

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
    from mailrelay.manage.domaincheck import bounce_domain_of, check_configured

    try:
        domain = domain_name(args.domain)
    except DkimError as e:
        raise CommandError(str(e))
    config = context.config
    accounts = directory.manage(context, lambda users: users.accounts())
    bounce_domain = bounce_domain_of([a for a, _ in accounts], domain)

    async def start(reactor):
        resolver = make_resolver(config.delivery.dns_servers, reactor)
        return await check_configured(config, _keys(context), resolver, domain, bounce_domain)

    try:
        report = run(start, TIMEOUT)
    except OSError as e:  # a key file unreadable
        raise CommandError(str(e))
    if args.json:
        output.print_json(report)
    else:
        _print(report)
    return 0 if report["ok"] else NOT_OK


def _print(report: dict) -> None:
    rows = [("SPF", report["spf"])]
    rows += [(f"DKIM {k['selector']}", k) for k in report["dkim"]]
    rows.append(("DMARC", report["dmarc"]))
    rows += return_path_rows(report)
    width = max(len(label) for label, _ in rows)
    print(report["domain"])
    for label, c in rows:
        print(f"  {label.ljust(width)}  {c['status']:<7}  {c['detail']}")
        if c.get("record"):
            print(f"  {''.ljust(width)}  found:   {c['record']}")
        if c.get("publish"):
            print(f"  {''.ljust(width)}  publish: {record_line(c['publish'])}")
    if not report["dkim"]:
        print(f"  no DKIM key: mailrelay-admin dkim add {report['domain']}")
