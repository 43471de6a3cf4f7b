"""mailrelay-admin apikey add|list|del: API keys for the management API (/api/v1).

A key is printed once, when it is made; only its SHA-256 is stored. Read-only keys may
only read; writes get 403. ``--account ACCOUNT`` limits a key to one account
(web/tenancy.py).
"""

from __future__ import annotations

import argparse
import sys

from mailrelay.admin import _access as access
from mailrelay.admin import _output as output
from mailrelay.admin.admins import ACCOUNT_HELP
from mailrelay.admin.cli import Context
from mailrelay.manage.access import Access


def register(subparsers) -> None:
    parser = subparsers.add_parser("apikey", help="management API keys: add, list, del")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("add", help="make a key; prints it once")
    p.add_argument("name", help="what the key is for, e.g. deploy or monitoring")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--read-only", dest="access", action="store_const",
                      const=Access.READ_ONLY, help="may only read (GET)")
    mode.add_argument("--read-write", dest="access", action="store_const",
                      const=Access.READ_WRITE, help="may read and change")
    p.add_argument("--account", metavar="ACCOUNT", help=ACCOUNT_HELP)
    p.set_defaults(func=add)

    p = sub.add_parser("list", help="list keys (never the keys themselves)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)

    p = sub.add_parser("del", help="revoke a key")
    p.add_argument("name")
    p.set_defaults(func=delete)


def add(args: argparse.Namespace, context: Context) -> int:
    access.known_account(context, args.account)
    secret = access.access(context, lambda store: store.addKey(args.name, args.access,
                                                               args.account))  # fmt: skip
    limited = f", limited to account {args.account}" if args.account else ""
    print(f"added API key {args.name} ({args.access}{limited}):")
    print(secret)
    print("(shown only this once: only a hash of it is stored; send it as "
          "'Authorization: Bearer KEY')", file=sys.stderr)
    return 0


def list_(args: argparse.Namespace, context: Context) -> int:
    keys = access.access(context, lambda store: store.listKeys())
    if args.json:
        output.print_json(
            [{"name": k.name, "access": str(k.access), "account": k.account,
              "created": k.created} for k in keys]
        )  # fmt: skip
        return 0
    rows = [[k.name, str(k.access), k.account or "(all)", output.when(k.created)] for k in keys]
    output.print_list(["NAME", "ACCESS", "ACCOUNT", "CREATED (UTC)"], rows, "no API keys")
    return 0


def delete(args: argparse.Namespace, context: Context) -> int:
    access.access(context, lambda store: store.deleteKey(args.name))
    print(f"deleted API key {args.name}")
    return 0
