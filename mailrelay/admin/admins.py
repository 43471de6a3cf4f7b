"""mailrelay-admin admin add|passwd|del|list: people who may log in to the web admin page.

``admin add NAME --account ACCOUNT`` makes a login limited to one account: it sees and
changes only that account's users, suppressions, queue entries, statistics and DKIM keys
(web/tenancy.py); without ``--account`` the admin manages the whole relay. The account
is kept by ``passwd``; to change it, delete the admin and add it again."""

from __future__ import annotations

import argparse

from mailrelay.admin import _access as access
from mailrelay.admin import _output as output
from mailrelay.admin import _password as passwords
from mailrelay.admin.cli import Context
from mailrelay.auth.passwords import hash_password

ACCOUNT_HELP = ("limit it to this account: it sees and changes only that account's users, "
                "suppressions, queue entries, statistics and DKIM keys (default: the whole "
                "relay)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("admin", help="web admin logins: add, passwd, del, list")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, func, text in (
        ("add", add, "add an admin; prints a generated password once"),
        ("passwd", passwd, "give an admin a new password; prints it once"),
    ):
        p = sub.add_parser(action, help=text)
        p.add_argument("name")
        passwords.add_option(p)
        p.set_defaults(func=func)
        if action == "add":
            p.add_argument("--account", metavar="ACCOUNT", help=ACCOUNT_HELP)
    p = sub.add_parser("del", help="delete an admin")
    p.add_argument("name")
    p.set_defaults(func=delete)
    p = sub.add_parser("list", help="list admins")
    p.set_defaults(func=list_)


def _set(args: argparse.Namespace, context: Context, new: bool) -> int:
    account = getattr(args, "account", None)
    access.known_account(context, account)
    password, generated = passwords.new_password(args)
    password_hash = hash_password(password)
    access.access(context, lambda store: store.setAdmin(args.name, password_hash, new,
                                                        account))  # fmt: skip
    limited = f" (limited to account {account})" if account else ""
    print(f"{'added' if new else 'changed the password of'} admin {args.name}{limited}")
    if generated:
        passwords.show(args.name, password)
    return 0


def add(args: argparse.Namespace, context: Context) -> int:
    return _set(args, context, new=True)


def passwd(args: argparse.Namespace, context: Context) -> int:
    return _set(args, context, new=False)


def delete(args: argparse.Namespace, context: Context) -> int:
    access.access(context, lambda store: store.deleteAdmin(args.name))
    print(f"deleted admin {args.name}")
    return 0


def list_(args: argparse.Namespace, context: Context) -> int:
    admins = access.access(context, lambda store: store.listAdmins())
    output.print_list(["NAME", "ACCOUNT"], [[a.name, a.account or "(all)"] for a in admins],
                      "no admins")  # fmt: skip
    return 0
