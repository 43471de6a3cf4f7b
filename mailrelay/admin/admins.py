"""mailrelay-admin admin add|passwd|del|list: people who may log in to the web admin page."""

from __future__ import annotations

import argparse
import sys

from mailrelay.admin import _directory as directory
from mailrelay.admin.apikey import changing, store
from mailrelay.admin.cli import CommandError, Context
from mailrelay.admin.user import MIN_PASSWORD_LENGTH
from mailrelay.auth.passwords import generate_password, hash_password
from mailrelay.web.access import AccessError


def register(subparsers) -> None:
    parser = subparsers.add_parser("admin", help="web admin logins: add, passwd, del, list")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, func, text in (
        ("add", add, "add an admin; prints a generated password once"),
        ("passwd", passwd, "give an admin a new password; prints it once"),
    ):
        p = sub.add_parser(action, help=text)
        p.add_argument("name")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from standard input instead of generating one")
        p.set_defaults(func=func)
    p = sub.add_parser("del", help="delete an admin")
    p.add_argument("name")
    p.set_defaults(func=delete)
    p = sub.add_parser("list", help="list admins")
    p.set_defaults(func=list_)


def _password(args: argparse.Namespace) -> tuple[str, bool]:
    if not args.password_stdin:
        return generate_password(), True
    password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CommandError(f"the password is shorter than {MIN_PASSWORD_LENGTH} characters")
    return password, False


def _set(args: argparse.Namespace, context: Context, new: bool) -> int:
    password, generated = _password(args)
    password_hash = hash_password(password)
    with changing(context) as s:
        s.set_admin(args.name, password_hash, new)
    print(f"{'added' if new else 'changed the password of'} admin {args.name}")
    if generated:
        print(f"password for {args.name}: {password}")
        print("(shown only this once: only a hash of it is stored)", file=sys.stderr)
    return 0


def add(args: argparse.Namespace, context: Context) -> int:
    return _set(args, context, new=True)


def passwd(args: argparse.Namespace, context: Context) -> int:
    return _set(args, context, new=False)


def delete(args: argparse.Namespace, context: Context) -> int:
    with changing(context) as s:
        s.delete_admin(args.name)
    print(f"deleted admin {args.name}")
    return 0


def list_(args: argparse.Namespace, context: Context) -> int:
    s = store(context)
    try:
        s.load()
    except AccessError as e:
        raise CommandError(str(e))
    if not s.data.admins:
        print("no admins", file=sys.stderr)
        return 0
    directory.print_table(["NAME"], [[name] for name in sorted(s.data.admins)])
    return 0
