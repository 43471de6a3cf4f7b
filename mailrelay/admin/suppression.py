"""mailrelay-admin suppression list|add|del: addresses that are not sent to.

A user's list (``--user``), an account's list for all its users (``--account``), or the
global list (``--global``). Unsubscribes and hard bounces land on the user's list.

Every row can be listed and removed, also one whose user no longer exists (deleted by hand
or in LDAP): ``--user U`` alone names such rows when there is no user U, and ``--user U
--account A`` names exactly the rows stored for U in A (a user that moved to another
account leaves them behind). ``mailrelay-admin user del`` removes the user's own list.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import TypeVar

from twisted.internet import defer

from mailrelay.admin import _features as features
from mailrelay.admin import _output as output
from mailrelay.admin._reactor import run
from mailrelay.admin.cli import CommandError, Context
from mailrelay.features.suppressions import Reason
from mailrelay.manage.stores import at_once
from mailrelay.manage.suppressions import SuppressionLists, suppression_json
from mailrelay.model import canonical_username
from mailrelay.scope import is_address

T = TypeVar("T")


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
    parser.add_argument("--user", help="the list of this SMTP user (with --account: the rows "
                        "stored for this name in that account, whether or not the user exists)")
    parser.add_argument("--account", help="the list of this account (all its users)")
    parser.add_argument("--global", dest="global_", action="store_true", help="the global list")
    parser.set_defaults(level_required=required)


def _where(args, context: Context) -> tuple[str | None, str | None]:
    """``(account, user)`` for the store; (None, None) is the global list."""
    if args.global_ and (args.user or args.account):
        raise CommandError("--global goes alone, without --user or --account")
    if args.level_required and not (args.user or args.account or args.global_):
        raise CommandError("which list: --user USER, --account ACCOUNT or --global")
    if args.user and args.account:
        return args.account, args.user
    if args.user:
        username, account = features.user_account(context, args.user)
        return account, username
    return args.account, None


def _lists(args, context: Context,
           lists: SuppressionLists) -> list[tuple[str | None, str | None]]:  # fmt: skip
    """The lists a command reads or changes: the one named, or, for ``--user U`` when there
    is no user U, those still stored under that name (one per account)."""
    try:
        return [_where(args, context)]
    except features.UnknownUser as e:
        name = canonical_username(args.user)
        accounts = sorted({row.account for row in _now(lists.ofUser(name))})
        if not accounts:
            raise CommandError(f"{e}, and no suppressed address is stored for that name")
        return [(account, name) for account in accounts]


@contextlib.contextmanager
def _opened(context: Context) -> Iterator[SuppressionLists]:
    """The lists, answering at once (no reactor: the SQLite file is read here)."""
    store, stats = features.stores(context)
    stats.close()
    try:
        yield SuppressionLists(store, at_once)
    finally:
        store.close()


def _now(d: defer.Deferred[T]) -> T:
    return run(lambda reactor: d)


def list_(args, context: Context) -> int:
    with _opened(context) as lists:
        if args.user or args.account or args.global_:
            entries = [e for where in _lists(args, context, lists)
                       for e in _now(lists.list(*where))]  # fmt: skip
        else:
            entries = _now(lists.all())
    if args.json:
        output.print_json([suppression_json(e) for e in entries])
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


def _addresses(args) -> list[str]:
    bad = [a for a in args.addresses if not is_address(a)]
    if bad:
        raise CommandError(f"not an email address: {', '.join(bad)}")
    return args.addresses


def add(args, context: Context) -> int:
    addresses = _addresses(args)
    account, user = _where(args, context)
    if args.user and args.account:  # only to a user that exists, in the account it is in
        user, account = features.user_account(context, args.user)
        if account != args.account:
            raise CommandError(f"user {user} is in account {account}, not {args.account}")
    with _opened(context) as lists:
        for address in addresses:
            if not _now(lists.add(address, account, user, Reason(args.reason))):
                print(f"{address}: already suppressed", file=sys.stderr)
    return 0


def delete(args, context: Context) -> int:
    addresses = _addresses(args)
    with _opened(context) as lists:
        named = _lists(args, context, lists)
        # Every list named loses the address (a list comprehension: no short cut).
        missing = [a for a in addresses
                   if not any([_now(lists.remove(a, *w)) for w in named])]  # fmt: skip
    if missing:
        raise CommandError(f"not on that list: {', '.join(missing)}")
    return 0
