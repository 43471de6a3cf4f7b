"""mailrelay-admin dkim add|list|show|del: the DKIM keys of the sending domains.

A key is made for an authorized domain of an account (the account is found in the
configured directory) and is active at once: publish the record ``dkim show`` prints
before mail from the domain goes out, or receivers see a signature they cannot check.
The private key stays in its file; nothing here prints it.
"""

from __future__ import annotations

import argparse

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage.dkim import DkimError, DkimKeys, dkim_json, domain_name
from mailrelay.manage.stores import at_once
from mailrelay.manage.users import UserManager


def register(subparsers) -> None:
    parser = subparsers.add_parser("dkim", help="DKIM keys: add, list, show, del")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("add", help="make a key for an authorized domain")
    p.add_argument("domain")
    p.add_argument("--selector", help="the DNS selector (default: YYYYMM, and an e for ed25519)")
    p.add_argument("--type", dest="kind", choices=["rsa", "ed25519"], default="rsa")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.set_defaults(func=add)

    p = sub.add_parser("list", help="list keys")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)

    p = sub.add_parser("show", help="a domain's keys and the DNS records to publish")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=show)

    p = sub.add_parser("del", help="delete a key (mail is no longer signed with it)")
    p.add_argument("domain")
    p.add_argument("selector")
    p.set_defaults(func=delete)


def _keys(context: Context) -> DkimKeys:
    return DkimKeys(context.config.dkim.directory, at_once)


def _result(d):
    """The value of a Deferred fired at once (at_once); a refusal as a CommandError."""
    out: list = []
    d.addBoth(out.append)
    value = out[0]
    if hasattr(value, "raiseException"):
        try:
            value.raiseException()
        except (DkimError, OSError) as e:
            raise CommandError(str(e))
    return value


def add(args: argparse.Namespace, context: Context) -> int:
    try:
        domain = domain_name(args.domain)
    except DkimError as e:
        raise CommandError(str(e))

    async def owner(users: UserManager) -> list[str]:
        return [a.name for a, _ in await users.accounts() if domain in a.domains]

    accounts = directory.manage(context, owner)
    if not accounts:
        raise CommandError(f"{domain} is not an authorized domain of any account "
                           "(mailrelay-admin account set NAME --add-domain DOMAIN)")
    if len(accounts) > 1:
        raise CommandError(f"{domain} is authorized for several accounts "
                           f"({', '.join(accounts)}): it can be signed for one only")
    key = _result(_keys(context).add(domain, accounts[0], args.selector, args.kind, args.bits))
    print(f"{key.type} key {key.selector!r} made for {domain} (account {key.account}), active; "
          f"publish its record: mailrelay-admin dkim show {domain}")
    return 0


def list_(args: argparse.Namespace, context: Context) -> int:
    keys = _result(_keys(context).list())
    if args.json:
        output.print_json([dkim_json(k) for k in keys])
        return 0
    output.print_list(["DOMAIN", "SELECTOR", "TYPE", "STATE", "ACCOUNT", "CREATED"],
                      [[k.domain, k.selector, k.type, k.state, k.account,
                        output.when(k.created)] for k in keys], "no DKIM keys")  # fmt: skip
    return 0


def show(args: argparse.Namespace, context: Context) -> int:
    store = _keys(context)
    try:
        keys = _result(store.ofDomain(args.domain))
    except DkimError as e:
        raise CommandError(str(e))
    if not keys:
        raise CommandError(f"{args.domain} has no DKIM key (mailrelay-admin dkim add DOMAIN)")
    shown = [dkim_json(k, _result(store.txtRecord(k))) for k in keys]
    if args.json:
        output.print_json(shown)
        return 0
    for i, k in enumerate(shown):
        if i:
            print()
        print(f"{k['domain']} selector {k['selector']}: {k['type']}, {k['state']}, "
              f"account {k['account']}, made {output.when(k['created'])} UTC")
        quoted = " ".join(f'"{s}"' for s in k["dns_strings"])
        print(f"{k['dns_name']}. IN TXT ( {quoted} )")
    return 0


def delete(args: argparse.Namespace, context: Context) -> int:
    key = _result(_keys(context).remove(args.domain, args.selector))
    print(f"deleted {key.type} key {key.selector!r} of {key.domain}")
    return 0
