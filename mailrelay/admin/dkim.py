"""mailrelay-admin dkim add|list|show|del|rotate|activate|retire: the DKIM keys of the
sending domains.

A key is made for an authorized domain of an account (the account is found in the
configured directory), or for ``[dkim] relay_domain`` (a key of no account). ``add`` makes
the domain's first key of a type active at once: publish the record ``dkim show`` prints
before mail from the domain goes out, or receivers see a signature they cannot check. A
further key, and any made by ``rotate``, is pending: signing switches to it (``activate``,
or the relay itself on its scheduled check) only once its record is seen in DNS; the key
it replaces is retiring (published, not signing) until ``retire`` removes it. ``list`` and
``show`` look each record up in DNS (``[delivery] dns_servers``, or the system's;
``--no-dns`` skips that) and show the relay's last scheduled look-up. The private key
stays in its file (or its row, with ``[cluster] postgres``: postgres/dkim.py); nothing
here prints it.
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import defer

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin._reactor import run
from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage.dkim import (
    DkimError,
    DkimKeys,
    domain_name,
    key_owner,
    keys_of_config,
    listed,
    shown,
)
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
    from mailrelay.postgres.db import UNAVAILABLE
    from mailrelay.postgres.unavailable import Unavailable

    try:
        return keys_of_config(context.config, at_once)
    except UNAVAILABLE as e:  # [cluster] postgres, at connecting
        raise CommandError(str(Unavailable(e)))


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


def _made(context: Context, args: argparse.Namespace, state: str | None):
    relay_domain = context.config.dkim.relay_domain
    try:
        domain = domain_name(args.domain)
        account = (None if domain == relay_domain else
                   directory.manage(context, lambda users: key_owner(users, domain)))
    except DkimError as e:
        raise CommandError(str(e))
    return domain, _result(_keys(context).add(domain, account, args.selector, args.kind,
                                              args.bits, state))  # fmt: skip


def owner(account: str | None) -> str:
    return "the relay domain's, for every account" if account is None else f"account {account}"


def add(args: argparse.Namespace, context: Context) -> int:
    domain, key = _made(context, args, None)
    if key.state == "active":
        print(f"{key.type} key {key.selector!r} made for {domain} ({owner(key.account)}), "
              f"active; publish its record: mailrelay-admin dkim show {domain}")
    else:
        print(f"{key.type} key {key.selector!r} made for {domain} ({owner(key.account)}), "
              f"pending: {domain} has an active {key.type} key; publish the new record "
              f"(mailrelay-admin dkim show {domain}) and signing switches to it once the "
              "relay sees it in DNS (or: mailrelay-admin dkim activate)")
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
    output.print_list(["DOMAIN", "SELECTOR", "TYPE", "STATE", "DNS", "LAST CHECK", "ACCOUNT",
                       "CREATED"],
                      [[k["domain"], k["selector"], k["type"], _state(k),
                        k.get("published", "-"), last_check(k), k["account"] or "(relay)",
                        output.when(k["created"])]
                       for k in keys], "no DKIM keys")  # fmt: skip
    return 0


def _state(k: dict) -> str:
    withdraw = k.get("withdraw_after")
    return "retiring, withdrawable" if withdraw and withdraw <= time.time() else k["state"]


def last_check(k: dict) -> str:
    """The relay's last scheduled look-up: ``ok 2026-12-06 09:00:00``, or ``-``."""
    if k.get("dns_checked") is None:
        return "-"
    return f"{k['dns_status']} {output.when(k['dns_checked'])}"


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
              f"{owner(k['account'])}, made {output.when(k['created'])} UTC")
        quoted = " ".join(f'"{s}"' for s in k["dns_strings"])
        print(f"{k['dns_name']}. IN TXT ( {quoted} )")
        if "published" in k:
            print(f"in DNS: {k['published']}")
        if k.get("dns_checked") is not None:
            print(f"the relay's last check: {last_check(k)} UTC")
        if k.get("withdraw_after"):
            print(f"its record can be withdrawn from {output.when(k['withdraw_after'])} UTC "
                  f"(then: mailrelay-admin dkim retire {k['domain']} {k['selector']})")
    return 0


def delete(args: argparse.Namespace, context: Context) -> int:
    key = _result(_keys(context).remove(args.domain, args.selector))
    print(f"deleted {key.type} key {key.selector!r} of {key.domain}")
    return 0
