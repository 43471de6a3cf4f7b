"""mailrelay-admin dkim add|list|show|del: the DKIM keys of the sending domains.

A key is made for an authorized domain of an account (the account is found in the
configured directory) and is active at once: publish the record ``dkim show`` prints
before mail from the domain goes out, or receivers see a signature they cannot check.
The private key stays in its file; nothing here prints it.
"""

from __future__ import annotations

import argparse

from twisted.internet import defer

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage.dkim import DkimError, DkimKeys, domain_name, key_owner, listed, shown
from mailrelay.manage.stores import at_once


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
    """The value of a Deferred (or of a coroutine over at_once calls) fired at once; a
    refusal as a CommandError."""
    out: list = []
    defer.ensureDeferred(d).addBoth(out.append)
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
        account = directory.manage(context, lambda users: key_owner(users, domain))
    except DkimError as e:
        raise CommandError(str(e))
    key = _result(_keys(context).add(domain, account, args.selector, args.kind, args.bits))
    print(f"{key.type} key {key.selector!r} made for {domain} (account {key.account}), active; "
          f"publish its record: mailrelay-admin dkim show {domain}")
    return 0


def list_(args: argparse.Namespace, context: Context) -> int:
    keys = _result(listed(_keys(context)))
    if args.json:
        output.print_json(keys)
        return 0
    output.print_list(["DOMAIN", "SELECTOR", "TYPE", "STATE", "ACCOUNT", "CREATED"],
                      [[k["domain"], k["selector"], k["type"], k["state"], k["account"],
                        output.when(k["created"])] for k in keys], "no DKIM keys")  # fmt: skip
    return 0


def show(args: argparse.Namespace, context: Context) -> int:
    records = _result(shown(_keys(context), args.domain))
    if args.json:
        output.print_json(records)
        return 0
    for i, k in enumerate(records):
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
