"""mailrelay-admin dkim add|list|show|del|rotate|activate|retire: the DKIM keys of the
sending domains.

A key is made for an authorized domain of an account (the account is found in the
configured directory). ``add`` makes it active at once: publish the record ``dkim show``
prints before mail from the domain goes out, or receivers see a signature they cannot
check. ``rotate`` makes a pending key instead, which ``activate`` switches signing to only
once its record is seen in DNS; the key it replaces is retiring (published, not signing)
until ``retire`` removes it. ``list`` and ``show`` look each record up in DNS (``[delivery]
dns_servers``, or the system's; ``--no-dns`` skips that). The private key stays in its
file; nothing here prints it.
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import defer

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin._reactor import run
from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage.dkim import DkimError, DkimKeys, domain_name, key_owner, listed, shown
from mailrelay.manage.dkim import activate as manage_activate
from mailrelay.manage.stores import at_once

DNS_TIMEOUT = 60.0  # seconds for every lookup together


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
    p.add_argument("--no-dns", action="store_true", help="do not look the records up")
    p.set_defaults(func=list_)

    p = sub.add_parser("show", help="a domain's keys and the DNS records to publish")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-dns", action="store_true", help="do not look the records up")
    p.set_defaults(func=show)

    p = sub.add_parser("rotate", help="make a new key, pending until dkim activate")
    p.add_argument("domain")
    p.add_argument("--selector", help="the DNS selector (default: YYYYMMDD, and an e for "
                   "ed25519)")
    p.add_argument("--type", dest="kind", choices=["rsa", "ed25519"], default="rsa")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.set_defaults(func=rotate)

    p = sub.add_parser("activate", help="sign with the pending key, once it is in DNS")
    p.add_argument("domain")
    p.set_defaults(func=activate)

    p = sub.add_parser("retire", help="delete a retiring key (after a grace period)")
    p.add_argument("domain")
    p.add_argument("selector")
    p.set_defaults(func=retire)

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


def _with_dns(context: Context, ask):
    """The result of ``ask(resolver)``, run on the reactor (a refusal as a CommandError)."""
    from mailrelay.delivery.router import make_resolver

    async def start(reactor):
        return await ask(make_resolver(context.config.delivery.dns_servers, reactor))

    try:
        return run(start, DNS_TIMEOUT)
    except (DkimError, OSError) as e:
        raise CommandError(str(e))


def _made(context: Context, args: argparse.Namespace, state: str):
    try:
        domain = domain_name(args.domain)
        account = directory.manage(context, lambda users: key_owner(users, domain))
    except DkimError as e:
        raise CommandError(str(e))
    return domain, _result(_keys(context).add(domain, account, args.selector, args.kind,
                                              args.bits, state))  # fmt: skip


def add(args: argparse.Namespace, context: Context) -> int:
    domain, key = _made(context, args, "active")
    print(f"{key.type} key {key.selector!r} made for {domain} (account {key.account}), active; "
          f"publish its record: mailrelay-admin dkim show {domain}")
    return 0


def rotate(args: argparse.Namespace, context: Context) -> int:
    if args.selector is None:
        args.selector = time.strftime("%Y%m%d") + ("e" if args.kind == "ed25519" else "")
    domain, key = _made(context, args, "pending")
    print(f"{key.type} key {key.selector!r} made for {domain}, pending: publish its record "
          f"(mailrelay-admin dkim show {domain}), then mailrelay-admin dkim activate {domain}")
    return 0


def activate(args: argparse.Namespace, context: Context) -> int:
    store = _keys(context)
    key, old = _with_dns(context, lambda resolver: manage_activate(store, resolver,
                                                                    args.domain))  # fmt: skip
    print(f"{key.domain} is signed with selector {key.selector!r} from now on")
    for k in old:
        print(f"selector {k.selector!r} is retiring: keep its record published for a few "
              f"days, then mailrelay-admin dkim retire {k.domain} {k.selector}")
    return 0


def retire(args: argparse.Namespace, context: Context) -> int:
    key = _result(_keys(context).retire(args.domain, args.selector))
    print(f"deleted {key.type} key {key.selector!r} of {key.domain}; its record "
          f"{key.selector}._domainkey.{key.domain} can now be withdrawn from DNS")
    return 0


def list_(args: argparse.Namespace, context: Context) -> int:
    store = _keys(context)
    keys = (_result(listed(store)) if args.no_dns
            else _with_dns(context, lambda resolver: listed(store, resolver)))
    if args.json:
        output.print_json(keys)
        return 0
    output.print_list(["DOMAIN", "SELECTOR", "TYPE", "STATE", "DNS", "ACCOUNT", "CREATED"],
                      [[k["domain"], k["selector"], k["type"], k["state"],
                        k.get("published", "-"), k["account"], output.when(k["created"])]
                       for k in keys], "no DKIM keys")  # fmt: skip
    return 0


def show(args: argparse.Namespace, context: Context) -> int:
    store = _keys(context)
    records = (_result(shown(store, args.domain)) if args.no_dns
               else _with_dns(context, lambda resolver: shown(store, args.domain, resolver)))
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
        if "published" in k:
            print(f"in DNS: {k['published']}")
    return 0


def delete(args: argparse.Namespace, context: Context) -> int:
    key = _result(_keys(context).remove(args.domain, args.selector))
    print(f"deleted {key.type} key {key.selector!r} of {key.domain}")
    return 0
