"""mailrelay-admin suppression list|add|del: addresses that are not sent to.

A user's list (``--user``), an account's list for all its users (``--account``), or the
global list (``--global``). Unsubscribes and hard bounces land on the user's list.
"""

from __future__ import annotations

import argparse
import sys

from mailrelay.admin import _features as features
from mailrelay.admin import _output as output
from mailrelay.admin.cli import CommandError, Context
from mailrelay.features.suppressions import Reason, Suppression, SuppressionStore
from mailrelay.scope import is_address


def register(subparsers) -> None:
    parser = subparsers.add_parser("suppression", help="suppressed recipients: list, add, del")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("list", help="list suppressed addresses (all lists when no option)")
    _level(p, required=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)

    p = sub.add_parser("add", help="suppress addresses")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    _level(p, required=True)
    p.add_argument(
        "--reason",
        choices=[r.value for r in Reason],
        default=Reason.MANUAL.value,
        help="why (default: manual)",
    )
    p.set_defaults(func=add)

    p = sub.add_parser("del", help="remove addresses from a list")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    _level(p, required=True)
    p.set_defaults(func=delete)


def _level(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--user", help="the list of this SMTP user")
    group.add_argument("--account", help="the list of this account (all its users)")
    group.add_argument("--global", dest="global_", action="store_true", help="the global list")


def _where(args, context: Context) -> tuple[str | None, str | None]:
    """``(account, user)`` for the store; (None, None) is the global list."""
    if args.user:
        username, account = features.user_account(context, args.user)
        return account, username
    return args.account, None


def _store(context: Context) -> SuppressionStore:
    return SuppressionStore(features.paths(context).suppressions_db)


def list_(args, context: Context) -> int:
    store = _store(context)
    if args.user or args.account or args.global_:
        entries = store.list(*_where(args, context))
    else:
        entries = store.all()
    store.close()
    if args.json:
        output.print_json([_json(e) for e in entries])
        return 0
    rows = [
        [
            e.address,
            e.account or "(global)",
            e.user or "(all users)",
            e.reason.value,
            output.when(e.created),
        ]
        for e in entries
    ]
    output.print_list(["ADDRESS", "ACCOUNT", "USER", "REASON", "SINCE (UTC)"], rows,
                      "no suppressed addresses")
    return 0


def _json(e: Suppression) -> dict:
    return {
        "address": e.address,
        "account": e.account,
        "user": e.user,
        "reason": e.reason.value,
        "created": e.created,
    }


def _addresses(args) -> list[str]:
    bad = [a for a in args.addresses if not is_address(a)]
    if bad:
        raise CommandError(f"not an email address: {', '.join(bad)}")
    return args.addresses


def add(args, context: Context) -> int:
    addresses = _addresses(args)
    account, user = _where(args, context)
    store = _store(context)
    for address in addresses:
        if not store.add(address, account, user, Reason(args.reason)):
            print(f"{address}: already suppressed", file=sys.stderr)
    store.close()
    return 0


def delete(args, context: Context) -> int:
    addresses = _addresses(args)
    account, user = _where(args, context)
    store = _store(context)
    missing = [a for a in addresses if not store.remove(a, account, user)]
    store.close()
    if missing:
        raise CommandError(f"not on that list: {', '.join(missing)}")
    return 0
