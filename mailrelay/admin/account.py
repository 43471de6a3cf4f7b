"""mailrelay-admin account add|set|del|list|show: accounts and their authorized domains."""

from __future__ import annotations

import argparse
from typing import Any

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage.users import UserManager, account_json
from mailrelay.model import Account, SmtpUser
from mailrelay.scope import parse_domains


def register(subparsers) -> None:
    parser = subparsers.add_parser("account", help="accounts: add, set, del, list, show")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("add", help="add an account")
    p.add_argument("name")
    p.add_argument("--domains", default="", help='authorized sender domains, "a.com;b.com"')
    p.add_argument("--notify", help="where domain sender notifications go")
    p.add_argument("--note", default="", help="a description")
    p.add_argument("--bounce-domain", help="return-path domain for VERP (bounces.DOMAIN)")
    _quota_options(p)
    p.set_defaults(func=add)

    p = sub.add_parser("set", help="change an account")
    p.add_argument("name")
    p.add_argument("--domains", help='replace the authorized domains: "a.com;b.com"')
    p.add_argument(
        "--add-domain", action="append", default=[], metavar="DOMAINS", help="authorize domains"
    )
    p.add_argument(
        "--remove-domain",
        action="append",
        default=[],
        metavar="DOMAINS",
        help="withdraw domains (refused while a user's scope uses them)",
    )
    p.add_argument("--notify", help='where domain sender notifications go ("" for none)')
    p.add_argument("--note", help="a description")
    bounce = p.add_mutually_exclusive_group()
    bounce.add_argument("--bounce-domain", help="return-path domain for VERP (bounces.DOMAIN)")
    bounce.add_argument("--no-bounce-domain", action="store_true",
                        help="deliver with the client's envelope sender again")
    _quota_options(p)
    p.set_defaults(func=set_)

    p = sub.add_parser("del", help="delete an account that has no users")
    p.add_argument("name")
    p.set_defaults(func=delete)

    p = sub.add_parser("list", help="list accounts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)

    p = sub.add_parser("show", help="show one account and its users")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=show)


def _quota(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def _quota_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quota-day", type=_quota, metavar="N",
                   help="messages the account's users may send together per UTC day (0: "
                        "none); warnings to --notify at 80, 90 and 100%%, then 451 4.7.1")
    p.add_argument("--quota-month", type=_quota, metavar="N",
                   help="messages per UTC month, the same way (0: none)")


def add(args: argparse.Namespace, context: Context) -> int:
    async def add(users: UserManager) -> Account:
        return await users.add_account(
            Account(args.name, parse_domains(args.domains), args.notify or None, args.note,
                    _bounce_domain(args.bounce_domain), args.quota_day or None,
                    args.quota_month or None)
        )

    account = directory.manage(context, add, directory.changing(context))
    print(f"added account {account.name}")
    return 0


def set_(args: argparse.Namespace, context: Context) -> int:
    if args.domains is not None and (args.add_domain or args.remove_domain):
        raise CommandError("--domains replaces the domains: use it without --add/--remove-domain")

    def change(current: Account) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        domains = set(current.domains)
        if args.domains is not None:
            domains = set(parse_domains(args.domains))
        for text in args.add_domain:
            domains |= parse_domains(text)
        for text in args.remove_domain:
            removed = parse_domains(text)
            unknown = sorted(removed - domains)
            if unknown:
                raise CommandError(f"account {args.name!r} has no domain {', '.join(unknown)}")
            domains -= removed
        if domains != current.domains:
            changes["domains"] = frozenset(domains)
        if args.notify is not None:
            changes["notify"] = args.notify.strip() or None
        if args.note is not None:
            changes["note"] = args.note
        if args.bounce_domain is not None:
            changes["bounce_domain"] = _bounce_domain(args.bounce_domain)
        if args.no_bounce_domain:
            changes["bounce_domain"] = None
        for key in ("quota_day", "quota_month"):
            if getattr(args, key) is not None:
                changes[key] = getattr(args, key) or None
        if not changes:
            raise CommandError("nothing to change (see mailrelay-admin account set --help)")
        return changes

    account = directory.manage(context, lambda users: users.update_account(args.name, change),
                               directory.changing(context))  # fmt: skip
    print(f"changed account {account.name}")
    return 0


def _bounce_domain(text: str | None) -> str | None:
    return (text or "").strip().lower().rstrip(".") or None


def delete(args: argparse.Namespace, context: Context) -> int:
    account = directory.manage(context, lambda users: users.delete_account(args.name),
                               directory.changing(context))  # fmt: skip
    print(f"deleted account {account.name}")
    forgotten = directory.manage(context, lambda users: users.forget_account(account.name))
    if forgotten is not None:
        print(f"its suppressions and statistics: {forgotten.said()}")
    return 0


def _accounts_with_users(context: Context) -> list[tuple[Account, list[SmtpUser]]]:
    return directory.manage(context, lambda users: users.accounts())


def list_(args: argparse.Namespace, context: Context) -> int:
    entries = _accounts_with_users(context)
    if args.json:
        output.print_json([account_json(a, users) for a, users in entries])
        return 0
    rows = [
        [a.name, str(len(users)), ";".join(sorted(a.domains)) or "-", a.notify or "-", a.note]
        for a, users in entries
    ]
    output.print_table(["NAME", "USERS", "DOMAINS", "NOTIFY", "NOTE"], rows)
    return 0


def show(args: argparse.Namespace, context: Context) -> int:
    found = [(a, users) for a, users in _accounts_with_users(context) if a.name == args.name]
    if not found:
        raise CommandError(f"unknown account {args.name!r} (see mailrelay-admin account list)")
    account, users = found[0]
    if args.json:
        output.print_json(account_json(account, users))
        return 0
    print(f"{'name:':10}{account.name}")
    print(f"{'domains:':10}{';'.join(sorted(account.domains)) or '-'}")
    print(f"{'notify:':10}{account.notify or '-'}")
    print(f"{'note:':10}{account.note or '-'}")
    print(f"{'bounces:':10}{account.bounce_domain or '-'}")
    print(f"{'quota:':10}{account.quota_day or 'none'} per day, "
          f"{account.quota_month or 'none'} per month")
    print(f"{'users:':10}{len(users)}")
    for user in users:
        print(f"  {user.username}")
    return 0
